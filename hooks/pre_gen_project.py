"""Validate the answers before anything is written, with one clear line per wrong answer.

The rules run twice, from this one file:

* **In cookiecutter's (or cruft's) own process, as the questions are answered.** cookiecutter.json
  loads ml_template_answers.py as a Jinja extension (``_extensions``); it adds this file's
  ``check_answers`` filter, which cookiecutter.json renders over the
  answers given so far: once right after the starter (the next defaults are looked up by it), once
  after the last question. A wrong answer raises InvalidAnswers, which the command line shows as
  its lines alone and exit status 1, before the project folder exists. (A pre-generation hook
  cannot do that: when it fails, cookiecutter logs its own traceback around the hook's output.)
  cookiecutter and cruft put the template's folder on the import path while they render it;
  anything else that renders the template must do the same.
* **As the pre-generation hook**, for runs that skip the questions (``cookiecutter --replay``);
  it exits non-zero, so a bad answer still leaves no partial project behind.

Choices (starter, orchestrator) are plain answers checked here, not cookiecutter menus:
cookiecutter 2.7 refuses a choice given on the command line outside its menu with a traceback,
before any code of the template runs. (The starters are the folders under the project
template's starters/.)

cookiecutter renders this file with Jinja before running it as a hook, so the code below holds no
Jinja delimiters outside the ``__main__`` block; imported as a module, that block never runs.
"""

from __future__ import annotations

import json
import keyword
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import click

CHOICES = {
    "starter": ("image-classification", "text-classification", "tabular-regression"),
    "orchestrator": ("kfp", "argo", "both"),
}
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# KServe's rule for an InferenceService name (IsvcNameFmt in its validation webhook), which the
# project slug becomes: a DNS-1123 label that starts with a letter.
INFERENCE_SERVICE_NAME = "[a-z]([-a-z0-9]*[a-z0-9])?"
# An import name that is also a PEP 508 distribution name (so pip can install the project).
PACKAGE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_]*[A-Za-z0-9])?$")
# Names that would shadow a library the project imports, or the platform's own modules.
RESERVED = {
    "torch",
    "torchvision",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "kfp",
    "hera",
    "mlflow",
    "kserve",
    "kubernetes",
    "sklearn",
    "yaml",
    "typer",
    "requests",
    "handoff",
    "handoff_pipelines",
    "model",
    "tests",
    "test",
    "pipelines",
    "components",
}
# The image is <container_registry>/<project>:<version>: the registry part of an image name in
# the distribution/reference grammar (what docker, podman and registries accept), lowercase.
REGISTRY_HOST = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:]+\])(?::[0-9]+)?"
)
PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
TRACKING_URIS = (
    "sqlite:///<path>, http://<host>, https://<host>, file:<path>, databricks or databricks://<profile>"
)
# Free text pasted into one-line places: a Markdown heading, model.py's docstring, a TOML string.
FREE_TEXT = ("project_name", "description")
# The platform team's settings in cookiecutter.json: package indexes that projects record.
INDEXES = ("_package_index", "_torch_cpu_index")


def slug_of(project_name: str) -> str:
    """cookiecutter.json's default for project:
    project_name | lower | replace(' ', '-') | replace('_', '-')."""
    return project_name.lower().replace(" ", "-").replace("_", "-")


def package_of(project: str) -> str:
    """cookiecutter.json's default for package_name: project | replace('-', '_')."""
    return project.replace("-", "_")


# Answers whose default cookiecutter.json derives from another answer, and how.
DERIVED: dict[str, tuple[str, Callable[[str], str]]] = {
    "project": ("project_name", slug_of),
    "package_name": ("project", package_of),
}


def choice_rule(field: str) -> Callable[[str], str | None]:
    def rule(value: str) -> str | None:
        return None if value in CHOICES[field] else f"must be one of: {', '.join(CHOICES[field])}"

    return rule


