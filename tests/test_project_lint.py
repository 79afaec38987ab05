"""The generated project's upkeep: `make lint`, its CI's action pins, Dependabot, `make upgrade`.

`make lint` is the one definition of the project's lint (its CI's lint step calls it), so it must
pass on every fresh starter and name the file when it fails. The workflows pin each action by commit
SHA (a tag can be moved to other code; the registry password goes to one of them), Dependabot keeps
those pins current, and a weekly workflow runs `handoff upgrade --check` against the template's
releases, so a project hears of a new template release without anyone remembering to look. The
weekly step and `make upgrade` run here against a template published in the test with two releases.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cookiecutter.main import cookiecutter

from handoff import __version__

from .conftest import BIN, TEMPLATE, generate
from .first_minutes import make as run_make
from .template_repo import commit_of, git, next_minor, publish, template_repo

pytestmark = pytest.mark.bake

STARTERS = ("image-classification", "text-classification", "tabular-regression")
WORKFLOWS = ".github/workflows"
UPGRADE_WORKFLOW = f"{WORKFLOWS}/template-upgrade.yml"
# `owner/repo[/path]@<40 hex> # vX.Y.Z`: a tag can be moved, a commit cannot.
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+$")
TAG, NEXT = f"v{__version__}", next_minor(__version__)


def make(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`make` in the project with this checkout's tools (ruff, handoff) on PATH, as after `make setup`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return run_make(project, *args, env=env, timeout=300)


def load(project: Path, name: str) -> dict[str, Any]:
    return yaml.safe_load((project / name).read_text())


# --- make lint ------------------------------------------------------------------------------------


@pytest.mark.parametrize("starter", STARTERS)
def test_make_lint_passes_on_each_fresh_starter(tmp_path: Path, starter: str) -> None:
    project = generate(tmp_path, starter=starter)
    linted = make(project, "lint")
    assert linted.returncode == 0, linted.stdout + linted.stderr
    lines = linted.stdout.splitlines()
    assert lines[0] == "ruff check ."
    assert "All checks passed!" in lines
    assert "ruff format --check ." in lines
    assert re.search(r"^\d+ files already formatted$", linted.stdout, flags=re.MULTILINE), linted.stdout


@pytest.mark.parametrize(
    ("broken", "said", "column"),
    [
        # Below `from __future__ import annotations` and its blank line, where imports go.
        ("import os\n", "F401 [*] `os` imported but unused", 8),
        # At the end of the file: a line `ruff format` would rewrite, which `ruff check` passes.
        ("VALUE = ( 1 )\n", "1 file would be reformatted, 3 files already formatted", 1),
    ],
    ids=["lint-error", "format-error"],
)
def test_make_lint_fails_naming_the_file_and_line(
    default_project: Path, tmp_path: Path, broken: str, said: str, column: int
) -> None:
    project = Path(shutil.copytree(default_project, tmp_path / default_project.name))
    model = project / "model.py"
    lines = model.read_text().splitlines(keepends=True)
    imports = lines.index("from __future__ import annotations\n") + 2
    at = imports if broken.startswith("import") else len(lines)
    lines.insert(at, broken)
    model.write_text("".join(lines))
    linted = make(project, "lint")
    assert linted.returncode == 2, linted.stdout
    assert said in linted.stdout.splitlines(), linted.stdout
    where = rf"^ +--> model\.py:{at + 1}:{column}$"
    assert re.search(where, linted.stdout, flags=re.MULTILINE), linted.stdout
    assert re.search(r"^make: \*\*\* \[Makefile:\d+: lint\] Error 1$", linted.stderr, flags=re.MULTILINE)


def test_make_lint_before_make_setup_says_what_to_run(default_project: Path) -> None:
    """Where ruff is nowhere on PATH (no .venv yet), a clear word rather than "command not found"."""
    path = os.pathsep.join(
        folder for folder in os.environ["PATH"].split(os.pathsep) if not (Path(folder) / "ruff").exists()
    )
    assert shutil.which("ruff", path=path) is None
    linted = subprocess.run(
        ["make", "--no-print-directory", "lint"],
        cwd=default_project,
        env={"PATH": path, "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert linted.returncode == 2
    assert linted.stderr.splitlines()[0] == (
        "ruff is not installed here: run `make setup` first (it creates .venv with ruff)"
    )


def test_ci_lints_with_make_lint(default_project: Path) -> None:
    """One definition of the project's lint: CI runs the target a researcher runs."""
    steps = load(default_project, f"{WORKFLOWS}/ci.yml")["jobs"]["check"]["steps"]
    (lint,) = [s for s in steps if s.get("name") == "Lint"]
    assert lint["run"].strip() == "make lint"


# --- pins and Dependabot --------------------------------------------------------------------------


def uses_lines(workflow: Path) -> list[str]:
    """Each `uses:` value as written, its comment included (YAML drops comments)."""
    text = workflow.read_text()
    found = re.findall(r"^\s*(?:- )?uses:\s*(.+?)\s*$", text, flags=re.MULTILINE)
    steps = [step for job in yaml.safe_load(text)["jobs"].values() for step in job.get("steps", [])]
    assert len(found) == sum("uses" in step for step in steps), f"{workflow.name}: a `uses:` the scan missed"
    return found


