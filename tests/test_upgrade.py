"""Generating from a released version, and upgrading a project to the next release with cruft.

The template is published in the test as a bare git repository (the "GitHub" of the test) made
from this tree: tags, a branch and a default branch. Projects come from it the ways users make
them, `cookiecutter <repo> --checkout <ref>` and `cruft create`, and must record the exact commit.
The upgrade cuts the next release with the real `make release` script and moves a project, whose
researcher has edited model.py and model_card.md, to it with `cruft update`.
"""

from __future__ import annotations

import json
import re
import shutil
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


NEXT = next_minor(__version__)
# The scratch release's migration: release N-1 called the SLO key p99_latency_ms; N calls it
# latency_p99_ms (today's name, which the installed handoff reads).
MIGRATION = '''"""Rename contract.yaml's slo.p99_latency_ms to slo.latency_p99_ms."""

from pathlib import Path

from .yaml_keys import edit, rename


def migrate(project: Path) -> None:
    with edit(project / "contract.yaml") as contract:
        rename(contract, "slo.p99_latency_ms", "slo.latency_p99_ms")
'''


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Release N-1 (this tree with the old SLO key name) and release N (this tree, a Makefile and
    a handoff.yaml change, the migration), published; N is cut by the real release script."""
    root = tmp_path_factory.mktemp("releases")
    repo = template_repo(root / "ml-template")
    template = repo / "{{cookiecutter.project}}"
    contract = template / "starters" / "image-classification" / "contract.yaml"
    replace_in(contract, "  latency_p99_ms: 25 ", "  p99_latency_ms: 25 ")
    git(repo, "commit", "-qam", "The SLO key as release N-1 named it")
    git(repo, "tag", "-a", TAG, "-m", "release N-1")
    replace_in(contract, "  p99_latency_ms: 25 ", "  latency_p99_ms: 25 ")
    (repo / "migrations" / f"v{NEXT.replace('.', '_')}.py").write_text(MIGRATION)
    replace_in(template / "Makefile", "\t$(PYTHON) -m pytest -q\n", "\t$(PYTHON) -m pytest -q -ra\n")
    replace_in(
        template / "handoff.yaml",
        "training:\n",
        "# Training: how the pipeline's train step runs.\ntraining:\n",
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "Rename slo.p99_latency_ms; make test reports skips")
    cut = release(repo, NEXT, "--skip-tests")
    assert cut.returncode == 0, cut.stderr
    return repo, publish(repo, root / "ml-template.git")


def project_of(url: str, where: Path, ref: str = TAG) -> Path:
    return Path(cookiecutter(url, checkout=ref, no_input=True, output_dir=str(where)))


def edit_as_users_do(project: Path) -> dict[str, bytes]:
    """The researcher's model, card and SLO, the platform user's port and a Makefile line the
    release changes too, committed; the researcher's files as they are then."""
    replace_in(project / "model.py", "channels: int = 16", "channels: int = 24")
    (project / "model_card.md").write_text((project / "model_card.md").read_text() + "\nOwner notes.\n")
    replace_in(project / "contract.yaml", "  p99_latency_ms: 25 ", "  p99_latency_ms: 40 ")
    replace_in(project / "handoff.yaml", "  port: 8080 ", "  port: 9090 ")
    replace_in(project / "Makefile", "\t$(PYTHON) -m pytest -q\n", "\t$(PYTHON) -m pytest -q -x\n")
    git(project, "commit", "-qam", "Our model, our SLO, our port, stop at the first failure")
    return {name: (project / name).read_bytes() for name in RESEARCHER_FILES}


