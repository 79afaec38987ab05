"""``handoff upgrade``: move a project to a newer release of its template, and say what is left.

``cruft update`` does the merge, but on its own it compares with the template's branch tip, exits
0 with conflict markers left in files (or ``.rej`` files outside git), and knows nothing of keys a
release renamed. So an upgrade here:

1. refuses a dirty work tree (the upgrade must be reviewable and undoable: ``--abort``);
2. finds the newest ``vX.Y.Z`` release of the template recorded in ``.cruft.json`` (or ``--to``)
   and says what would change: the releases' notes, the template files, the migrations;
3. runs ``cruft update`` to that tag, then the migrations of every release crossed;
4. lists every conflict (unmerged paths, ``.rej`` files) with what to do, and keeps the upgrade's
   state in the repository's git folder (like a merge), so running ``handoff upgrade`` again
   after resolving them finishes it: the rest of the migrations, then ``handoff check``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from handoff import migrations as template_migrations
from handoff.errors import HandoffError
from handoff.git_repo import git, git_run
from handoff.migrations import Migration
from handoff.template_releases import (
    CRUFT_FILE,
    Recorded,
    Release,
    TemplateClone,
    clone,
    parse_version,
    recorded,
    render_errors,
)

Say = Callable[[str], None]
STATE = "handoff-upgrade"  # the upgrade's folder in the repository's git folder, like MERGE_HEAD
MARKERS = ("<<<<<<< ", ">>>>>>> ")


@dataclass(frozen=True)
class Plan:
    """From where to where, and what that crosses."""

    record: Recorded
    base: Release | None  # the newest release the project already has (None: made before any)
    target: Release
    crossed: list[Release]

    @property
    def base_version(self) -> tuple[int, int, int]:
        return self.base.version if self.base else parse_version(self.record.version) or (0, 0, 0)

    @property
    def base_name(self) -> str:
        return self.base.name if self.base else self.record.version or "an unreleased commit"


@dataclass
class State:
    """An upgrade in progress: what it moves between, what is left (saved as JSON)."""

    start: str  # the commit HEAD was at: --abort puts the project's files back as they were there
    base: str
    target: str
    commit: str  # the target's template commit, which .cruft.json records once cruft has run
    conflicts: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # migrations not run yet, oldest first


@dataclass(frozen=True)
class Outcome:
    """What an upgrade run left: ``finished`` when nothing is, and ``handoff check`` should run."""

    base: str
    target: str
    changed: bool
    finished: bool


def check_for_release(project: Path, say: Say) -> bool:
    """``handoff upgrade --check``: True (and what would change) when a newer release exists."""
    record = recorded(project)
    with clone(record.template) as template:
        plan = plan_upgrade(template, record, None, say)
        if plan is None:
            return False
        with tempfile.TemporaryDirectory(prefix="handoff-migrations-") as folder:
            describe(project, template, plan, _migrations(template, plan, Path(folder)), say)
        say(f"run `handoff upgrade` (or `make upgrade`) to move to {plan.target.name}")
        return True


def upgrade(project: Path, to: str | None, say: Say) -> Outcome:
    """Start an upgrade, or go on with the one in progress; see the module docstring."""
    root = project.resolve()
    record = recorded(root)
    where = state_folder(root)
    state = _load_state(where)
    if state and record.commit != state.commit:
        say(
            f"the upgrade to {state.target} that was in progress is no longer in the project "
            f"({CRUFT_FILE} records another template commit): forgetting it"
        )
        shutil.rmtree(where)
        state = None
    if state:
        if to is not None and parse_version(to) != parse_version(state.target):
            raise HandoffError(
                f"an upgrade to {state.target} is in progress: finish it (`handoff upgrade`) or undo "
                "it (`handoff upgrade --abort`) before another"
            )
        say(f"going on with the upgrade from template {state.base} to {state.target}")
        return _settle(root, where, state, [], say)
    _require_clean(root)
    with clone(record.template) as template:
        plan = plan_upgrade(template, record, to, say)
        if plan is None:
            version = record.version or "?"
            return Outcome(base=version, target=version, changed=False, finished=True)
        if where.exists():
            shutil.rmtree(where)
        found = _migrations(template, plan, where)
        describe(root, template, plan, found, say)
        state = State(
            start=git("rev-parse", "HEAD", cwd=root),
            base=plan.base_name,
            target=plan.target.name,
            commit=plan.target.commit,
            pending=[m.name for m in found],
        )
        _save_state(where, state)  # from here on, --abort can undo whatever happens
        unapplied = _cruft_update(root, template, plan.target)
    return _settle(root, where, state, unapplied, say)


def finish(project: Path, outcome: Outcome, say: Say, *, checked: bool = True) -> None:
    """Forget the upgrade's state, stage what it changed (as a merge does) and say what is next."""
    root = project.resolve()
    shutil.rmtree(state_folder(root), ignore_errors=True)
    git("add", "--all", "--", ".", cwd=root)
    done = "handoff check passed" if checked else "handoff check is left for after `make setup`"
    say(
        f"upgraded from template {outcome.base} to {outcome.target}; {done}. Next: review the staged "
        "changes (`git diff --cached`), `make setup` (the new pins), `make test`, then commit"
    )


