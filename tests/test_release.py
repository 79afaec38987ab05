"""`make release`: the version moves everywhere at once, the CHANGELOG is written, the tag is made.

Runs the real script on a git repository made in the test from this tree (tagged as the
current version, or not tagged at all for a tree's first release), then searches the whole
released tree for the old version. The CHANGELOG's ``## x.y.z (unreleased)`` notes become the
release's section. Before it writes anything a release runs what CI runs (.ci/run's steps); the
unit tests record those steps instead of running the suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

from handoff import __version__

from .conftest import TEMPLATE
from .template_repo import git, next_minor, release, template_repo

pytestmark = pytest.mark.unit

HEADER = "# Changelog\n\nEach release of the template, newest first (written by `make release`).\n\n"


def write_changelog(repo: Path, sections: str) -> None:
    """The CHANGELOG as the platform team left it before releasing, committed."""
    (repo / "CHANGELOG.md").write_text(HEADER + sections)
    git(repo, "commit", "-qam", "Notes for the release")


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
    assert "(unreleased)" not in changelog  # the tagged version's heading is dated, not left above
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
    newest = next_minor(next_minor(__version__))
    git(repo, "tag", "-a", f"v{newest}", "-m", "a release made on another branch")
    behind = release(repo, next_minor(__version__), "--skip-tests")
    assert behind.returncode == 1 and behind.stderr.strip() == (
        f"release: {next_minor(__version__)} does not come after the newest release tag v{newest}"
    )
    git(repo, "tag", "-d", f"v{newest}")
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


def test_the_first_release_of_a_tree_tags_the_version_it_is_at(tmp_path: Path) -> None:
    repo = template_repo(tmp_path / "ml-template")  # never released: no tag at all
    write_changelog(repo, f"## {__version__} (unreleased)\n\n- The spine: cookiecutter a project.\n")
    result = release(repo, __version__, "--skip-tests")
    assert result.returncode == 0, result.stderr
    assert f"released {__version__} (the first release): tagged v{__version__}" in result.stdout
    assert git(repo, "tag", "--list") == f"v{__version__}"
    # The version is already everywhere: the release commit holds the CHANGELOG alone.
    assert git(repo, "show", "--name-only", "--format=", f"v{__version__}^{{commit}}") == "CHANGELOG.md"
    today = date.today().isoformat()
    changelog = (repo / "CHANGELOG.md").read_text()
    assert changelog == HEADER + f"## {__version__} ({today})\n\n- The spine: cookiecutter a project.\n"
    wheels = sorted(path.name for path in (repo / "dist").iterdir())
    assert wheels == [
        f"ml_handoff-{__version__}-py3-none-any.whl",
        f"ml_handoff_pipelines-{__version__}-py3-none-any.whl",
    ]
    # Released once, the version is taken; an older one never was the tree's to release.
    again = release(repo, __version__, "--skip-tests")
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"release: {__version__} does not come after the current version {__version__}, "
        f"which is tagged v{__version__}"
    )
    older = release(repo, "0.0.1", "--skip-tests")
    assert older.returncode == 1
    assert older.stderr.strip() == f"release: 0.0.1 does not come after the current version {__version__}"
    assert git(repo, "tag", "--list") == f"v{__version__}"


def test_a_release_turns_its_unreleased_heading_into_its_dated_section(repo: Path) -> None:
    new = next_minor(__version__)
    notes = "- Upgrades keep the researcher's files.\n  Conflicts are left as markers.\n"
    earlier = f"## {__version__} (2025-01-06)\n\n- The first release.\n"
    write_changelog(repo, f"## {new} (unreleased)\n\n{notes}\n{earlier}")
    result = release(repo, new, "--skip-tests")
    assert result.returncode == 0, result.stderr
    # The hand-written notes are the section; the commit subjects they summarise are not repeated.
    today = date.today().isoformat()
    assert (repo / "CHANGELOG.md").read_text() == HEADER + f"## {new} ({today})\n\n{notes}\n{earlier}"


def test_an_unreleased_heading_of_a_released_version_gets_its_tags_date(tmp_path: Path) -> None:
    repo = template_repo(tmp_path / "ml-template")
    write_changelog(repo, f"## {__version__} (unreleased)\n\n- The first release.\n")
    git(repo, "tag", "-a", f"v{__version__}", "-m", "released before headings were dated")
    tagged = git(repo, "for-each-ref", "--format=%(creatordate:short)", f"refs/tags/v{__version__}")
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nA note.\n")
    git(repo, "commit", "-qam", "Document the upgrade path")
    new = next_minor(__version__)
    result = release(repo, new, "--skip-tests")
    assert result.returncode == 0, result.stderr
    today = date.today().isoformat()
    assert (repo / "CHANGELOG.md").read_text() == HEADER + (
        f"## {new} ({today})\n\n- Document the upgrade path\n\n"
        f"## {__version__} ({tagged})\n\n- The first release.\n"
    )


def stand_ins(repo: Path, tmp_path: Path, dependencies_exit: int = 0) -> tuple[dict[str, str], Path]:
    """The release's test steps, recorded instead of run: the dependency script of the repository
    being released (committed) and a `make` first on PATH (the suite is not a unit test's to run).
    Returns the environment to run the release in and the file the steps are recorded in."""
    log = tmp_path / "ran.log"
    script = repo / "scripts" / "install-test-deps.sh"
    script.write_text(f'#!/bin/sh\necho "$0" >> {log}\nexit {dependencies_exit}\n')
    script.chmod(0o755)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "Record the dependency step")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "make").write_text(f'#!/bin/sh\necho "make $*" >> {log}\n')
    (fake / "make").chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}, log


def release_in(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``make release``'s script, run in ``repo`` with ``env``."""
    script = repo / "scripts" / "release.py"
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=repo, env=env, capture_output=True, text=True
    )


