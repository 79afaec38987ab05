"""Run the template's migrations: one Python function per release that rewrites a project's files.

``cruft update`` merges what the template renders; it cannot know that a release renamed or moved
a key in ``handoff.yaml`` or ``contract.yaml`` (the contract is the researcher's file, skipped by
every update). So each release that does ships ``migrations/vX_Y_Z.py`` in the template
repository, with ``migrate(project: pathlib.Path) -> None``, and ``handoff upgrade`` runs those of
every release it crosses, oldest first, from the target release's own copy of the folder (so the
migrations and the helpers beside them always come from the same release).

A migration must be idempotent: it runs after cruft's merge, which may already have made the same
change, and runs again when an upgrade resumes after its conflicts are resolved.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from handoff.errors import HandoffError

FOLDER = "migrations"
MODULE = re.compile(r"^v(0|[1-9]\d*)_(0|[1-9]\d*)_(0|[1-9]\d*)\.py$")

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Migration:
    version: Version
    path: Path
    summary: str  # the first line of the module's docstring

    @property
    def name(self) -> str:
        return ".".join(str(part) for part in self.version)


def discover(folder: Path) -> list[Migration]:
    """The migrations in ``folder`` (``vX_Y_Z.py``), oldest first; [] where there is none."""
    found = []
    for path in sorted(folder.glob("v*.py")) if folder.is_dir() else []:
        match = MODULE.match(path.name)
        if not match:
            raise HandoffError(
                f"{path.name} is not named vMAJOR_MINOR_PATCH.py (e.g. v0_2_0.py), so it cannot be "
                "placed among the releases; rename it in the template",
                file=path,
            )
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        version = (int(match[1]), int(match[2]), int(match[3]))
        found.append(Migration(version, path, doc.strip().splitlines()[0] if doc.strip() else path.stem))
    return sorted(found, key=lambda migration: migration.version)


def crossed(migrations: list[Migration], after: Version, upto: Version) -> list[Migration]:
    """Those of the releases after ``after`` up to and including ``upto``."""
    return [m for m in migrations if after < m.version <= upto]


def run(migration: Migration, project: Path) -> None:
    """Import the migration as a module of its folder's package (so it may import helpers beside
    it) and call ``migrate(project)``. Its exceptions propagate: the caller says which failed."""
    migrate = _load(migration)
    migrate(project)


def _load(migration: Migration) -> Callable[[Path], None]:
    folder = migration.path.parent
    # A name of its own per folder: two upgrades in one process never share cached modules.
    package = f"_handoff_template_migrations_{abs(hash(str(folder.resolve())))}"
    for name in [name for name in sys.modules if name == package or name.startswith(f"{package}.")]:
        del sys.modules[name]
    module = types.ModuleType(package)
    module.__path__ = [str(folder)]  # a package of the folder, so migrations import their helpers
    sys.modules[package] = module
    loaded = importlib.import_module(f"{package}.{migration.path.stem}")
    migrate = getattr(loaded, "migrate", None)
    if not callable(migrate):
        raise HandoffError("defines no migrate(project) function", file=migration.path)
    return migrate
