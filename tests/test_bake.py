"""Generating projects: the exact file set, fully rendered files, answer validation."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from handoff import __version__

from .conftest import TEMPLATE, generate

pytestmark = pytest.mark.bake

EXPECTED_FILES = {
    ".dockerignore",
    ".github/dependabot.yml",
    ".github/workflows/ci.yml",
    ".github/workflows/template-upgrade.yml",
    ".gitignore",
    "Dockerfile",
    "Makefile",
    "README.md",
    "constraints.txt",
    "contract.yaml",
    "handoff.yaml",
    "model.py",
    "model_card.md",
    "pyproject.toml",
    "requirements-model.txt",
    "tests/test_model.py",
}
# GitHub Actions expressions are meant to reach the generated project unrendered.
ACTIONS_EXPRESSION = re.compile(r"\$\{\{ [^{}\n]+ \}\}")
JINJA_ALLOWED = {
    ".github/workflows/ci.yml": ACTIONS_EXPRESSION,
    ".github/workflows/template-upgrade.yml": ACTIONS_EXPRESSION,
}


def files_of(project: Path) -> set[str]:
    """The project's files, less the repository the post-generation hook made (.git/)."""
    return {
        str(p.relative_to(project))
        for p in project.rglob("*")
        if p.is_file() and p.relative_to(project).parts[0] != ".git"
    }


def test_default_bake_has_exactly_the_expected_files(cookies) -> None:
    result = cookies.bake()
    assert result.exit_code == 0, result.exception
    assert result.project_path.name == "digits-classifier"
    assert files_of(result.project_path) == EXPECTED_FILES


@pytest.mark.parametrize(
    "answers",
    [
        {},
        {
            "project_name": "Churn Model",
            "orchestrator": "argo",
            "namespace": "team-a",
            "container_registry": "registry.example.com/team-a",
            "author": 'Ada: "research" lead',
        },
        {"starter": "text-classification"},
        {"starter": "tabular-regression"},
    ],
    ids=["default", "answers", "text-classification", "tabular-regression"],
)
def test_no_unrendered_jinja(cookies, answers: dict[str, str]) -> None:
    result = cookies.bake(extra_context=answers)
    assert result.exit_code == 0, result.exception
    for name in files_of(result.project_path):
        text = (result.project_path / name).read_text()
        allowed = JINJA_ALLOWED.get(name)
        if allowed:
            text = allowed.sub("", text)
        assert "{{" not in text and "{%" not in text, f"unrendered Jinja in {name}"


def test_answers_reach_the_project(cookies) -> None:
    result = cookies.bake(
        extra_context={"project_name": "Churn Model", "orchestrator": "both", "namespace": "team-a"}
    )
    assert result.exit_code == 0, result.exception
    project = result.project_path
    assert project.name == "churn-model"
    handoff_yaml = (project / "handoff.yaml").read_text()
    assert "orchestrator: both" in handoff_yaml and 'namespace: "team-a"' in handoff_yaml
    assert 'name = "churn_model"' in (project / "pyproject.toml").read_text()
    assert f'"ml-handoff=={__version__}"' in (project / "pyproject.toml").read_text()
    assert 'name: "churn-model"' in (project / "contract.yaml").read_text()


