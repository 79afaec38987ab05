"""Generating from a released version, and upgrading a project to the next release with cruft.

The template is published in the test as a bare git repository (the "GitHub" of the test) made
from this tree: tags, a branch and a default branch. Projects come from it the ways users make
them, `cookiecutter <repo> --checkout <ref>` and `cruft create`, and must record the exact commit.
The upgrade cuts the next release with the real `make release` script and moves a project, whose
researcher has edited model.py and model_card.md, to it with `cruft update`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

from handoff import __version__

from .conftest import TEMPLATE, handoff, project_tests, replace_in
from .template_repo import CRUFT, commit_of, git, next_minor, publish, release, template_repo

pytestmark = pytest.mark.bake

TAG = f"v{__version__}"
RESEARCHER_FILES = ("model.py", "model_card.md")


def cruft(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CRUFT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def record(project: Path) -> dict:
    return json.loads((project / ".cruft.json").read_text())


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The template with a release tag, a feature branch and a newer default branch."""
    root = tmp_path_factory.mktemp("published")
    repo = template_repo(root / "ml-template", tag=TAG)
    git(repo, "checkout", "-qb", "next")
    (repo / "CONTRIBUTING.md").write_text("Work in progress for the next release.\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "Start the next release")
    git(repo, "checkout", "-q", "main")
    replace_in(repo / "README.md", "# ml-template", "# ml-template (main)")
    git(repo, "commit", "-qam", "Say which branch this is")
    return repo, publish(repo, root / "ml-template.git")


@pytest.mark.parametrize("ref", [TAG, "next", None], ids=["tag", "branch", "default-branch"])
def test_cookiecutter_from_a_tag_branch_or_head_records_the_exact_commit(
    published: tuple[Path, str], ref: str | None, tmp_path: Path
) -> None:
    repo, url = published
    project = Path(cookiecutter(url, checkout=ref, no_input=True, output_dir=str(tmp_path)))
    made = record(project)
    assert made["commit"] == commit_of(repo, ref or "main")
    assert made["checkout"] == ref
    assert made["template"] == str(repo.parent / "ml-template.git")
    assert made["context"]["cookiecutter"]["project"] == "digits-classifier"
    assert "_repo_dir" not in made["context"]["cookiecutter"]  # no paths of the machine that made it
    assert (project / "CONTRIBUTING.md").exists() is False  # template files, not the repo's
    status = cruft("check", cwd=project)
    assert (status.returncode == 0) is (ref is None), status.stdout  # only HEAD of main is current


@pytest.mark.parametrize("ref", [TAG, "next"])
def test_cruft_create_from_a_tag_or_branch_records_the_exact_commit(
    published: tuple[Path, str], ref: str, tmp_path: Path
) -> None:
    repo, url = published
    made = cruft("create", url, "--checkout", ref, "--no-input", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    state = record(tmp_path / "digits-classifier")
    assert (state["commit"], state["checkout"]) == (commit_of(repo, ref), ref)


def test_local_folder_generation_says_how_to_link_instead_of_recording_a_commit(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "cookiecutter", str(TEMPLATE), "--no-input", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert not (tmp_path / "digits-classifier" / ".cruft.json").exists()
    assert "cruft link <url>" in made.stderr


def cut_next_release(repo: Path) -> str:
    """The platform team's next release: platform files change, and so do the seeded researcher files."""
    git(repo, "checkout", "-q", "main")
    template = repo / "{{cookiecutter.project}}"
    replace_in(
        template / "Makefile",
        ".PHONY: help setup check run test stop compile",
        ".PHONY: help setup check run test stop compile lint",
    )
    (template / "Makefile").write_text(
        (template / "Makefile").read_text()
        + "\nlint: ## ruff, as CI runs it\n\truff check . && ruff format --check .\n"
    )
    # The seeded example changes on the very line the researcher changed: skipped, not merged.
    starter = template / "starters" / "image-classification"
    replace_in(starter / "model.py", "channels: int = 16  # width", "channels: int = 16  # the width")
    (starter / "model_card.md").write_text((starter / "model_card.md").read_text() + "\n## New section\n")
    git(repo, "commit", "-qam", "Projects get make lint")
    new = next_minor(__version__)
    cut = release(repo, new, "--skip-tests")
    assert cut.returncode == 0, cut.stderr
    return new


def test_cruft_update_to_the_next_release_keeps_the_researchers_work(tmp_path: Path) -> None:
    repo = template_repo(tmp_path / "ml-template", tag=TAG)
    remote = tmp_path / "ml-template.git"
    url = publish(repo, remote)
    project = Path(cookiecutter(url, checkout=TAG, no_input=True, output_dir=str(tmp_path / "projects")))
    # The researcher's work: a wider model and a filled-in card, committed.
    replace_in(project / "model.py", "channels: int = 16", "channels: int = 24")
    (project / "model_card.md").write_text((project / "model_card.md").read_text() + "\nOwner notes.\n")
    ours = {name: (project / name).read_bytes() for name in RESEARCHER_FILES}
    # The project is a repository from its first commit (the post-generation hook's).
    assert git(project, "rev-list", "--count", "HEAD") == "1"
    git(project, "add", "-A")
    git(project, "commit", "-qm", "Our model")

    new = cut_next_release(repo)
    publish(repo, remote)
    updated = cruft("update", "--skip-apply-ask", cwd=project)
    assert updated.returncode == 0, updated.stdout + updated.stderr

    assert sorted(str(p.relative_to(project)) for p in project.rglob("*.rej")) == []
    assert {name: (project / name).read_bytes() for name in RESEARCHER_FILES} == ours
    assert "lint: ## ruff" in (project / "Makefile").read_text()
    # The pins name the template repository at the new release's tag.
    pin = f'"ml-handoff @ git+{url}@v{new}#subdirectory=components"'
    assert pin in (project / "pyproject.toml").read_text()
    assert f"template_version: {new}" in (project / "handoff.yaml").read_text()
    assert f"/ml-handoff:{new}\n" in (project / "Dockerfile").read_text()
    assert record(project)["commit"] == commit_of(repo, "main")
    assert cruft("check", cwd=project).returncode == 0

    git(project, "add", "-A")
    git(project, "commit", "-qm", f"Template {new}")
    checked = handoff("check", cwd=project, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = project_tests(project)
    assert tests.returncode == 0, tests.stdout[-3000:]
