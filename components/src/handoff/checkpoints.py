"""Training checkpoints: the final weights for export, and resumable training state.

The final checkpoint holds weights plus the exact Config (what export needs). Training state,
written every N steps and at each epoch end, adds the optimizer, RNG states, step and epoch, so a
restarted step continues where the last complete checkpoint left off. Every file is written then
renamed (a reader never sees half of one) and read with ``weights_only=True`` (a checkpoint runs
no code); a file that does not load, such as one cut short by a full disk, is skipped with a
warning and the one before it is used.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch

from handoff.errors import HandoffError
from handoff.files import atomic_write_bytes
from handoff.hooks import call_hook
from handoff.project import Project

STATE_PATTERN = "step-*.pt"
KEEP_STATES = 2


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Atomic: export never finds half a checkpoint, even if training is killed mid-write."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(project: Project, path: Path | str) -> tuple[torch.nn.Module, Any]:
    """Rebuild the trained model and its Config (``weights_only``: a checkpoint runs no code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several unrelated types for a bad file
        raise HandoffError(f"cannot read checkpoint: {exc}", file=path) from None
    cfg = project.config_from_dict(state["config"])
    model = call_hook(project.hooks, "build_model", cfg)
    model.load_state_dict(state["model"])
    return model.eval(), cfg


def save_state(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``step-<n>.pt`` and keep only the newest few."""
    path = folder / f"step-{step:09d}.pt"
    save_checkpoint(path, state)
    for old in sorted(folder.glob(STATE_PATTERN))[:-KEEP_STATES]:
        old.unlink(missing_ok=True)
    return path


def state_step(path: Path | str) -> int:
    """The optimizer step a state file was written at (its name says it: ``step-<n>.pt``)."""
    return int(Path(path).stem.split("-")[1])


def newest_state_step(folder: Path) -> int:
    """The step of the newest state file in ``folder`` (-1 when there is none)."""
    return max((state_step(path) for path in folder.glob(STATE_PATTERN)), default=-1)


def latest_state(folder: Path) -> dict[str, Any] | None:
    """The newest training state that loads completely, or None to start from scratch."""
    for path in sorted(folder.glob(STATE_PATTERN), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt: fall back to the previous one
            print(
                f"handoff: warning: ignoring unreadable checkpoint {path} ({type(exc).__name__}); "
                "using the one before it",
                file=sys.stderr,
                flush=True,
            )
            continue
        state["path"] = str(path)
        return state
    return None
