"""The model.py hooks: what a researcher's file must define, and the loader that checks it.

model.py stays plain PyTorch and imports nothing from the platform; this module is the only
place that knows the hook names. Conventions the steps rely on:

* every dataset item is ``(inputs, target)``; ``inputs`` is a tensor, or a tuple of tensors in
  the order of ``contract.yaml`` ``inputs``;
* the model is called as ``model(*inputs)`` and returns a tensor, or a tuple in the order of
  ``contract.yaml`` ``outputs``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from handoff.errors import HandoffError
from handoff.model_source import MODEL_FILE, REQUIRED_HOOKS


class ModelModule(Protocol):
    """What ``model.py`` provides. ``metrics`` and ``Config.tiny`` are optional."""

    Config: type

    def build_model(self, cfg: Any) -> nn.Module: ...

    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset]: ...

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor: ...

    def example_inputs(self, cfg: Any) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


def _user_frame(exc: BaseException, path: Path) -> str:
    """'line N' of the deepest frame inside model.py, so errors point at the researcher's code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f"line {frames[-1].lineno}: " if frames else ""


def load_model_module(project_dir: Path) -> ModelModule:
    """Import ``model.py`` from a project folder and check every required hook is there."""
    path = (project_dir / MODEL_FILE).resolve()
    if not path.is_file():
        raise HandoffError("file not found: every project defines its model here", file=path)
    module_name = f"handoff_user_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: @dataclass and pickling look the module up by name.
    sys.modules[module_name] = module
    # model.py may import helpers that sit beside it.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise HandoffError(f"line {exc.lineno}: syntax error: {exc.msg}", file=path) from None
    except Exception as exc:  # noqa: BLE001 - any import-time failure is the researcher's to fix
        sys.modules.pop(module_name, None)
        where = _user_frame(exc, path)
        raise HandoffError(f"{where}importing it raised {type(exc).__name__}: {exc}", file=path) from None
    finally:
        sys.path.remove(str(path.parent))
    _check_hooks(module, path)
    return module  # type: ignore[return-value]


def _check_hooks(module: ModuleType, path: Path) -> None:
    missing = [name for name in REQUIRED_HOOKS if not hasattr(module, name)]
    if missing:
        raise HandoffError(
            f"missing hook(s) {', '.join(missing)}; model.py must define "
            f"{', '.join(REQUIRED_HOOKS)} (see the template's model.py for each one's signature)",
            file=path,
        )
    not_callable = [n for n in REQUIRED_HOOKS if not callable(getattr(module, n))]
    if not_callable:
        raise HandoffError(f"hook(s) {', '.join(not_callable)} must be callable", file=path)
    if not dataclasses.is_dataclass(module.Config):
        raise HandoffError("Config must be a @dataclass with a default for every field", file=path)
    metrics = getattr(module, "metrics", None)
    if metrics is not None and not callable(metrics):
        raise HandoffError("metrics must be a function (outputs, batch) -> dict", file=path)


def call_hook(module: ModelModule, name: str, *args: Any) -> Any:
    """Call a hook and report a failure inside it as the researcher's error, with its line."""
    path = Path(module.__file__)  # type: ignore[attr-defined]
    try:
        return getattr(module, name)(*args)
    except HandoffError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failing hook is a model.py problem
        where = _user_frame(exc, path)
        raise HandoffError(f"{where}{name}() raised {type(exc).__name__}: {exc}", file=path) from None


def build_optimizer(module: ModelModule, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """model.py's ``build_optimizer(model, cfg)`` when defined, else AdamW at ``cfg.lr``."""
    if hasattr(module, "build_optimizer"):
        return call_hook(module, "build_optimizer", model, cfg)
    return torch.optim.AdamW(model.parameters(), lr=getattr(cfg, "lr", 1e-3))


def make_config(module: ModelModule, overrides: dict[str, Any], *, source: str) -> Any:
    """Build ``Config`` with overrides, rejecting names that are not Config fields."""
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise HandoffError(
            f"Config has no field(s) {', '.join(unknown)}; fields are {', '.join(sorted(fields))}",
            file=source,
            field="training.overrides",
        )
    try:
        return module.Config(**overrides)
    except Exception as exc:  # noqa: BLE001
        raise HandoffError(f"Config(...) rejected the overrides: {exc}", file=source) from None


def as_tuple(value: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Normalise one tensor or a sequence of tensors to a tuple (the contract's order)."""
    if isinstance(value, torch.Tensor):
        return (value,)
    return tuple(value)


def split_batch(batch: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
    """``(inputs, target)`` from a collated batch, with ``inputs`` as a tuple."""
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        length = f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""
        raise HandoffError(
            f"each dataset item must be (inputs, target); got a batch of {type(batch).__name__}{length}",
            file=MODEL_FILE,
            field="build_datasets",
        )
    return as_tuple(batch[0]), batch[1]


def hook_batch(batch: tuple[tuple[torch.Tensor, ...], Any]) -> tuple[Any, Any]:
    """Give hooks the batch as the dataset produced it: one tensor when there is one input."""
    inputs, target = batch
    return (inputs[0] if len(inputs) == 1 else inputs, target)


def metric_values(values: Any) -> dict[str, float]:
    """Check what ``metrics()`` returned and make every value a plain float."""
    if not isinstance(values, dict):
        raise HandoffError(
            f"metrics() must return a dict of name -> number, got {type(values).__name__}",
            file=MODEL_FILE,
            field="metrics",
        )
    try:
        return {str(k): float(v) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise HandoffError(
            f"metrics() values must be numbers: {exc}", file=MODEL_FILE, field="metrics"
        ) from None
