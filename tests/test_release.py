"""`make release`: the version moves everywhere at once, the CHANGELOG is written, the tag is made.

Runs the real script on a git repository made in the test from this tree (tagged as the
current version), then searches the whole released tree for the old version.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

from handoff import __version__

from .template_repo import git, next_minor, release, template_repo

pytestmark = pytest.mark.unit


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """This tree as a fresh repository, tagged v<current>, plus one new commit."""
    repo = template_repo(tmp_path / "ml-template", tag=f"v{__version__}")
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nA note.\n")
    git(repo, "commit", "-qam", "Document the upgrade path")
    return repo


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
    assert git(repo, "status", "--porcelain") == ""  # committed, and the build left nothing to commit
    # The wheels projects install, built from the tagged tree (test_first_minutes.py installs them).
    wheels = sorted(path.name for path in (repo / "dist").iterdir())
    assert wheels == [f"ml_handoff-{new}-py3-none-any.whl", f"ml_handoff_pipelines-{new}-py3-none-any.whl"]
    assert "twine upload" in result.stdout and "git push --follow-tags" in result.stdout
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
    assert re.search(
        rf"^ARG PLATFORM_IMAGE=\S+/ml-handoff:{re.escape(new)}$", (project / "Dockerfile").read_text(), re.M
    )
    assert f"ARG VERSION={new}\n" in (repo / "components/Dockerfile").read_text()


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


def test_wheels_alone_builds_the_current_versions_wheels_as_the_release_workflow_does(repo: Path) -> None:
    built = release(repo, "--wheels")
    assert built.returncode == 0, built.stderr
    names = sorted(path.name for path in (repo / "dist").iterdir())
    assert names == [
        f"ml_handoff-{__version__}-py3-none-any.whl",
        f"ml_handoff_pipelines-{__version__}-py3-none-any.whl",
    ]
    assert git(repo, "status", "--porcelain") == ""  # the build leaves nothing to commit
    both = release(repo, "1.0.0", "--wheels")
    assert both.returncode == 2 and "give either a VERSION to release or --wheels" in both.stderr


def test_a_release_whose_wheels_do_not_build_says_it_is_tagged_and_how_to_finish(repo: Path) -> None:
    pyproject = repo / "components/pyproject.toml"
    text = pyproject.read_text().replace('requires-python = ">=3.11"', "requires-python = 3.11")
    pyproject.write_text(text)
    git(repo, "commit", "-qam", "A requires-python that is not a string")
    new = next_minor(__version__)
    result = release(repo, new, "--skip-tests")
    assert result.returncode == 1
    assert f"release: tagged v{new}, but its wheels did not build:" in result.stderr
    assert "requires-python" in result.stderr  # the builder's own reason
    assert "then run `python scripts/release.py --wheels` on the tag" in result.stderr
