"""Validate the answers before anything is written, with one clear line per problem.

Runs inside cookiecutter (and cruft); it only reads the rendered answers and exits non-zero,
so a bad answer leaves no partial project behind.
"""

import keyword
import re
import sys

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# KServe's rule for an InferenceService name (IsvcNameFmt in its validation webhook), which the
# project slug becomes: a DNS-1123 label that starts with a letter.
INFERENCE_SERVICE_NAME = "[a-z]([-a-z0-9]*[a-z0-9])?"
# An import name that is also a PEP 508 distribution name (so pip can install the project).
PACKAGE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_]*[A-Za-z0-9])?$")
# Names that would shadow a library the project imports, or the platform's own modules.
RESERVED = {
    "torch", "torchvision", "numpy", "onnx", "onnxruntime", "onnxscript", "kfp", "hera", "mlflow",
    "kserve", "kubernetes", "sklearn", "yaml", "typer", "requests", "handoff", "handoff_pipelines",
    "model", "tests", "test", "pipelines", "components",
}
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://", "file:", "databricks")
# Free text pasted into one-line places: a Markdown heading, model.py's docstring, a TOML string.
FREE_TEXT = ("project_name", "description")

# tojson makes each answer a valid Python string literal, whatever it contains.
answers = {
    "project_name": {{ cookiecutter.project_name | tojson }},
    "description": {{ cookiecutter.description | tojson }},
    "project": {{ cookiecutter.project | tojson }},
    "package_name": {{ cookiecutter.package_name | tojson }},
    "namespace": {{ cookiecutter.namespace | tojson }},
    "container_registry": {{ cookiecutter.container_registry | tojson }},
    "mlflow_tracking_uri": {{ cookiecutter.mlflow_tracking_uri | tojson }},
}
# The platform team's settings in cookiecutter.json: package indexes that projects record.
INDEXES = {
    "_package_index": {{ cookiecutter._package_index | tojson }},
    "_torch_cpu_index": {{ cookiecutter._torch_cpu_index | tojson }},
}


def free_text_problems(field: str) -> list[str]:
    """Rules for text pasted verbatim into Markdown, model.py's docstring and pyproject.toml."""
    value = answers[field]
    if not value.strip():
        return [f"{field} must not be empty"]
    found = []
    if "\n" in value or "\r" in value:
        found.append(f"{field} {value!r} must be a single line (no newline)")
    if "\\" in value:
        found.append(f"{field} {value!r} must not contain a backslash")
    if '"""' in value:
        found.append(f"{field} {value!r} must not contain '\"\"\"'")
    # pyproject.toml gets the description through tojson, which writes characters such as emoji
    # as surrogate-pair escapes that TOML rejects; here (through tojson too) they are surrogates.
    if field == "description" and any(0xD800 <= ord(c) <= 0xDFFF or ord(c) > 0xFFFF for c in value):
        found.append(f"{field} {value!r} must not contain characters outside the Basic "
                     "Multilingual Plane (such as emoji)")
    return found


def problems() -> list[str]:
    found = []
    for field in FREE_TEXT:
        found.extend(free_text_problems(field))
    for field in ("project", "namespace"):
        value = answers[field]
        if len(value) > 63 or not DNS_1123_LABEL.match(value):
            found.append(f"{field} {value!r} is not a DNS-1123 label: use lowercase letters, digits "
                         "and '-', start and end with a letter or digit, at most 63 characters")
        elif field == "project" and not re.fullmatch(INFERENCE_SERVICE_NAME, value):
            found.append(f"project {value!r} must start with a letter: the InferenceService is named "
                         f"after it and KServe accepts only names matching {INFERENCE_SERVICE_NAME}")
    package = answers["package_name"]
    if not PACKAGE_NAME.match(package) or keyword.iskeyword(package):
        found.append(f"package_name {package!r} is not a Python identifier that is also a valid "
                     "package name: use ASCII letters, digits and '_', starting with a letter and not "
                     "ending with '_'")
    elif package.lower() in RESERVED:
        found.append(f"package_name {package!r} is reserved (it would shadow a library or platform "
                     f"module); reserved names: {', '.join(sorted(RESERVED))}")
    registry = answers["container_registry"]
    if not registry or registry != registry.lower() or " " in registry or registry.endswith("/"):
        found.append(f"container_registry {registry!r} must be a lowercase image prefix such as "
                     "registry.example.com/team, without a trailing '/'")
    if not answers["mlflow_tracking_uri"].startswith(TRACKING_SCHEMES):
        found.append(f"mlflow_tracking_uri {answers['mlflow_tracking_uri']!r} must start with one of "
                     f"{', '.join(TRACKING_SCHEMES)}")
    for key, index in INDEXES.items():
        found.extend(index_problems(key, index))
    return found


def index_problems(key: str, index: str) -> list[str]:
    """An index URL is written into every project, so it must be a URL and hold no credentials."""
    if not index:
        return []
    scheme, _, rest = index.partition("://")
    if scheme not in ("https", "http", "file") or not rest or any(c.isspace() for c in index):
        return [f"cookiecutter.json: {key} {index!r} must be a package index URL such as "
                "https://pypi.example.com/simple"]
    if "@" in rest.split("/", 1)[0]:
        return [f"cookiecutter.json: {key} must not hold credentials (it is written into every "
                "project): pip reads them from its keyring or ~/.netrc for the index's host"]
    return []


if __name__ == "__main__":
    errors = problems()
    for line in errors:
        print(f"ERROR: {line}", file=sys.stderr)
    sys.exit(1 if errors else 0)