def free_text_rule(field: str) -> Callable[[str], str | None]:
    """Text pasted verbatim into Markdown, model.py's docstring and pyproject.toml."""

    def rule(value: str) -> str | None:
        if not value.strip():
            return "must not be empty"
        if "\n" in value or "\r" in value:
            return "must be a single line (no newline)"
        if "\\" in value:
            return "must not contain a backslash"
        if '"""' in value:
            return 'must not contain \'"""\''
        # pyproject.toml gets the description through tojson, which writes characters such as
        # emoji as surrogate-pair escapes that TOML rejects.
        if field == "description" and any(0xD800 <= ord(c) <= 0xDFFF or ord(c) > 0xFFFF for c in value):
            return "must not contain characters outside the Basic Multilingual Plane (such as emoji)"
        return None

    return rule


def label_rule(field: str) -> Callable[[str], str | None]:
    def rule(value: str) -> str | None:
        if len(value) > 63 or not DNS_1123_LABEL.match(value):
            return (
                "is not a DNS-1123 label: use lowercase letters, digits and '-', start and end with "
                "a letter or digit, at most 63 characters"
            )
        if field == "project" and not re.fullmatch(INFERENCE_SERVICE_NAME, value):
            return (
                "must start with a letter: the InferenceService is named after it and KServe "
                f"accepts only names matching {INFERENCE_SERVICE_NAME}"
            )
        return None

    return rule


def package_rule(value: str) -> str | None:
    if not PACKAGE_NAME.match(value) or keyword.iskeyword(value):
        return (
            "is not a Python identifier that is also a valid package name: use ASCII letters, "
            "digits and '_', starting with a letter and not ending with '_'"
        )
    if value.lower() in RESERVED:
        return (
            "is reserved (it would shadow a library or platform module); reserved names: "
            f"{', '.join(sorted(RESERVED))}"
        )
    return None


def registry_rule(value: str) -> str | None:
    """[host[:port]/]path, as the registry part of an image name, with no scheme."""
    if not value:
        return "must not be empty"
    fault = registry_fault(value)
    if fault is None:
        return None
    return f"is not an image name prefix such as registry.example.com/team or localhost:5000/team: {fault}"


def registry_fault(value: str) -> str | None:
    scheme = SCHEME.match(value)
    if scheme:
        return f"drop the scheme {scheme.group(0)!r}"
    if value.endswith("/"):
        return "drop the trailing '/'"
    if value != value.lower():
        return "use lowercase"
    first, *rest = value.split("/")
    # As docker reads a name: the first part is a registry host if it has a '.' or a ':' (a
    # port), or is localhost; otherwise the whole prefix is a path on the default registry.
    if "." in first or ":" in first or first == "localhost":
        if not REGISTRY_HOST.fullmatch(first):
            return (
                f"{first!r} is not a registry host (a DNS name, localhost or an IP address, then an "
                "optional :port)"
            )
    else:
        rest = [first, *rest]
    for component in rest:
        if not PATH_COMPONENT.fullmatch(component):
            return (
                f"{component!r} is not a path component (lowercase letters and digits, joined by "
                "'.', '_', '__' or '-')"
            )
    return None


def tracking_rule(value: str) -> str | None:
    """The tracking URI schemes handoff and the generated project support, each with its parts."""
    if any(c.isspace() for c in value):
        return "must not contain spaces"
    try:
        parts = urlsplit(value)
        host, _ = parts.hostname, parts.port
    except ValueError:
        return "is not a URI: its host or port is malformed"
    if value.startswith("databricks"):
        profile = value.removeprefix("databricks://")
        if value == "databricks" or (value.startswith("databricks://") and profile and "/" not in profile):
            return None
        return "must be databricks or databricks://<profile>"
    if value.startswith("sqlite:") and not value.startswith("sqlite:///"):
        return "must be sqlite:///<path> (three slashes), as in sqlite:///mlflow.db"
    if value == "sqlite:///":
        return "needs a database file after sqlite:///, as in sqlite:///mlflow.db"
    if value.startswith(("http://", "https://")) and not host:
        return "needs a host, as in http://mlflow.example.com:5000"
    if value.startswith("file:") and not parts.path:
        return "needs a path, as in file:///srv/mlruns"
    if not value.startswith(("sqlite:///", "http://", "https://", "file:")):
        return f"must start with one of the schemes this template accepts: {TRACKING_URIS}"
    return None