def test_upgrade_stops_on_a_conflict_migrates_and_finishes_once_it_is_resolved(
    releases: tuple[Path, str], tmp_path: Path
) -> None:
    repo, url = releases
    project = project_of(url, tmp_path)
    ours = edit_as_users_do(project)

    (project / "notes.txt").write_text("draft\n")
    dirty = handoff("upgrade", cwd=project)
    assert dirty.returncode == 1
    assert dirty.stderr.strip() == (
        "error: the work tree has uncommitted changes (?? notes.txt): commit or stash them first, "
        "so the upgrade can be reviewed and undone"
    )
    (project / "notes.txt").unlink()

    checked = handoff("upgrade", "--check", cwd=project)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"template {__version__} -> {NEXT} (v{NEXT}, " in checked.stdout
    # What the update changes in this project (rendered with its answers), not the project's own edits.
    changed = dict(reversed(pair) for pair in re.findall(r"^  ([AMD]) (\S+)$", checked.stdout, flags=re.M))
    assert {"Makefile", "handoff.yaml", "pyproject.toml", "Dockerfile"} <= changed.keys()
    assert not changed.keys() & {*RESEARCHER_FILES, "contract.yaml", "notes.txt"}
    assert "- Rename slo.p99_latency_ms; make test reports skips" in checked.stdout  # the release notes
    assert (
        f"migration {NEXT}: Rename contract.yaml's slo.p99_latency_ms to slo.latency_p99_ms."
        in checked.stdout
    )

    stopped = handoff("upgrade", cwd=project)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert (
        "  Makefile: changed by you and by the template: keep what you want between the <<<<<<< and "
        ">>>>>>> lines and delete the markers, then `git add Makefile`"
    ) in stopped.stdout
    assert f"the upgrade to {NEXT} is not finished: 1 conflict, 0 migration(s) to run" in stopped.stdout
    assert f"migration {NEXT} applied" in stopped.stdout
    assert {name: (project / name).read_bytes() for name in RESEARCHER_FILES} == ours
    contract = (project / "contract.yaml").read_text()
    assert (
        "  latency_p99_ms: 40          # ONNX Runtime, one request of latency_batch_size items\n" in contract
    )
    assert "p99_latency_ms:" not in contract.replace("latency_p99_ms", "")
    settings = (project / "handoff.yaml").read_text()
    assert "  port: 9090 " in settings and "# Training: how the pipeline's train step runs." in settings
    assert record(project)["commit"] == commit_of(repo, f"v{NEXT}")

    again = handoff("upgrade", cwd=project)  # nothing resolved yet: the same conflict, exit 1
    assert again.returncode == 1 and "  Makefile: changed by you and by the template" in again.stdout

    makefile = (project / "Makefile").read_text()
    resolved = re.sub(
        r"<<<<<<< [^\n]*\n.*?>>>>>>> [^\n]*\n", "\t$(PYTHON) -m pytest -q -ra -x\n", makefile, flags=re.S
    )
    assert resolved != makefile
    (project / "Makefile").write_text(resolved)
    git(project, "add", "Makefile")
    finished = handoff("upgrade", cwd=project, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"upgraded from template {__version__} to {NEXT}; handoff check passed." in finished.stdout
    assert handoff("upgrade", "--check", cwd=project).returncode == 0

    # The pins name the template repository at the new release's tag.
    pin = f'"ml-handoff @ git+{url}@v{NEXT}#subdirectory=components"'
    assert pin in (project / "pyproject.toml").read_text()
    assert f"template_version: {NEXT}" in (project / "handoff.yaml").read_text()
    assert f"/ml-handoff:{NEXT}\n" in (project / "Dockerfile").read_text()
    git(project, "commit", "-qam", f"Template {NEXT}")
    tests = project_tests(project)
    assert tests.returncode == 0, tests.stdout[-3000:]


def test_abort_puts_the_project_back_as_it_was(releases: tuple[Path, str], tmp_path: Path) -> None:
    _, url = releases
    project = project_of(url, tmp_path)
    edit_as_users_do(project)
    before = git(project, "rev-parse", "HEAD")
    assert handoff("upgrade", cwd=project).returncode == 1
    aborted = handoff("upgrade", "--abort", cwd=project)
    assert aborted.returncode == 0, aborted.stderr
    assert (
        f"upgrade to {NEXT} aborted: the project's files are back as they were at {before[:12]}"
    ) in aborted.stdout
    assert git(project, "status", "--porcelain") == ""
    assert "\t$(PYTHON) -m pytest -q -x\n" in (project / "Makefile").read_text()
    nothing = handoff("upgrade", "--abort", cwd=project)
    assert nothing.returncode == 1
    assert nothing.stderr.strip() == "error: no upgrade is in progress here, so there is nothing to abort"


def test_upgrade_names_releases_not_the_branch_tip(releases: tuple[Path, str], tmp_path: Path) -> None:
    _, url = releases
    project = project_of(url, tmp_path, ref=f"v{NEXT}")
    current = handoff("upgrade", "--check", cwd=project)
    assert current.returncode == 0, current.stdout + current.stderr
    assert f"up to date: the project has template {NEXT} (v{NEXT}), the newest release" in current.stdout
    unknown = handoff("upgrade", "--to", "v9.9.9", cwd=project)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        f"error: --to v9.9.9: the template has no release tag 'v9.9.9'; its newest: {TAG}, v{NEXT}"
    )
    older = handoff("upgrade", "--to", TAG, cwd=project)
    assert older.returncode == 1 and "handoff upgrade only moves forward" in older.stderr