def test_quotes_in_free_text_keep_pyproject_valid(cookies) -> None:
    description = "A \"small\" CNN <for> 'digits' & more"
    author = 'Ada "the" Lead\'s team'
    result = cookies.bake(extra_context={"description": description, "author": author})
    assert result.exit_code == 0, result.exception
    project = result.project_path
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["description"] == description
    assert description in (project / "README.md").read_text()
    assert f"Research: {author}." in (project / "model_card.md").read_text()
    assert yaml.safe_load((project / "contract.yaml").read_text())["owners"]["research"] == author


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"project": "Bad_Name"}, "ERROR: project 'Bad_Name' is not a DNS-1123 label"),
        # KServe names the InferenceService after the slug and refuses one that starts with a digit.
        (
            {"project": "3d-digits", "package_name": "digits3d"},
            "ERROR: project '3d-digits' must start with a letter: the InferenceService is named after it "
            "and KServe accepts only names matching [a-z]([-a-z0-9]*[a-z0-9])?",
        ),
        ({"package_name": "2fast"}, "ERROR: package_name '2fast' is not a Python identifier"),
        ({"package_name": "torch"}, "ERROR: package_name 'torch' is reserved"),
        # Python identifiers that pip cannot install as a project name (PEP 508).
        ({"package_name": "zählwerk"}, "ERROR: package_name 'zählwerk' is not a Python identifier that"),
        ({"package_name": "_private"}, "ERROR: package_name '_private' is not a Python identifier that"),
        ({"namespace": "-ns"}, "ERROR: namespace '-ns' is not a DNS-1123 label"),
        ({"mlflow_tracking_uri": "mlflow.db"}, "ERROR: mlflow_tracking_uri 'mlflow.db' must start with"),
        # An explicit slug: an empty one would make cookiecutter refuse before the hook runs.
        ({"project_name": "", "project": "churn"}, "ERROR: project_name must not be empty"),
        ({"project_name": "Churn\nModel"}, "ERROR: project_name 'Churn\\nModel' must be a single line"),
        (
            {"project_name": "Churn\\Model"},
            "ERROR: project_name 'Churn\\\\Model' must not contain a backslash",
        ),
        ({"project_name": 'Churn """ Model'}, 'ERROR: project_name \'Churn """ Model\' must not contain'),
        ({"description": " "}, "ERROR: description must not be empty"),
        ({"description": "Two\nlines"}, "ERROR: description 'Two\\nlines' must be a single line"),
        ({"description": "C:\\data"}, "ERROR: description 'C:\\\\data' must not contain a backslash"),
        ({"description": 'A """ CNN'}, 'ERROR: description \'A """ CNN\' must not contain'),
        ({"description": "A CNN \U0001f600"}, "ERROR: description 'A CNN \\ud83d\\ude00' must not contain"),
        # The platform team's index is written into every project: a URL, and no credentials.
        (
            {"_package_index": "https://ci:s3cret@pypi.example.com/simple"},
            "ERROR: cookiecutter.json: _package_index must not hold credentials",
        ),
        (
            {"_torch_cpu_index": "pypi.example.com/cpu"},
            "ERROR: cookiecutter.json: _torch_cpu_index 'pypi.example.com/cpu' must be a package index URL",
        ),
    ],
    ids=[
        "slug",
        "slug-digit",
        "identifier",
        "reserved",
        "non-ascii-package",
        "underscore-package",
        "namespace",
        "tracking-uri",
        "name-empty",
        "name-newline",
        "name-backslash",
        "name-triple-quote",
        "description-blank",
        "description-newline",
        "description-backslash",
        "description-triple-quote",
        "description-emoji",
        "index-credentials",
        "index-not-a-url",
    ],
)
def test_invalid_answer_fails_with_one_line_and_no_output(
    tmp_path: Path, answers: dict[str, str], message: str
) -> None:
    args = [f"{k}={v}" for k, v in answers.items()]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cookiecutter",
            str(TEMPLATE),
            "--no-input",
            "--output-dir",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []  # no partial project


