"""A researcher's first minutes: generate from a release tag, `make setup`, `make check`, `make run`.

The template is published in the test as a git repository tagged with the current release (the
"GitHub" of the test). A project generated from the tag with plain cookiecutter pins the
platform's packages to that tag of that repository, so `make setup` installs them with nothing
but git and pip; then, in a shell that cannot see this checkout's .venv, the project checks, runs
its whole pipeline and serves (see first_minutes.py). One made with cruft is the same project,
file for file, plus the record `cruft update` reads.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

from handoff import __version__

from .first_minutes import fresh_env, installed, make, setup_check_run_and_ask
from .template_repo import CRUFT, commit_of, publish, template_repo

pytestmark = [pytest.mark.bake, pytest.mark.slow]

TAG = f"v{__version__}"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("first-minutes-git")
    repo = template_repo(root / "ml-template", tag=TAG)
    return repo, publish(repo, root / "ml-template.git")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One researcher's home folder (pip's cache) for every project of this module."""
    return tmp_path_factory.mktemp("home")


def pins(project: Path, address: str) -> None:
    text = (project / "pyproject.toml").read_text()
    for package, folder in (("ml-handoff", "components"), ("ml-handoff-pipelines", "pipelines")):
        assert f'"{package} @ git+{address}@{TAG}#subdirectory={folder}",' in text, text


def from_the_tag(project: Path, repo: Path) -> None:
    """.venv's platform packages are the release tag's, fetched from the template repository."""
    for package in ("ml-handoff", "ml-handoff-pipelines"):
        found = installed(project, package)
        origin = json.loads(found["direct_url"] or "{}")
        assert found["version"] == __version__
        assert origin["vcs_info"]["requested_revision"] == TAG, origin
        assert origin["vcs_info"]["commit_id"] == commit_of(repo, TAG)


def test_cookiecutter_project_sets_itself_up_checks_runs_and_serves(
    published: tuple[Path, str], home: Path, tmp_path: Path
) -> None:
    repo, url = published
    project = Path(cookiecutter(url, checkout=TAG, no_input=True, output_dir=str(tmp_path)))
    pins(project, url)
    env = fresh_env(home)

    before = make(project, "check", env=env)  # the researcher skipped `make setup`
    assert before.returncode != 0
    assert "handoff is not installed here: run `make setup` first" in before.stderr

    setup_check_run_and_ask(project, env)
    from_the_tag(project, repo)
    tests = make(project, "test", env=env, timeout=300)  # the project's own tests, in .venv
    assert tests.returncode == 0, tests.stdout[-3000:]


def test_cruft_project_is_the_cookiecutter_project_and_records_the_tag(
    published: tuple[Path, str], tmp_path: Path
) -> None:
    """cruft makes, file for file, the project the test above sets up, checks, runs and serves
    (so that holds for it too, without installing a second .venv), plus its .cruft.json."""
    repo, url = published
    made = subprocess.run(
        [CRUFT, "create", url, "--checkout", TAG, "--no-input", "--output-dir", str(tmp_path / "cruft")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    project = tmp_path / "cruft" / "digits-classifier"
    # cruft records the repository's path; the pins name it as cookiecutter's project does.
    pins(project, url)
    plain = Path(cookiecutter(url, checkout=TAG, no_input=True, output_dir=str(tmp_path / "plain")))
    assert files_of(project) == files_of(plain)
    record = json.loads((project / ".cruft.json").read_text())
    assert (record["checkout"], record["commit"]) == (TAG, commit_of(repo, TAG))


def files_of(project: Path) -> dict[str, bytes]:
    """Every file a project holds (not git's own, not cruft's record), by relative path."""
    return {
        path.relative_to(project).as_posix(): path.read_bytes()
        for path in sorted(project.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(project).parts and path.name != ".cruft.json"
    }


def test_setup_names_what_is_missing(published: tuple[Path, str], home: Path, tmp_path: Path) -> None:
    _, url = published
    project = Path(cookiecutter(url, checkout=TAG, no_input=True, output_dir=str(tmp_path)))
    env = fresh_env(home)
    cpu = make(project, "setup", "TORCH=cpu", env=env)
    assert cpu.returncode != 0
    assert "TORCH=cpu needs TORCH_CPU_INDEX=<PyTorch's CPU wheel index>" in cpu.stderr
    typo = make(project, "setup", "TORCH=cuda", env=env)
    assert typo.returncode != 0 and "TORCH must be cpu" in typo.stderr
    old = make(project, "setup", "SETUP_PYTHON=/bin/false", env=env)
    assert old.returncode != 0 and "make setup: needs Python 3.11 or newer" in old.stderr
    assert not (project / ".venv").exists()  # nothing half-made