def test_a_template_without_releases_has_nothing_to_upgrade_to(tmp_path: Path) -> None:
    repo = template_repo(tmp_path / "ml-template")
    url = publish(repo, tmp_path / "ml-template.git")
    project = project_of(url, tmp_path / "projects", ref=None)
    checked = handoff("upgrade", "--check", cwd=project)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (
        f"the template {tmp_path / 'ml-template.git'} has no release yet (no vX.Y.Z tag): "
        "nothing to upgrade to" in checked.stdout
    )


def test_upgrade_outside_git_says_why_it_needs_a_repository(
    releases: tuple[Path, str], tmp_path: Path
) -> None:
    _, url = releases
    project = project_of(url, tmp_path)
    shutil.rmtree(project / ".git")
    outside = handoff("upgrade", cwd=project)
    assert outside.returncode == 1
    assert (
        "handoff upgrade works on a git repository, so that every change it makes can be reviewed and undone"
        in outside.stderr
    )
    assert not list(project.rglob("*.rej"))


def cut(repo: Path, version: str, message: str) -> None:
    """A release by hand (the version in cookiecutter.json, a commit, a tag): fast, for scratch templates."""
    replace_in(
        repo / "cookiecutter.json",
        f'"_template_version": "{__version__}"',
        f'"_template_version": "{version}"',
    )
    git(repo, "add", "-A")
    git(repo, "commit", "--allow-empty", "-qm", message)
    git(repo, "tag", "-a", f"v{version}", "-m", message)
    replace_in(
        repo / "cookiecutter.json",
        f'"_template_version": "{version}"',
        f'"_template_version": "{__version__}"',
    )


RENAME = '''"""Rename {old} to {new} in {file}."""

from pathlib import Path

from .yaml_keys import edit, rename


def migrate(project: Path) -> None:
    with edit(project / "{file}") as document:
        rename(document, "{old}", "{new}")
'''


