"""A generated project on disk: its folder, contract, settings and model.py hooks, loaded once."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handoff.contract import Contract, load_contract
from handoff.settings import SETTINGS_FILE, Settings, load_settings

if TYPE_CHECKING:
    from handoff.hooks import ModelModule

# Where machine-local state goes (server record, logs, downloaded models, scratch): never into the
# project folder, which is read-only in a pod and which a copy would carry along, with the
# original's server record in it.
STATE_DIR_ENV = "HANDOFF_STATE_DIR"
OWNER_FILE = "project.txt"  # names the folder a state folder belongs to, for people looking


def state_root() -> Path:
    """``HANDOFF_STATE_DIR``, else ``handoff`` in the user's cache folder (XDG), else in /tmp.

    In the images HOME is the /tmp emptyDir, so steps in a pod keep their state there.
    """
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "handoff"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home (a bare container): /tmp is always there
        return Path(tempfile.gettempdir()) / f"handoff-{os.getuid()}"
    return cache if os.access(cache, os.W_OK) else Path(tempfile.gettempdir()) / f"handoff-{os.getuid()}"


def state_dir_of(root: Path) -> Path:
    """The state folder of the project at ``root`` (absolute): named after the folder and keyed by
    its path, so two projects, or a project and its copy, never share a server record."""
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return state_root() / f"{root.name}-{key}"


@dataclass(frozen=True)
class Project:
    root: Path
    contract: Contract
    settings: Settings

    @classmethod
    def load(cls, root: Path | str) -> Project:
        """Validate contract.yaml and handoff.yaml up front: a bad file fails before any work."""
        root = Path(root).resolve()
        return cls(root=root, contract=load_contract(root), settings=load_settings(root))

    @cached_property
    def hooks(self) -> ModelModule:
        # Imported here: loading model.py means importing torch, which register and deploy
        # (and the pipeline runner) never need.
        from handoff.hooks import load_model_module

        return load_model_module(self.root)

    def config(self, extra: dict[str, Any] | None = None) -> Any:
        """model.py's Config with handoff.yaml's overrides (and ``extra``) applied."""
        from handoff.hooks import make_config

        overrides = {**self.settings.training.overrides, **(extra or {})}
        return make_config(self.hooks, overrides, source=str(self.root / SETTINGS_FILE))

    def config_from_dict(self, values: dict[str, Any]) -> Any:
        """Rebuild the exact Config a checkpoint was trained with."""
        from handoff.hooks import make_config

        names = {f.name for f in dataclasses.fields(self.hooks.Config)}
        return make_config(self.hooks, {k: v for k, v in values.items() if k in names}, source="checkpoint")

    @property
    def state_dir(self) -> Path:
        """Machine-local state (server record, logs, downloaded models, scratch), outside the project
        folder (``state_dir_of``); created on first use, readable by this user only."""
        path = state_dir_of(self.root)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = path / OWNER_FILE
        if not owner.exists():
            owner.write_text(f"{self.root}\n")
        return path

    @property
    def tracking_uri(self) -> str:
        return self.settings.tracking_uri(self.root)