def test_interactive_prompts_accept_defaults(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cookiecutter", str(TEMPLATE), "--output-dir", str(tmp_path)],
        # The starter first (its default), then the project name; the rest take their defaults.
        input="\nFraud Scorer\n" + "\n" * 12,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Project slug" in result.stdout
    assert (tmp_path / "fraud-scorer" / "model.py").is_file()


@pytest.mark.parametrize(
    ("template", "commit", "address"),
    [
        ("gh:org/ml-template", None, "https://github.com/org/ml-template.git"),
        ("gl:org/ml-template", None, "https://gitlab.com/org/ml-template.git"),
        ("bb:org/ml-template", None, "https://bitbucket.org/org/ml-template"),
        ("https://git.example.com/org/ml-template.git", None, "https://git.example.com/org/ml-template.git"),
        ("git@github.com:org/ml-template.git", None, "ssh://git@github.com/org/ml-template.git"),
        ("file:///srv/git/ml-template.git", None, "file:///srv/git/ml-template.git"),
        # cruft, and cruft update re-rendering a project: the recorded path of a cloned repository.
        ("/srv/git/ml-template.git", "0" * 40, "file:///srv/git/ml-template.git"),
        # A local folder (no clone, no commit): nothing to name, so the pins are by version.
        ("/home/me/ml-template", None, None),
    ],
    ids=["gh", "gl", "bb", "https", "ssh", "file-url", "cruft-path", "local-folder"],
)
def test_platform_pins_name_the_template_repository_at_the_release_tag(
    tmp_path: Path, template: str, commit: str | None, address: str | None
) -> None:
    """As cookiecutter and cruft render it: `_template` is the address given (or recorded). The
    post-generation hook records the same address in .cruft.json, through cookiecutter's own
    abbreviations, so `cruft update` renders the same pins."""
    from cookiecutter.config import BUILTIN_ABBREVIATIONS
    from cookiecutter.generate import generate_context, generate_files
    from cookiecutter.prompt import prompt_for_config
    from cookiecutter.repository import expand_abbreviations

    if template.split(":")[0] in BUILTIN_ABBREVIATIONS:
        assert expand_abbreviations(template, BUILTIN_ABBREVIATIONS) == address

    context = generate_context(str(TEMPLATE / "cookiecutter.json"))
    context["cookiecutter"] = prompt_for_config(context, no_input=True)
    context["cookiecutter"].update(_template=template, **({"_commit": commit} if commit else {}))
    project = Path(
        generate_files(str(TEMPLATE), context=context, output_dir=str(tmp_path), accept_hooks=False)
    )
    platform = tomllib.loads((project / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tag = f"v{__version__}"
    if address is None:
        assert platform["platform"] == [f"ml-handoff=={__version__}", f"ml-handoff-pipelines=={__version__}"]
        assert platform["monitor"] == [f"ml-handoff[monitor]=={__version__}"]
    else:
        assert platform["platform"] == [
            f"ml-handoff @ git+{address}@{tag}#subdirectory=components",
            f"ml-handoff-pipelines @ git+{address}@{tag}#subdirectory=pipelines",
        ]
        assert platform["monitor"] == [f"ml-handoff[monitor] @ git+{address}@{tag}#subdirectory=components"]


# --- the first commit ---------------------------------------------------------------------------


def cookiecutter_cli(
    output_dir: Path, env: dict[str, str], *answers: str
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "cookiecutter",
        str(TEMPLATE),
        "--no-input",
        "--output-dir",
        str(output_dir),
    ]
    return subprocess.run([*command, *answers], capture_output=True, text=True, env=env, timeout=120)


def no_git_identity(home: Path) -> dict[str, str]:
    """A shell whose git knows no user.name or user.email (fresh HOME, no system or global config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "COOKIECUTTER_"))}
    return {**env, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git_out(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_generation_commits_the_project_even_where_git_has_no_identity(tmp_path: Path) -> None:
    made = cookiecutter_cli(tmp_path / "out", no_git_identity(tmp_path), "author=Ada Lovelace")
    assert made.returncode == 0, made.stderr
    project = tmp_path / "out" / "digits-classifier"
    assert git_out(project, "rev-list", "--count", "HEAD") == "1"
    assert git_out(project, "status", "--porcelain") == ""  # everything generated is committed
    assert (
        git_out(project, "log", "-1", "--format=%an <%ae>") == "Ada Lovelace <ada-lovelace@example.invalid>"
    )
    assert "git has no user.name or user.email here: committed as" in made.stderr
    assert "git commit --amend --reset-author" in made.stderr


def test_generation_commits_as_the_configured_git_user(tmp_path: Path) -> None:
    env = no_git_identity(tmp_path)
    (tmp_path / ".gitconfig").write_text("[user]\n\tname = Grace Hopper\n\temail = grace@example.com\n")
    env.pop("GIT_CONFIG_GLOBAL")
    made = cookiecutter_cli(tmp_path / "out", env)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "out" / "digits-classifier"
    assert git_out(project, "log", "-1", "--format=%an <%ae>") == "Grace Hopper <grace@example.com>"
    assert git_out(project, "branch", "--show-current") == "main"


def test_generation_without_git_still_succeeds_and_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    made = cookiecutter_cli(tmp_path / "out", {**no_git_identity(tmp_path), "PATH": str(empty)})
    assert made.returncode == 0, made.stderr
    assert not (tmp_path / "out" / "digits-classifier" / ".git").exists()
    assert "git is not installed" in made.stderr and "git init" in made.stderr


def test_generation_inside_a_repository_leaves_it_to_that_repository(tmp_path: Path) -> None:
    git_out(tmp_path, "init", "-q")
    made = cookiecutter_cli(tmp_path / "models", no_git_identity(tmp_path))
    assert made.returncode == 0, made.stderr
    assert not (tmp_path / "models" / "digits-classifier" / ".git").exists()
    assert "inside the git repository" in made.stderr


# --- the project image's build context ----------------------------------------------------------


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (the cluster rehearsal's builder)")
def test_project_image_holds_every_project_file_and_none_of_the_local_state(tmp_path: Path) -> None:
    """A helper module beside model.py (or a package, a vocabulary file) reaches /app; local state
    does not. Built by podman from the Dockerfile's own COPY lines and .dockerignore, on `scratch`
    (the platform image and the RUN step are tests/test_images.py's)."""
    project = generate(tmp_path)
    (project / "helpers.py").write_text("WIDTH = 16\n")
    (project / "vocab").mkdir()
    (project / "vocab" / "words.txt").write_text("good\nbad\n")
    for state in ("mlflow.db", "runs/1/summary.json", ".venv/bin/python", "checkpoint.pt", "onnx/model.onnx"):
        (project / state).parent.mkdir(parents=True, exist_ok=True)
        (project / state).write_text("local state\n")
    dockerfile = (project / "Dockerfile").read_text()
    copies = [line for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copies, dockerfile
    (tmp_path / "Containerfile").write_text("FROM scratch\n" + "\n".join(copies) + "\n")
    tag = f"localhost/bake-context-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}"

    def podman(*args: str) -> str:
        done = subprocess.run(["podman", *args], capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode().strip()

    podman("build", "-q", "-f", str(tmp_path / "Containerfile"), "-t", tag, str(project))
    container = podman("create", tag, "none")
    try:
        listed = subprocess.run(
            f"podman export {container} | tar -t", shell=True, capture_output=True, text=True, check=True
        )
    finally:
        podman("rm", container)
        podman("rmi", tag)
    files = {name.removeprefix("app/") for name in listed.stdout.split() if not name.endswith("/")}
    assert {
        "model.py",
        "helpers.py",
        "vocab/words.txt",
        "contract.yaml",
        "model_card.md",
        "handoff.yaml",
        "pyproject.toml",
        "requirements-model.txt",
    } <= files
    assert not {
        f for f in files if f.split("/")[0] in ("mlflow.db", "runs", ".venv", ".git", "checkpoint.pt", "onnx")
    }
