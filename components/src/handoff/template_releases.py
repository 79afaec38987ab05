"""The template a project was generated from: what ``.cruft.json`` records, and its releases.

A release is a ``vX.Y.Z`` tag of the template repository (``make release`` makes them). A project
moves from release to release, never to a branch tip: the tip may hold half a change, and its
version number is still the last release's. The template is cloned once, as a mirror (every
branch and tag), into a temporary folder; the comparisons and ``cruft update`` read that clone.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handoff.errors import HandoffError
from handoff.git_repo import git, git_run

CRUFT_FILE = ".cruft.json"
RELEASE_TAG = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")

Version = tuple[int, int, int]


def parse_version(text: str) -> Version | None:
    """``0.2.0`` or ``v0.2.0`` as a comparable tuple; None for anything else."""
    match = RELEASE_TAG.match(text if text.startswith("v") else f"v{text}")
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def dotted(version: Version) -> str:
    return ".".join(str(part) for part in version)


@dataclass(frozen=True)
class Recorded:
    """What the project records of its template: where it lives, the commit, the version."""

    template: str
    commit: str
    version: str
    state: dict[str, Any]  # the whole record, as cruft reads it


def recorded(project: Path) -> Recorded:
    """Read ``.cruft.json``, with errors that say how to repair it."""
    path = project / CRUFT_FILE
    above = next((folder for folder in project.resolve().parents if (folder / CRUFT_FILE).is_file()), None)
    if not path.is_file() and above:
        raise HandoffError(
            f"this folder is inside the project at {above}: run handoff upgrade there "
            f"(or with --project {above})"
        )
    if not path.is_file():
        raise HandoffError(
            "no template is recorded for this project, so there is nothing to upgrade from: link it "
            "to the template repository once with `cruft link <template url> --checkout vX.Y.Z` "
            "(the release it was made from), commit, then run `handoff upgrade` again",
            file=path,
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        context = state.get("context", {}).get("cookiecutter", {})
        return Recorded(state["template"], state["commit"], str(context.get("_template_version", "")), state)
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise HandoffError(
            f"not a cruft record ({type(exc).__name__}: {exc}); restore it from git "
            "(`git checkout -- .cruft.json`)",
            file=path,
        ) from exc


@dataclass(frozen=True)
class Release:
    version: Version
    tag: str
    commit: str

    @property
    def name(self) -> str:
        return dotted(self.version)


@dataclass(frozen=True)
class Change:
    """One template file that differs between two commits: git's status letter and the project path."""

    status: str
    path: str