def test_every_action_of_the_project_workflows_is_pinned_by_commit_sha(default_project: Path) -> None:
    workflows = sorted((default_project / WORKFLOWS).glob("*.yml"))
    unpinned = [
        f"{w.name}: uses: {value}" for w in workflows for value in uses_lines(w) if not PINNED.match(value)
    ]
    assert not unpinned, "pin each action as owner/repo@<40-hex commit> # vX.Y.Z:\n" + "\n".join(unpinned)
    assert [w.name for w in workflows] == ["ci.yml", "template-upgrade.yml"]
    # One action, one pin: the project's workflows and the template's own move together.
    pins: dict[str, set[str]] = {}
    for workflow in [*workflows, *sorted((TEMPLATE / WORKFLOWS).glob("*.yml"))]:
        for value in uses_lines(workflow):
            action, _, ref = value.partition("@")
            pins.setdefault(action, set()).add(ref)
    assert {action: refs for action, refs in pins.items() if len(refs) > 1} == {}
    assert {"actions/checkout", "docker/login-action"} <= pins.keys()


def test_dependabot_keeps_the_action_pins_current(default_project: Path) -> None:
    path = default_project / ".github/dependabot.yml"
    # Rendered as it is written: nothing in it is Jinja.
    assert path.read_text() == (TEMPLATE / "{{cookiecutter.project}}/.github/dependabot.yml").read_text()
    config = yaml.safe_load(path.read_text())
    assert config["version"] == 2
    (actions,) = config["updates"]
    assert actions["package-ecosystem"] == "github-actions"
    assert actions["directory"] == "/"  # .github/workflows/ under it
    assert actions["schedule"]["interval"] == "weekly"
    # One pull request a week for every action, not one per action; releases a week old.
    assert actions["groups"] == {"actions": {"patterns": ["*"]}}
    assert actions["cooldown"] == {"default-days": 7}


# --- make upgrade and the weekly check ------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The template published with release TAG and a newer release NEXT that changes the README;
    a project generated from TAG (its .cruft.json records the published address)."""
    root = tmp_path_factory.mktemp("released")
    repo = template_repo(root / "ml-template", tag=TAG)
    readme = repo / "{{cookiecutter.project}}/README.md"
    readme.write_text(readme.read_text() + "\nRelease notes live in the template's CHANGELOG.\n")
    git(repo, "commit", "-qam", "README: where release notes live")
    git(repo, "tag", "-a", f"v{NEXT}", "-m", "release N")
    url = publish(repo, root / "ml-template.git")
    project = Path(cookiecutter(url, checkout=TAG, no_input=True, output_dir=str(root / "projects")))
    return project, commit_of(repo, f"v{NEXT}")


def test_weekly_workflow_runs_upgrade_check_on_its_own_schedule(default_project: Path) -> None:
    weekly = load(default_project, UPGRADE_WORKFLOW)
    # PyYAML reads the key `on` as True.
    assert set(weekly[True]) == {"schedule", "workflow_dispatch"}
    assert weekly["permissions"] == {"contents": "read"}
    (job,) = weekly["jobs"].values()
    runs = [s.get("run", "").strip() for s in job["steps"]]
    assert runs.index('make setup\necho "$PWD/.venv/bin" >> "$GITHUB_PATH"') < runs.index(
        "handoff upgrade --check"
    )
    # The pipeline jobs never run on the schedule.
    ci = load(default_project, f"{WORKFLOWS}/ci.yml")
    assert set(ci[True]) == {"push", "pull_request"}


def test_weekly_check_fails_saying_what_the_newer_release_changes(released: tuple[Path, str]) -> None:
    project, commit = released
    (check,) = [
        s for s in load(project, UPGRADE_WORKFLOW)["jobs"]["check"]["steps"] if "upgrade" in s.get("run", "")
    ]
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", check["run"]],
        cwd=project,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"template {__version__} -> {NEXT} (v{NEXT}, {commit[:12]}) from "), lines
    assert "  M README.md" in lines
    assert lines[-1] == f"run `handoff upgrade` (or `make upgrade`) to move to {NEXT}"


def test_make_upgrade_runs_handoff_upgrade_with_to(released: tuple[Path, str], tmp_path: Path) -> None:
    project = Path(shutil.copytree(released[0], tmp_path / "project", symlinks=True))
    unknown = make(project, "upgrade", "TO=v9.9.9")
    assert unknown.returncode == 2
    assert unknown.stdout.splitlines()[0] == "handoff upgrade --to v9.9.9"
    assert (
        f"error: --to v9.9.9: the template has no release tag 'v9.9.9'; its newest: {TAG}, v{NEXT}"
        in unknown.stderr.splitlines()
    )
    (project / "notes.txt").write_text("draft\n")
    dirty = make(project, "upgrade")
    assert dirty.returncode == 2
    assert dirty.stdout.splitlines()[0].rstrip() == "handoff upgrade"
    assert (
        "error: the work tree has uncommitted changes (?? notes.txt): commit or stash them first, so "
        "the upgrade can be reviewed and undone" in dirty.stderr.splitlines()
    )
    assert git(project, "status", "--porcelain") == "?? notes.txt"  # nothing else touched


def test_readme_names_only_targets_the_makefile_has(default_project: Path) -> None:
    listed = make(default_project, "help")
    targets = set(re.findall(r"^  make (\S+)", listed.stdout, flags=re.MULTILINE))
    named = set(re.findall(r"`make (\w[\w-]*)", (default_project / "README.md").read_text()))
    assert {"lint", "upgrade"} <= named
    assert named <= targets, f"README names targets the Makefile lacks: {sorted(named - targets)}"