def abort(project: Path, say: Say) -> None:
    """Put the project back at the commit the upgrade started from, and forget the upgrade."""
    root = project.resolve()
    where = state_folder(root)
    state = _load_state(where)
    if state is None:
        raise HandoffError("no upgrade is in progress here, so there is nothing to abort")
    # The project's files only (it may share a repository with others): tracked ones as at the
    # start commit, and what the upgrade added (.rej files too) removed.
    git("restore", f"--source={state.start}", "--staged", "--worktree", "--", ".", cwd=root)
    git("clean", "-fdq", "--", ".", cwd=root)
    shutil.rmtree(where)
    say(
        f"upgrade to {state.target} aborted: the project's files are back as they were at "
        f"{state.start[:12]} (files created since in the project are gone too)"
    )


def plan_upgrade(template: TemplateClone, record: Recorded, to: str | None, say: Say) -> Plan | None:
    """The release to move to and the releases crossed; None (said why) when there is none."""
    releases = template.releases()
    if not template.has_commit(record.commit):
        raise HandoffError(
            f"the commit .cruft.json records ({record.commit[:12]}) is not in the template repository "
            f"{record.template}; record the release the project was made from: "
            "`cruft link <template url> --checkout vX.Y.Z`, then commit"
        )
    if not releases:
        say(f"the template {record.template} has no release yet (no vX.Y.Z tag): nothing to upgrade to")
        return None
    had = [release for release in releases if template.contains(record.commit, release.commit)]
    base = had[-1] if had else None
    if to is None:
        target = releases[-1]
    else:
        wanted = parse_version(to)
        matches = [release for release in releases if release.version == wanted]
        if not matches:
            names = ", ".join(release.tag for release in releases[-5:])
            raise HandoffError(f"--to {to}: the template has no release tag {to!r}; its newest: {names}")
        target = matches[0]
    if template.contains(record.commit, target.commit):
        if base and target.version < base.version:
            raise HandoffError(
                f"--to {to}: the project already has template {base.name}; handoff upgrade only moves "
                "forward (to go back, revert the commit of the upgrade)"
            )
        newest = ", the newest release" if target == releases[-1] else f" (the newest is {releases[-1].tag})"
        say(f"up to date: the project has template {target.name} ({target.tag}){newest}")
        return None
    start = base.version if base else (-1, -1, -1)
    crossed = [release for release in releases if start < release.version <= target.version]
    return Plan(record=record, base=base, target=target, crossed=crossed)