# In the order cookiecutter asks.
RULES: dict[str, Callable[[str], str | None]] = {
    "starter": choice_rule("starter"),
    "project_name": free_text_rule("project_name"),
    "project": label_rule("project"),
    "package_name": package_rule,
    "description": free_text_rule("description"),
    "orchestrator": choice_rule("orchestrator"),
    "namespace": label_rule("namespace"),
    "container_registry": registry_rule,
    "mlflow_tracking_uri": tracking_rule,
}


def shown(value: str) -> str:
    """The answer quoted, characters beyond the Basic Multilingual Plane as the surrogate-pair
    escapes tojson writes for them (the form TOML and YAML would be handed)."""
    pairs = "".join(
        c if ord(c) <= 0xFFFF else chr(0xD800 + ((ord(c) - 0x10000) >> 10)) + chr(0xDC00 + (ord(c) & 0x3FF))
        for c in value
    )
    return repr(pairs)


def problems(answers: Mapping[str, Any]) -> list[str]:
    """One line per wrong answer among those given so far, in the order cookiecutter asks.

    An answer left to its default, which cookiecutter.json derives from another answer (DERIVED),
    is not blamed for that answer's fault: when the other answer is wrong, its own line says it;
    when only the derived value is wrong, the line is about the answer the user gave.
    """
    wrong = {
        field: found
        for field, rule in RULES.items()
        if field in answers and (found := rule(str(answers[field])))
    }
    lines = []
    for field, found in wrong.items():
        value = str(answers[field])
        source, derive = DERIVED.get(field, ("", str))
        if source in answers and derive(str(answers[source])) == value:
            if source not in wrong:
                lines.append(
                    f"{source} {shown(str(answers[source]))} gives {field} {shown(value)}, which {found}; "
                    f"choose another {source} or give {field} yourself"
                )
            continue
        lines.append(f"{field} {shown(value)} {found}" if value.strip() else f"{field} {found}")
    for key in INDEXES:
        if key in answers:
            lines.extend(index_problems(key, str(answers[key])))
    return lines


def index_problems(key: str, index: str) -> list[str]:
    """An index URL is written into every project, so it must be a URL and hold no credentials."""
    if not index:
        return []
    scheme, _, rest = index.partition("://")
    if scheme not in ("https", "http", "file") or not rest or any(c.isspace() for c in index):
        return [
            f"cookiecutter.json: {key} {index!r} must be a package index URL such as "
            "https://pypi.example.com/simple"
        ]
    if "@" in rest.split("/", 1)[0]:
        return [
            f"cookiecutter.json: {key} must not hold credentials (it is written into every "
            "project): pip reads them from its keyring or ~/.netrc for the index's host"
        ]
    return []


class InvalidAnswers(click.ClickException):
    """Wrong answers: cookiecutter's command line shows them (show) and exits 1, no traceback."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines

    def show(self, file: Any = None) -> None:
        for line in self.lines:
            click.echo(f"ERROR: {line}", file=file or sys.stderr)


def check_answers(answers: Mapping[str, Any]) -> str:
    """The Jinja filter cookiecutter.json renders: 'yes', or InvalidAnswers."""
    found = problems(answers)
    if found:
        raise InvalidAnswers(found)
    return "yes"


# What ml_template_answers.AnswersCheck adds to cookiecutter's Jinja environment.
FILTERS = {"check_answers": check_answers}


if __name__ == "__main__":
    errors = problems(json.loads({{cookiecutter | jsonify | tojson}}))  # noqa: F821 (rendered by cookiecutter)
    for error in errors:
        print(f"ERROR: {error}", file=sys.stderr)
    sys.exit(1 if errors else 0)