class TemplateClone:
    """A mirror clone of the template repository, read with git (no work tree)."""

    def __init__(self, path: Path, address: str) -> None:
        self.path = path
        self.address = address

    def _git(self, *args: str) -> str:
        return git("--git-dir", str(self.path), *args, cwd=self.path)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return git_run("--git-dir", str(self.path), *args, cwd=self.path)

    def releases(self) -> list[Release]:
        """Every ``vX.Y.Z`` tag, oldest first."""
        found = []
        for line in self._git(
            "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/tags"
        ).splitlines():
            tag, _, _ = line.partition(" ")
            version = parse_version(tag) if RELEASE_TAG.match(tag) else None
            if version:
                found.append(Release(version, tag, self._git("rev-parse", f"{tag}^{{commit}}")))
        return sorted(found, key=lambda release: release.version)

    def has_commit(self, commit: str) -> bool:
        return (
            git_run(
                "--git-dir", str(self.path), "cat-file", "-e", f"{commit}^{{commit}}", cwd=self.path
            ).returncode
            == 0
        )

    def contains(self, newer: str, older: str) -> bool:
        """True when ``older`` is ``newer`` or one of its ancestors."""
        return self._run("merge-base", "--is-ancestor", older, newer).returncode == 0

    def changes(self, project: Path, record: Recorded, new: str, release: str) -> list[Change]:
        """The project files an update from the recorded commit to ``new`` changes: both commits
        rendered with the project's answers by cruft's own renderer, less ``[tool.cruft] skip``
        and the files the project deleted, as ``cruft update`` computes its diff."""
        from cruft._commands.utils.generate import cookiecutter_template
        from git import Repo

        with tempfile.TemporaryDirectory(prefix="handoff-render-") as tmp:
            work = Path(tmp)
            repo = Repo.clone_from(str(self.path), work / "repo")
            deleted: set[Path] = set()
            said = io.StringIO()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said), render_errors(release):
                for name, commit in (("old", record.commit), ("new", new)):
                    with _importable(work / "repo" / (record.state.get("directory") or "")):
                        cookiecutter_template(
                            output_dir=work / name,
                            repo=repo,
                            cruft_state=copy.deepcopy(record.state),
                            project_dir=project,
                            checkout=commit,
                            deleted_paths=deleted,
                            update_deleted_paths=name == "old",
                        )
            listed = git_run("diff", "--no-index", "--name-status", "--no-renames", "old", "new", cwd=work)
        found = []
        for line in listed.stdout.splitlines():
            status, _, path = line.partition("\t")
            found.append(Change(status[:1], path.partition("/")[2]))
        return found

    def changelog(self, release: Release) -> str:
        """The release's CHANGELOG.md section (its ``## X.Y.Z`` heading to the next), or ''."""
        text = git_run(
            "--git-dir", str(self.path), "show", f"{release.tag}:CHANGELOG.md", cwd=self.path
        ).stdout
        match = re.search(rf"(?ms)^## {re.escape(release.name)}\b.*?(?=^## |\Z)", text)
        return match.group(0).strip() if match else ""

    def extract(self, commit: str, folder: str, destination: Path) -> bool:
        """Copy ``folder`` at ``commit`` into ``destination``; False where the commit has none."""
        listed = self._git("ls-tree", "--name-only", commit, folder.rstrip("/"))
        if not listed:
            return False
        archive = self._git_bytes("archive", "--format=tar", commit, folder.rstrip("/"))
        destination.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(destination, filter="data")
        return True

    def _git_bytes(self, *args: str) -> bytes:
        done = subprocess.run(["git", "--git-dir", str(self.path), *args], capture_output=True)
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()
            raise HandoffError(f"`git {' '.join(args)}` failed on the template clone: {said}")
        return done.stdout


@contextlib.contextmanager
def clone(address: str) -> Iterator[TemplateClone]:
    """A mirror clone of the template at ``address``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="handoff-template-") as tmp:
        path = Path(tmp) / "template.git"
        done = git_run("clone", "--quiet", "--mirror", address, str(path), cwd=Path(tmp))
        if done.returncode != 0:
            said = done.stderr.strip().splitlines()
            raise HandoffError(
                f"cannot clone the template repository {address} (recorded in {CRUFT_FILE}): "
                f"{said[-1] if said else 'git failed'}; check the address and your access to it"
            )
        yield TemplateClone(path, address)


@contextlib.contextmanager
def render_errors(release: str) -> Iterator[None]:
    """A template that cannot render this project, said in one line: the release's answer checks
    refuse an answer the project recorded (fix it in .cruft.json), or rendering failed."""
    try:
        yield
    except HandoffError:
        raise
    except Exception as exc:  # cookiecutter, Jinja and the template's own checks raise their own types
        lines = getattr(exc, "lines", None)  # the template's answers check (hooks/pre_gen_project.py)
        if lines:
            raise HandoffError(
                f"the template at {release} refuses an answer this project recorded: {'; '.join(lines)}. "
                "Correct it under context.cookiecutter, commit, and run handoff upgrade again",
                file=CRUFT_FILE,
            ) from exc
        raise HandoffError(
            f"the template at {release} cannot render this project: {type(exc).__name__}: {exc}"
        ) from exc


@contextlib.contextmanager
def _importable(template: Path) -> Iterator[None]:
    """The template's own modules importable while it renders, as cookiecutter and cruft make
    them: cookiecutter.json's ``_extensions`` (the answers check) are modules of the template."""
    entry = str(template)
    sys.path.append(entry)
    try:
        yield
    finally:
        sys.path.remove(entry)
