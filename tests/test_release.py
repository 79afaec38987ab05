"""`make release`: the version moves everywhere at once, the CHANGELOG is written, the tag is made.

Runs the real script on a git repository made in the test from this tree (tagged as the
current version), then searches the whole released tree for the old version.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

from handoff import __version__

from .conftest import TEMPLATE

pytestmark = pytest.mark.unit

IDENT = ["-c", "user.name=Platform Team", "-c", "user.email=platform@example.com"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *IDENT, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """This tree's tracked files as a fresh repository, tagged v<current>, plus one new commit."""
    repo = tmp_path / "ml-template"
    repo.mkdir()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=TEMPLATE, capture_output=True, check=True)
    for name in tracked.stdout.decode().split("\0"):
        if name and (TEMPLATE / name).is_file():  # as in the working tree, as a release would ship
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TEMPLATE / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "Everything up to the last release")
    git(repo, "tag", "-a", f"v{__version__}", "-m", "previous release")
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nA note.\n")
    git(repo, "commit", "-qam", "Document the upgrade path")
    return repo


def release(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = repo / "scripts" / "release.py"
    return subprocess.run([sys.executable, str(script), *args], cwd=repo, capture_output=True, text=True)


def next_minor(version: str) -> str:
    major, minor, _ = (int(p) for p in version.split("."))
    return f"{major}.{minor + 1}.0"


def test_release_moves_the_version_everywhere_and_writes_changelog_and_tag(
    repo: Path, tmp_path: Path
) -> None:
    new = next_minor(__version__)
    result = release(repo, new, "--skip-tests")
    assert result.returncode == 0, result.stderr
    assert f"tagged v{new}" in result.stdout
    # No place is missed: the old version appears nowhere but in the CHANGELOG's history.
    old = re.compile(rf"(?<![0-9.]){re.escape(__version__)}(?![0-9])")
    leftovers = [
        f"{path}:{n}: {line}"
        for path in git(repo, "ls-files").splitlines()
        if path != "CHANGELOG.md" and (repo / path).is_file()
        for n, line in enumerate((repo / path).read_text(errors="replace").splitlines(), 1)
        if old.search(line)
    ]
    assert leftovers == []
    assert f'__version__ = "{new}"' in (repo / "components/src/handoff/__init__.py").read_text()
    assert git(repo, "status", "--porcelain") == ""  # committed
    assert git(repo, "tag", "--list", f"v{new}").strip() == f"v{new}"
    changelog = (repo / "CHANGELOG.md").read_text()
    assert f"## {new} (" in changelog and "- Document the upgrade path" in changelog
    assert "Everything up to the last release" not in changelog  # only what came since the last tag
    # A project generated from the release pins the new step library and image tag.
    project = Path(cookiecutter(str(repo), no_input=True, output_dir=str(tmp_path / "out")))
    assert f'"ml-handoff=={new}"' in (project / "pyproject.toml").read_text()
    settings = (project / "handoff.yaml").read_text()
    assert f"template_version: {new}" in settings
    assert re.search(rf"^image: \S+:{re.escape(new)}$", settings, re.MULTILINE), settings


def test_release_refuses_a_dirty_tree_and_a_version_that_does_not_move_forward(repo: Path) -> None:
    (repo / "README.md").write_text("uncommitted\n")
    dirty = release(repo, next_minor(__version__), "--skip-tests")
    assert dirty.returncode != 0 and "uncommitted changes" in dirty.stderr
    git(repo, "checkout", "--", "README.md")
    backwards = release(repo, __version__, "--skip-tests")
    assert (
        backwards.returncode != 0
        and f"does not come after the current version {__version__}" in backwards.stderr
    )
    malformed = release(repo, "v1.0", "--skip-tests")
    assert malformed.returncode != 0 and "VERSION must be MAJOR.MINOR.PATCH" in malformed.stderr
    assert git(repo, "tag", "--list").split() == [f"v{__version__}"]  # nothing tagged
