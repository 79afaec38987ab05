"""The model.py hooks: what a researcher's file must define, the loader that checks it, and the
one place where the researcher's code is called.

model.py stays plain PyTorch and imports nothing from the platform; this module is the only
place that knows the hook names. Conventions the steps rely on:

* every dataset item is ``(inputs, target)``; ``inputs`` is a tensor, or a tuple of tensors in
  the order of ``contract.yaml`` ``inputs``;
* the model is called as ``model(*inputs)`` and returns a tensor, or a tuple in the order of
  ``contract.yaml`` ``outputs``.

Any exception raised while the researcher's code runs becomes a ``HandoffError`` that names what
was running and the line of model.py, so nobody has to read a platform traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from handoff.errors import HandoffError
from handoff.model_source import MODEL_FILE, REQUIRED_HOOKS, precheck_source


class ModelModule(Protocol):
    """What ``model.py`` provides. ``metrics``, ``build_optimizer`` and ``Config.tiny`` are optional."""

    __file__: str
    Config: type

    def build_model(self, cfg: Any) -> nn.Module: ...

    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset]: ...

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor: ...

    def example_inputs(self, cfg: Any) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


def _user_frame(exc: BaseException, path: Path) -> str:
    """'line N: ' of the deepest frame inside model.py, so errors point at the researcher's code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f"line {frames[-1].lineno}: " if frames else ""


@contextlib.contextmanager
def user_code(module: ModelModule | Path, what: str, hint: str = "") -> Iterator[None]:
    """Run researcher code; report a failure as model.py's, with the line and ``what`` was running."""
    path = Path(module if isinstance(module, Path) else module.__file__)
    try:
        yield
    except HandoffError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever model.py raises is the researcher's to fix
        detail = f"{_user_frame(exc, path)}{what} raised {type(exc).__name__}: {exc}"
        raise HandoffError(f"{detail}{f'; {hint}' if hint else ''}", file=path) from None


def call_hook(module: ModelModule, name: str, *args: Any) -> Any:
    """Call one hook of model.py under ``user_code``."""
    with user_code(module, f"{name}()"):
        return getattr(module, name)(*args)


def load_model_module(project_dir: Path) -> ModelModule:
    """Import ``model.py`` from a project folder and check every hook is there and well formed."""
    path = (project_dir / MODEL_FILE).resolve()
    precheck_source(project_dir)  # missing file, syntax error, missing hook names: no import needed
    module_name = f"handoff_user_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: @dataclass and pickling look the module up by name.
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))  # model.py may import helpers that sit beside it
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - sys.exit or argparse at import, too
        sys.modules.pop(module_name, None)
        raise HandoffError(
            f"{_user_frame(exc, path)}importing it raised {type(exc).__name__}: {exc} (model.py must "
            "only define things at import time; run code under `if __name__ == '__main__':`)",
            file=path,
        ) from None
    finally:
        sys.path.remove(str(path.parent))
    _check_hooks(module, path)
    return module  # type: ignore[return-value]


def _check_hooks(module: ModuleType, path: Path) -> None:
    not_callable = [n for n in REQUIRED_HOOKS if not callable(getattr(module, n))]
    if not_callable:
        raise HandoffError(f"hook(s) {', '.join(not_callable)} must be callable", file=path)
    if not dataclasses.is_dataclass(module.Config):
        raise HandoffError(
            "Config must be a @dataclass with a default for every field", file=path, field="Config"
        )
    no_default = [
        f.name
        for f in dataclasses.fields(module.Config)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if no_default:
        raise HandoffError(
            f"field(s) {', '.join(no_default)} need a default: the platform builds "
            "Config() itself and only applies overrides",
            file=path,
            field="Config",
        )
    for optional in ("metrics", "build_optimizer"):
        if hasattr(module, optional) and not callable(getattr(module, optional)):
            raise HandoffError(f"{optional} must be a function", file=path, field=optional)


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
    with user_code(module, "Config(...) with the overrides"):
        return module.Config(**overrides)


def as_tuple(value: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Normalise one tensor or a sequence of tensors to a tuple (the contract's order)."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise HandoffError(
        f"expected a tensor or a tuple of tensors, got {type(value).__name__}", file=MODEL_FILE
    )


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


def hook_outputs(outputs: tuple[torch.Tensor, ...]) -> Any:
    """Give hooks the outputs as the model returns them: one tensor when there is one output."""
    return outputs[0] if len(outputs) == 1 else outputs


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


def score_split(
    module: ModelModule,
    outputs: list[tuple[torch.Tensor, ...]],
    inputs: list[tuple[torch.Tensor, ...]],
    targets: list[Any],
) -> dict[str, float]:
    """``val_loss`` and the researcher's metrics, applied once to a whole split (not batch means).

    Shared by training (torch outputs) and evaluation (ONNX Runtime outputs), so the numbers a
    researcher watches while training are the ones the gate judges.
    """
    with user_code(
        module,
        "joining the batches of the validation split",
        hint="targets must be tensors that torch.cat can join",
    ):
        merged = hook_outputs(tuple(torch.cat(parts) for parts in zip(*outputs, strict=True)))
        batch = hook_batch(
            (tuple(torch.cat(parts) for parts in zip(*inputs, strict=True)), torch.cat(targets))
        )
    values = {"val_loss": float(call_hook(module, "loss", merged, batch))}
    if hasattr(module, "metrics"):
        values.update(metric_values(call_hook(module, "metrics", merged, batch)))
    return values