def test_a_migration_held_back_by_a_conflict_holds_back_the_later_ones(tmp_path: Path) -> None:
    """1.2.0 renames serving.port (its handoff.yaml line conflicts with the project's edit), 1.3.0
    renames slo.latency_p99_ms: once 1.2.0 cannot run, 1.3.0 waits for it, then both run in order."""
    repo = template_repo(tmp_path / "ml-template")
    cut(repo, "1.1.0", "First")
    replace_in(repo / "{{cookiecutter.project}}/handoff.yaml", "  port: 8080   ", "  http_port: 8080")
    (repo / "migrations/v1_2_0.py").write_text(
        RENAME.format(file="handoff.yaml", old="serving.port", new="serving.http_port")
    )
    cut(repo, "1.2.0", "Rename serving.port")
    (repo / "migrations/v1_3_0.py").write_text(
        RENAME.format(file="contract.yaml", old="slo.latency_p99_ms", new="slo.p99_budget_ms")
    )
    cut(repo, "1.3.0", "Rename slo.latency_p99_ms")
    url = publish(repo, tmp_path / "ml-template.git")
    project = project_of(url, tmp_path / "projects", ref="v1.1.0")
    replace_in(project / "handoff.yaml", "  port: 8080 ", "  port: 9090 ")
    git(project, "commit", "-qam", "Our port")

    stopped = handoff("upgrade", cwd=project)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert (
        "migration 1.2.0 (Rename serving.port to serving.http_port in handoff.yaml.) did not finish: "
        in stopped.stdout
    )
    assert "migration 1.3.0 applied" not in stopped.stdout
    assert "the upgrade to 1.3.0 is not finished: 1 conflict, 2 migration(s) to run" in stopped.stdout
    assert "  latency_p99_ms: 25 " in (project / "contract.yaml").read_text()

    settings = (project / "handoff.yaml").read_text()
    resolved = re.sub(r"<<<<<<< [^\n]*\n.*?>>>>>>> [^\n]*\n", "  port: 9090\n", settings, flags=re.S)
    (project / "handoff.yaml").write_text(resolved)  # the old key, the project's value: 1.2.0 renames it
    finished = handoff("upgrade", cwd=project, timeout=300)
    assert "migration 1.2.0 applied" in finished.stdout and "migration 1.3.0 applied" in finished.stdout
    assert finished.stdout.index("migration 1.2.0 applied") < finished.stdout.index("migration 1.3.0 applied")
    assert "  http_port: 9090" in (project / "handoff.yaml").read_text()
    assert "  p99_budget_ms: 25 " in (project / "contract.yaml").read_text()
    # The installed handoff reads today's keys, not 1.3.0's: the check that fails is left to the new pins.
    assert finished.returncode == 1
    assert (
        f"error: the upgrade to 1.3.0 is applied, but handoff check fails with the ml-handoff installed "
        f"here ({__version__}; the project now pins 1.3.0): run `make setup`, then `make check`."
    ) in finished.stderr
    assert handoff("upgrade", "--check", cwd=project).returncode == 0  # nothing left in progress


def test_an_upgrade_undone_by_hand_is_forgotten_not_reported_finished(
    releases: tuple[Path, str], tmp_path: Path
) -> None:
    _, url = releases
    project = project_of(url, tmp_path)
    edit_as_users_do(project)
    assert handoff("upgrade", cwd=project).returncode == 1
    git(project, "reset", "-q", "--hard")
    git(project, "clean", "-fdq")
    again = handoff("upgrade", cwd=project)
    assert again.stdout.startswith(
        f"the upgrade to {NEXT} that was in progress is no longer in the project (.cruft.json records "
        "another template commit): forgetting it\n"
    ), again.stdout
    assert again.returncode == 1 and "  Makefile: changed by you and by the template" in again.stdout


def test_a_recorded_answer_the_release_refuses_is_one_line_naming_cruft_json(
    releases: tuple[Path, str], tmp_path: Path
) -> None:
    _, url = releases
    project = project_of(url, tmp_path)
    state = record(project)
    state["context"]["cookiecutter"]["mlflow_tracking_uri"] = "databricks-uc"  # accepted by older checks
    (project / ".cruft.json").write_text(json.dumps(state, indent=2) + "\n")
    git(project, "commit", "-qam", "An answer older checks took")
    checked = handoff("upgrade", "--check", cwd=project)
    assert checked.returncode == 1
    assert checked.stderr.splitlines()[-1].startswith(
        f"error: .cruft.json: the template at v{NEXT} refuses an answer this project recorded: "
        "mlflow_tracking_uri 'databricks-uc' must be databricks or databricks://<profile>. Correct it"
    ), checked.stderr
    assert "Traceback" not in checked.stderr


def test_a_change_that_does_not_apply_at_all_is_a_conflict(tmp_path: Path) -> None:
    """A release removes a file the project changed: git's fallback apply refuses it without a
    .rej file, which cruft only prints."""
    repo = template_repo(tmp_path / "ml-template")
    cut(repo, "1.1.0", "First")
    (repo / "{{cookiecutter.project}}/.dockerignore").unlink()
    cut(repo, "1.2.0", "No .dockerignore")
    url = publish(repo, tmp_path / "ml-template.git")
    project = project_of(url, tmp_path / "projects", ref="v1.1.0")
    (project / ".dockerignore").write_text((project / ".dockerignore").read_text() + "secrets/\n")
    git(project, "commit", "-qam", "Keep secrets out of the image")
    stopped = handoff("upgrade", cwd=project)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert (
        "  .dockerignore: the template's change to it did not apply (git: patch does not apply; "
        "removal patch leaves file contents): make it by hand"
    ) in stopped.stdout