def ran(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_an_unreleased_heading_of_another_version_is_refused_before_anything_runs(
    repo: Path, tmp_path: Path
) -> None:
    env, log = stand_ins(repo, tmp_path)
    new = next_minor(__version__)
    later = next_minor(new)
    write_changelog(repo, f"## {later} (unreleased)\n\n- Notes for a later release.\n")
    result = release_in(repo, env, new)  # no --skip-tests: the refusal comes before the test steps
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"release: CHANGELOG.md: line 5: '## {later} (unreleased)' is not the version being released "
        f"({new}): rename it '## {new} (unreleased)' if its notes are this release's, or release {later}"
    )
    assert ran(log) == []
    assert git(repo, "tag", "--list") == f"v{__version__}" and git(repo, "status", "--porcelain") == ""


def ci_commands() -> list[str]:
    """What .ci/run runs, less the lines that set its shell up."""
    lines = (TEMPLATE / ".ci" / "run").read_text().splitlines()
    setup = ("#", "set ", "cd ", "export ")
    return [line for line in lines if line.strip() and not line.startswith(setup)]


def test_make_release_installs_the_test_dependencies_as_ci_does_then_runs_make_test(
    repo: Path, tmp_path: Path
) -> None:
    assert ci_commands() == ["scripts/install-test-deps.sh", "make test"]
    env, log = stand_ins(repo, tmp_path)
    new = next_minor(__version__)
    result = release_in(repo, env, new)
    assert result.returncode == 0, result.stderr
    assert ran(log) == ["scripts/install-test-deps.sh", "make test"]  # .ci/run's steps, in its order
    assert f"tagged v{new}" in result.stdout


def test_a_failed_dependency_step_stops_the_release_before_anything_is_written(
    repo: Path, tmp_path: Path
) -> None:
    env, log = stand_ins(repo, tmp_path, dependencies_exit=100)
    result = release_in(repo, env, next_minor(__version__))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "release: `scripts/install-test-deps.sh` failed (exit 100); nothing was changed or tagged"
    )
    assert ran(log) == ["scripts/install-test-deps.sh"]  # and not `make test`
    assert git(repo, "tag", "--list") == f"v{__version__}" and git(repo, "status", "--porcelain") == ""