def describe(project: Path, template: TemplateClone, plan: Plan, found: list[Migration], say: Say) -> None:
    """What the upgrade would change: release notes, template files, migrations."""
    say(
        f"template {plan.base_name} -> {plan.target.name} ({plan.target.tag}, "
        f"{plan.target.commit[:12]}) from {plan.record.template}"
    )
    for release in plan.crossed:
        notes = template.changelog(release)
        if notes:
            say("\n".join(f"  {line}" if line else "" for line in notes.splitlines()) + "\n")
    changes = template.changes(project, plan.record, plan.target.commit, plan.target.tag)
    say("files the upgrade changes:" if changes else "the upgrade changes no file of the project")
    for change in changes:
        say(f"  {change.status} {change.path}")
    for migration in found:
        say(f"migration {migration.name}: {migration.summary}")


def state_folder(root: Path) -> Path:
    """The project's upgrade folder inside the git folder (never committed), one per project of
    the repository, named after the project's path in it."""
    done = git_run("rev-parse", "--show-prefix", cwd=root)
    if done.returncode != 0:
        raise HandoffError(
            "handoff upgrade works on a git repository, so that every change it makes can be "
            "reviewed and undone: `git init -b main && git add -A && git commit -m 'Before the "
            "upgrade'`, then run it again",
            file=root,
        )
    name = done.stdout.strip().strip("/").replace("/", "--") or "root"
    return (root / git("rev-parse", "--git-path", f"{STATE}/{name}", cwd=root)).resolve()


def _require_clean(root: Path) -> None:
    lines = git("status", "--porcelain", "--untracked-files=all", cwd=root).splitlines()
    if lines:
        shown = "; ".join(line.strip() for line in lines[:5]) + (
            f"; and {len(lines) - 5} more" if len(lines) > 5 else ""
        )
        raise HandoffError(
            f"the work tree has uncommitted changes ({shown}): commit or stash them first, so the "
            "upgrade can be reviewed and undone"
        )


def _cruft_update(root: Path, template: TemplateClone, target: Release) -> list[str]:
    """cruft's three-way merge from the recorded commit to ``target``, reading the clone made here.

    Returns git's ``error:`` lines for changes that did not apply at all: where the three-way apply
    fails outright, cruft falls back to ``git apply --reject``, whose refusals (a removal of a file
    the project changed) leave no ``.rej`` file; cruft only prints them."""
    from cruft import update

    said = io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(said),
            contextlib.redirect_stderr(said),
            render_errors(target.tag),
        ):
            applied = update(
                project_dir=root,
                template_path=template.path,
                checkout=target.tag,
                skip_apply_ask=True,
                cookiecutter_input=False,
            )
    except HandoffError:
        raise
    except Exception as exc:  # cruft and GitPython raise their own types
        raise HandoffError(
            f"cruft update to {target.tag} failed: {type(exc).__name__}: {exc} {_last(said)}"
        ) from exc
    if not applied:
        raise HandoffError(f"cruft update to {target.tag} did not apply: {_last(said)}")
    return [line for line in said.getvalue().splitlines() if line.startswith("error: ")]


