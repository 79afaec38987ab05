"""A generated project on disk: its folder, contract, settings and model.py hooks, loaded once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handoff.contract import Contract, load_contract
from handoff.settings import SETTINGS_FILE, Settings, load_settings

if TYPE_CHECKING:
    from handoff.hooks import ModelModule

STATE_DIR = ".handoff"


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
        """Machine-local state (server pid, logs, scratch); never committed."""
        path = self.root / STATE_DIR
        path.mkdir(exist_ok=True)
        return path

    @property
    def tracking_uri(self) -> str:
        return self.settings.tracking_uri(self.root)
