"""Read and write training checkpoints: weights plus the exact Config they were trained with."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from handoff.errors import HandoffError
from handoff.files import atomic_write_bytes
from handoff.hooks import call_hook
from handoff.project import Project


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Atomic: export never finds half a checkpoint, even if training is killed mid-write."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(project: Project, path: Path | str) -> tuple[torch.nn.Module, Any]:
    """Rebuild the trained model and its Config (``weights_only``: a checkpoint runs no code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise HandoffError(f"cannot read checkpoint: {exc}", file=path) from None
    cfg = project.config_from_dict(state["config"])
    model = call_hook(project.hooks, "build_model", cfg)
    model.load_state_dict(state["model"])
    return model.eval(), cfg