def _settle(root: Path, where: Path, state: State, unapplied: list[str], say: Say) -> Outcome:
    """Find the conflicts, run the migrations still pending (in order, stopping at the first that
    cannot run: a later one may build on it), save the state, report."""
    conflicts = _conflicts(root, state.conflicts)
    conflicts += [
        ("", f"{path}: the template's change to it did not apply ({reason}): make it by hand")
        for path, reason in _unapplied_files(unapplied).items()
    ]
    migrations = {m.name: m for m in template_migrations.discover(where / template_migrations.FOLDER)}
    left = list(state.pending)
    while left:
        migration = migrations[left[0]]
        try:
            template_migrations.run(migration, root)
        except Exception as exc:  # noqa: BLE001 - a migration is the template's code; any failure is said
            later = (
                " (it runs again with `handoff upgrade` once the conflicts are resolved)" if conflicts else ""
            )
            say(
                f"migration {migration.name} ({migration.summary}) did not finish: "
                f"{type(exc).__name__}: {exc}{later}"
            )
            break
        say(f"migration {migration.name} applied: {migration.summary}")
        left.pop(0)
    state.conflicts = [path for path, _ in conflicts if path]
    state.pending = left
    _save_state(where, state)
    if conflicts or left:
        count = f"{len(conflicts)} conflict{'s' if len(conflicts) != 1 else ''}"
        say(f"the upgrade to {state.target} is not finished: {count}, {len(left)} migration(s) to run")
        for _, advice in conflicts:
            say(f"  {advice}")
        say(
            "then run `handoff upgrade` again to finish (`handoff upgrade --abort` puts the project "
            "back as it was before the upgrade)"
        )
        return Outcome(base=state.base, target=state.target, changed=True, finished=False)
    return Outcome(base=state.base, target=state.target, changed=True, finished=True)


def _unapplied_files(lines: list[str]) -> dict[str, str]:
    """git apply's ``error:`` lines, as the files they name and git's reasons."""
    files: dict[str, None] = {}
    reasons: dict[str, None] = {}
    for line in lines:
        said = line.removeprefix("error: ")
        named = re.fullmatch(r"patch failed: (.+):\d+", said) or re.fullmatch(
            r"(.+): patch does not apply", said
        )
        if named:
            files[named[1]] = None
        elif not said.endswith(":"):  # "while searching for:" introduces lines of the patch
            reasons[said] = None
    why = "; ".join(["patch does not apply", *reasons])
    return {path: f"git: {why}" for path in files}


def _load_state(where: Path) -> State | None:
    path = where / "state.json"
    return State(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def _save_state(where: Path, state: State) -> None:
    where.mkdir(parents=True, exist_ok=True)
    (where / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")


def _conflicts(root: Path, known: list[str]) -> list[tuple[str, str]]:
    """Each conflict left, with what to do. A once-unmerged file now free of markers counts as
    resolved and is staged (``git add``), as git's own ``merge --continue`` expects of the user."""
    found: list[tuple[str, str]] = []
    unmerged = git("diff", "--name-only", "--diff-filter=U", "--relative", cwd=root).splitlines()
    for path in dict.fromkeys([*unmerged, *(p for p in known if not p.endswith(".rej"))]):
        file = root / path
        if file.is_file() and _has_markers(file):
            found.append(
                (
                    path,
                    f"{path}: changed by you and by the template: keep what you want between the "
                    f"<<<<<<< and >>>>>>> lines and delete the markers, then `git add {path}`",
                )
            )
        elif path in unmerged:
            git("add", "--all", "--", path, cwd=root)
    rejects = git("ls-files", "--others", "--exclude-standard", "--", "*.rej", cwd=root).splitlines()
    for path in rejects:
        found.append(
            (
                path,
                f"{path}: part of the template's change to {path.removesuffix('.rej')} did not apply: "
                "make that change by hand (the file holds it as a diff), then delete the .rej file",
            )
        )
    return found


def _has_markers(path: Path) -> bool:
    """git's conflict markers: a ``<<<<<<< `` or ``>>>>>>> `` line (``=======`` alone may be a
    Markdown heading's underline)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    return any(line.startswith(MARKERS) for line in lines)


def _last(said: io.StringIO, lines: int = 3) -> str:
    return " ".join(said.getvalue().strip().splitlines()[-lines:]) or "(cruft said nothing more)"


def _migrations(template: TemplateClone, plan: Plan, folder: Path) -> list[Migration]:
    """The target release's migrations of the releases crossed, its folder copied into ``folder``."""
    template.extract(plan.target.commit, template_migrations.FOLDER, folder)
    found = template_migrations.discover(folder / template_migrations.FOLDER)
    return template_migrations.crossed(found, plan.base_version, plan.target.version)
