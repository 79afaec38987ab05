"""The model.py hooks: what a researcher's file must define, the loader that checks it, and the
one place where the researcher's code is called.

model.py stays plain PyTorch and imports nothing from the platform; this module is the only
place that knows the hook names. Conventions the steps rely on:

* every dataset item is ``(inputs, target)``; ``inputs`` is a tensor, or a tuple of tensors in
  the order of ``contract.yaml`` ``inputs``; ``target`` is a tensor, a tuple/list of tensors or
  a dict name -> tensor (several targets), joined batch to batch leaf by leaf;
* the model is called as ``model(*inputs)``: one positional argument per contract input, in
  order (``model(input_ids, attention_mask)``, never ``model(inputs)``);
* it returns a tensor, a tuple/list of tensors in the order of ``contract.yaml`` ``outputs``, or a
  dict (a HuggingFace ``ModelOutput`` is one) holding every output name as a key; other keys are
  ignored. ``contract_outputs`` turns any of these into the contract's tuple, which is what ONNX
  export, parity and serving see;
* ``loss``, ``metrics`` and ``slices`` get the batch as the dataset yields it (one tensor when
  there is one input) and the outputs as the contract lists them: the tensor when there is one,
  else a tuple in contract order that also answers to the output names (``outputs["logits"]``,
  ``outputs.logits``), the same in training (torch) and evaluation (ONNX Runtime);
* on a validation split they see chunks of a fixed number of items, as many as hold
  ``CHUNK_BYTES`` of inputs and targets (the whole split when it is smaller), one chunk in memory
  at a time, so a split need not fit in memory (``SplitMeans``). The chunks are cut at the same
  items whatever the batch size and whether a champion is scored too, so training's validation
  and evaluation's gate see the same numbers.

Any exception raised while the researcher's code runs becomes a ``HandoffError`` that names what
was running and the line of model.py, so nobody has to read a platform traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from handoff.errors import HandoffError
from handoff.model_source import (  # user_code lives there: the model server needs it without torch
    MODEL_FILE,
    RAW_HOOKS,
    REQUIRED_HOOKS,
    _user_frame,
    precheck_source,
    user_code,
)

MODULE_NAME = "model"


class ModelModule(Protocol):
    """What ``model.py`` provides. ``metrics``, ``slices``, ``build_optimizer``, ``data_version``
    and ``Config.tiny`` are optional."""

    __file__: str
    Config: type

    def build_model(self, cfg: Any) -> nn.Module: ...

    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset]: ...

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor: ...

    def example_inputs(self, cfg: Any) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


class Outputs(Protocol):
    """What ``contract_outputs`` needs of the contract (kept structural: no import cycle)."""

    @property
    def output_names(self) -> list[str]: ...


def call_hook(module: ModelModule, name: str, *args: Any) -> Any:
    """Call one hook of model.py under ``user_code``."""
    with user_code(module, f"{name}()"):
        return getattr(module, name)(*args)


def load_model_module(project_dir: Path) -> ModelModule:
    """Import ``model.py`` from a project folder and check every hook is there and well formed."""
    path = (project_dir / MODEL_FILE).resolve()
    precheck_source(project_dir)  # missing file, syntax error, missing hook names: no import needed
    # One stable name, the file's own: the name is written into the exported ONNX graph (each
    # node's module path), so a name that changed per process or per folder would change the
    # model's sha256; and the project's own tests, which `import model`, see the same classes.
    module_name = MODULE_NAME
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
    for optional in ("metrics", "build_optimizer", "data_version", *RAW_HOOKS):
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


def contract_outputs(value: Any, contract: Outputs) -> tuple[torch.Tensor, ...]:
    """What the model returned, as the contract's outputs in the contract's order.

    A tensor, a tuple/list of tensors (already in contract order), or a mapping (a dict, or a
    HuggingFace ``ModelOutput``) from which the contract's names are taken and the rest (hidden
    states, a loss) left out. Counts, shapes and dtypes are checked by the caller against the specs.
    """
    names = contract.output_names
    if isinstance(value, Mapping):
        missing = [name for name in names if not isinstance(value.get(name), torch.Tensor)]
        if missing:
            raise HandoffError(
                f"the model returned a {type(value).__name__} without contract output(s) {missing}; "
                f"its keys are {[str(k) for k in value]} (contract.yaml outputs name the keys to "
                "serve, in order)",
                file=MODEL_FILE,
                field="build_model",
            )
        return tuple(value[name] for name in names)
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    found = type(value).__name__
    if isinstance(value, (tuple, list)):
        found += f" holding {', '.join(sorted({type(v).__name__ for v in value}))}"
    raise HandoffError(
        f"the model returned a {found}; it must return a tensor, a tuple of tensors in the order "
        f"of contract.yaml outputs ({', '.join(names)}), or a dict with those names as keys",
        file=MODEL_FILE,
        field="build_model",
    )


class NamedOutputs(tuple[torch.Tensor, ...]):
    """Several outputs in contract order that also answer to their names.

    Hooks see the same object in training (torch outputs) and in evaluation (ONNX Runtime's), so
    a loss written against the model's dict (``outputs["logits"]``, ``outputs.logits``) and one
    that unpacks a tuple both work in both places.
    """

    names: tuple[str, ...]

    def __new__(cls, values: Sequence[torch.Tensor], names: Sequence[str]) -> NamedOutputs:
        self = super().__new__(cls, values)
        self.names = tuple(names)
        return self

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"{key!r}: the contract's outputs are {list(self.names)}")
            return super().__getitem__(self.names.index(key))
        return super().__getitem__(key)

    def __getattr__(self, name: str) -> torch.Tensor:
        if name != "names" and name in self.__dict__.get("names", ()):
            return self[name]
        raise AttributeError(name)

    def __contains__(self, key: object) -> bool:
        return key in self.names if isinstance(key, str) else any(key is v for v in self)

    def keys(self) -> tuple[str, ...]:
        return self.names

    def values(self) -> tuple[torch.Tensor, ...]:
        return tuple(self)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, self, strict=True))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.names else default


def split_batch(batch: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
    """``(inputs, target)`` from a collated batch, with ``inputs`` as a tuple."""
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        length = f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""
        raise HandoffError(
            f"each dataset item must be (inputs, target); got a batch of {type(batch).__name__}{length}",
            file=MODEL_FILE,
            field="build_datasets",
        )
    try:
        inputs = as_tuple(batch[0])
    except HandoffError:
        raise HandoffError(
            f"an item's inputs must be a tensor or a tuple of tensors (in the order of contract.yaml "
            f"inputs); got {type(batch[0]).__name__}",
            file=MODEL_FILE,
            field="build_datasets",
        ) from None
    return inputs, batch[1]


def hook_batch(batch: tuple[tuple[torch.Tensor, ...], Any]) -> tuple[Any, Any]:
    """Give hooks the batch as the dataset produced it: one tensor when there is one input."""
    inputs, target = batch
    return (inputs[0] if len(inputs) == 1 else inputs, target)


def hook_outputs(outputs: tuple[torch.Tensor, ...], names: Sequence[str] = ()) -> Any:
    """Give hooks the outputs: the tensor when there is one, else the tuple (named, given ``names``)."""
    if len(outputs) == 1:
        return outputs[0]
    return NamedOutputs(outputs, names) if names else outputs


def model_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], contract: Outputs) -> Any:
    """Call ``model(*inputs)`` and give back the outputs as hooks get them (``hook_outputs``)."""
    return hook_outputs(contract_outputs(model(*inputs), contract), contract.output_names)


def map_leaves(value: Any, change: Any) -> Any:
    """``value`` (a target: tensor, tuple/list or dict of them, nested) with ``change`` applied to
    each tensor; collated tuples come back from the DataLoader as lists and stay lists."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, Mapping):
        return {k: map_leaves(v, change) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_leaves(v, change) for v in value)
    return value


def join_batches(parts: Sequence[Any]) -> Any:
    """Batches of a split joined into one, leaf by leaf (tensors, tuples/lists, dicts of them)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return {k: join_batches([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(join_batches(column) for column in zip(*parts, strict=True))
    raise TypeError(
        f"cannot join batches of {type(first).__name__}: use tensors (or tuples or dicts of them)"
    )


def items_in_batch(inputs: tuple[torch.Tensor, ...]) -> int:
    """Items in a batch: the first input's batch axis (a target may be a tuple or a dict)."""
    return int(inputs[0].shape[0])


def describe_target(target: Any) -> str:
    if isinstance(target, torch.Tensor):
        return "a tensor"
    if isinstance(target, Mapping):
        return f"a dict with keys {[str(k) for k in target]}"
    return f"a {type(target).__name__} of {len(target)}"


def scored_target(target: Any, task: Any, scored_name: str) -> tuple[torch.Tensor, str]:
    """The target the evaluation suite compares with, and how to say which one it is.

    ``task`` is the contract's ``Task``: ``task.target`` picks a dict key or a tuple index; without
    it a lone target is taken, or for a dict the key named like the scored output.
    """
    field = "task.target"
    choice = task.target
    if isinstance(target, torch.Tensor):
        if choice not in (None, 0):
            raise HandoffError(
                f"is {choice!r}, but the datasets yield one target tensor (leave task.target out)",
                file="contract.yaml",
                field=field,
            )
        return target, "the target"
    if isinstance(target, Mapping):
        key = choice if choice is not None else (scored_name if scored_name in target else None)
        if key is None and len(target) == 1:
            key = next(iter(target))
        if key is None or key not in target:
            raise HandoffError(
                f"the targets are {describe_target(target)}: name the one the evaluation suite "
                f"compares with output '{scored_name}'"
                + (f" ({choice!r} is not one of them)" if choice is not None else ""),
                file="contract.yaml",
                field=field,
            )
        value, label = target[key], f"target {key!r}"
    elif isinstance(target, (tuple, list)):
        index = choice if choice is not None else (0 if len(target) == 1 else None)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(target):
            raise HandoffError(
                f"the targets are {describe_target(target)}: give the index of the one the "
                f"evaluation suite compares with output '{scored_name}'"
                + (f" ({choice!r} is not an index of them)" if choice is not None else ""),
                file="contract.yaml",
                field=field,
            )
        value, label = target[index], f"target [{index}]"
    else:
        raise HandoffError(
            f"a target must be a tensor, a tuple of tensors or a dict of them, got {type(target).__name__}",
            file=MODEL_FILE,
            field="build_datasets",
        )
    if not isinstance(value, torch.Tensor):
        raise HandoffError(
            f"{label} is a {type(value).__name__}, not a tensor the suite can score",
            file="contract.yaml",
            field=field,
        )
    return value, label


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


# A split is scored in chunks of a fixed number of items: as many as hold about this many bytes of
# inputs and targets. loss() and metrics() see a whole chunk. A split that fits in one chunk (every
# starter's does) is scored as a whole, as it always was; a bigger one as means over its chunks
# weighted by their items, in memory that does not grow with the split.
CHUNK_BYTES = 64 * 2**20

# One batch, or a chunk of them joined: (outputs in contract order, inputs, target).
Scored = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], Any]


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def chunk_items(inputs: tuple[torch.Tensor, ...], target: Any, chunk_bytes: int | None = None) -> int:
    """Items per chunk of a split whose first batch is ``(inputs, target)``: as many as hold
    ``chunk_bytes`` (``CHUNK_BYTES``) of inputs and targets, at least one.

    A function of the split alone: a collated batch holds items of one shape, so its bytes per
    item are the first item's whatever the batch size; outputs are not counted, so scoring a
    champion in the same pass (twice the outputs) cuts the same chunks.
    """
    limit = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    items = max(1, items_in_batch(inputs))
    per_item = max(1, -(-(tensor_bytes(inputs) + tensor_bytes(target)) // items))
    return max(1, limit // per_item)


def join_split(module: ModelModule, parts: Sequence[Scored]) -> Scored:
    """Batches of a split joined into one (outputs, inputs, target), each leaf concatenated."""
    if len(parts) == 1:
        return parts[0]
    with user_code(
        module,
        "joining the batches of the validation split",
        hint="targets must be tensors, or tuples or dicts of tensors, that torch.cat can join",
    ):
        return (
            tuple(torch.cat(column) for column in zip(*(p[0] for p in parts), strict=True)),
            tuple(torch.cat(column) for column in zip(*(p[1] for p in parts), strict=True)),
            join_batches([p[2] for p in parts]),
        )


def _cut_leaves(value: Any, start: int, stop: int) -> Any:
    """Items ``start:stop`` of a target, leaf by leaf (tensors, tuples/lists, dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, Mapping):
        return {k: _cut_leaves(v, start, stop) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cut_leaves(v, start, stop) for v in value)
    raise TypeError(
        f"cannot cut a {type(value).__name__} at an item: use tensors (or tuples or dicts of them)"
    )


def _cut(module: ModelModule, batch: Scored, start: int, stop: int) -> Scored:
    """Items ``start:stop`` of a batch (views, no copy): a chunk's boundary may fall inside it."""
    outputs, inputs, target = batch
    with user_code(
        module,
        "cutting a batch of the validation split at a chunk's boundary",
        hint="targets must be tensors, or tuples or dicts of tensors, whose first axis is the batch",
    ):
        return (
            tuple(t[start:stop] for t in outputs),
            tuple(t[start:stop] for t in inputs),
            _cut_leaves(target, start, stop),
        )


def joined_chunks(
    module: ModelModule, batches: Iterable[Scored], chunk_bytes: int | None = None
) -> Iterator[Scored]:
    """The batches of a split, joined and cut into chunks of ``chunk_items`` items (the last
    chunk, and a split smaller than one chunk, may hold fewer). The size is fixed by the first
    batch's inputs and targets, and a batch is cut where a chunk ends, so a split is chunked the
    same whatever its batch size and whatever outputs ride along. Only one chunk is held at a time
    (and the batch being read), so a split is scored in memory that does not grow with it."""
    size = 0
    pending: list[Scored] = []
    held = 0
    for batch in batches:
        items = items_in_batch(batch[1])
        if not size:
            size = chunk_items(batch[1], batch[2], chunk_bytes)
        start = 0
        while start < items:
            take = min(items - start, size - held)
            pending.append(batch if take == items else _cut(module, batch, start, start + take))
            start += take
            held += take
            if held == size:
                yield _join_and_let_go(module, pending)
                held = 0
    if pending:
        yield _join_and_let_go(module, pending)


def _join_and_let_go(module: ModelModule, pending: list[Scored]) -> Scored:
    """The chunk, with ``pending`` emptied: while a chunk is scored, neither its batches nor the
    previous chunk are held here."""
    chunk = join_split(module, pending)
    pending.clear()
    return chunk


class SplitMeans:
    """``val_loss`` and the researcher's metrics over a split, added chunk by chunk.

    A split of one chunk gets the hooks' values as they are (applied once to the whole split, not
    batch means); over several chunks each value is the mean of the chunks' values weighted by
    their items (a name that some chunks do not return is averaged over those that do). Shared by
    training (torch outputs) and evaluation (ONNX Runtime outputs), so the numbers a researcher
    watches while training are the ones the gate judges.
    """

    def __init__(self, module: ModelModule, output_names: Sequence[str] = ()):
        self.module, self.output_names = module, tuple(output_names)
        self.chunks = 0
        self.items = 0
        self._first: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        self._items: dict[str, int] = {}

    def add(self, chunk: Scored) -> None:
        outputs, inputs, target = chunk
        given = hook_outputs(outputs, self.output_names)
        batch = hook_batch((inputs, target))
        values = {"val_loss": float(call_hook(self.module, "loss", given, batch))}
        if hasattr(self.module, "metrics"):
            values.update(metric_values(call_hook(self.module, "metrics", given, batch)))
        n = items_in_batch(inputs)
        if not self.chunks:
            self._first = values
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + n * value
            self._items[name] = self._items.get(name, 0) + n
        self.chunks += 1
        self.items += n

    def result(self) -> dict[str, float]:
        if not self.chunks:
            raise HandoffError("the validation dataset is empty", file=MODEL_FILE, field="build_datasets")
        if self.chunks == 1:
            return dict(self._first)
        return {name: self._sums[name] / self._items[name] for name in self._sums}


def score_split(
    module: ModelModule,
    outputs: list[tuple[torch.Tensor, ...]],
    inputs: list[tuple[torch.Tensor, ...]],
    targets: list[Any],
    output_names: Sequence[str] = (),
) -> dict[str, float]:
    """``SplitMeans`` over a split given as lists of batches (outputs, inputs, targets)."""
    means = SplitMeans(module, output_names)
    for chunk in joined_chunks(module, zip(outputs, inputs, targets, strict=True)):
        means.add(chunk)
    return means.result()


def data_version(module: ModelModule, cfg: Any) -> str | None:
    """model.py's optional ``data_version(cfg)``: a name for the data's version (a snapshot id, a
    dataset commit). Declared, it is the data's fingerprint and no item is read to hash them."""
    if not hasattr(module, "data_version"):
        return None
    value = call_hook(module, "data_version", cfg)
    if not isinstance(value, str) or not value.strip():
        raise HandoffError(
            f"data_version() must return a non-empty string naming the data's version, got {value!r}",
            file=MODEL_FILE,
            field="data_version",
        )
    return value
