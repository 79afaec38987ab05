"""From the researcher's torch model to an ONNX graph that honours the contract, and the proof.

Every -1 of the contract exported dynamic (the batch, and any sequence or image axis), the
contract's input/output names in its order (whatever the model returns: a tuple, a dict, a
HuggingFace ``ModelOutput``), ``onnx.checker``, and parity with torch measured in ONNX Runtime (the
engine that will serve it) at two batch sizes and at two sizes of every other dynamic axis. The
export step writes its model with these; ``handoff check`` runs the same round trip in seconds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from handoff.contract import Contract
from handoff.errors import HandoffError
from handoff.hooks import MODEL_FILE, ModelModule, contract_outputs, user_code
from handoff.onnx_io import check_arrays, open_session, run_session
from handoff.project import Project


def torch_outputs(
    hooks: ModelModule, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], contract: Contract
) -> list[np.ndarray]:
    """The torch model's outputs as arrays, in the contract's order."""
    with torch.no_grad(), user_code(hooks, "the model's forward pass"):
        value = model(*inputs)
    return [t.detach().cpu().numpy() for t in contract_outputs(value, contract)]


class ContractModule(torch.nn.Module):
    """The researcher's model returning the contract's outputs as a tuple in the contract's order,
    so the ONNX graph's outputs are exactly the contract's, whatever ``forward`` returns."""

    def __init__(self, model: torch.nn.Module, contract: Contract):
        super().__init__()
        self.model = model
        self.contract = contract

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return contract_outputs(self.model(*inputs), self.contract)


@dataclass(frozen=True)
class Axis:
    """One dynamic non-batch axis of an input, as the example has it and at a second size."""

    index: int
    name: str
    axis: int
    size: int
    other: int

    def __str__(self) -> str:
        return f"inputs[{self.index}] '{self.name}' axis {self.axis}"


def dynamic_axes(contract: Contract, example: tuple[torch.Tensor, ...]) -> list[Axis]:
    """Every -1 after the batch axis, with a second size to try: half the example's, or double
    when the example's is under 4 (so a length-1 example axis still gets a second size)."""
    axes = []
    for index, (spec, tensor) in enumerate(zip(contract.inputs, example, strict=True)):
        for axis in spec.dynamic_axes[1:]:
            size = int(tensor.shape[axis])
            axes.append(Axis(index, spec.name, axis, size, size // 2 if size >= 4 else size * 2))
    return axes


def _resize(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``tensor`` cut to, or repeated up to, ``size`` along ``axis`` (real values, never zeros)."""
    repeats = -(-size // tensor.shape[axis])
    return torch.cat([tensor] * repeats, dim=axis).narrow(axis, 0, size)


def at_other_sizes(example: tuple[torch.Tensor, ...], axes: list[Axis]) -> tuple[torch.Tensor, ...]:
    """The example with every dynamic non-batch axis at its second size (all at once: inputs whose
    lengths must agree, like input_ids and attention_mask, keep agreeing)."""
    resized = list(example)
    for axis in axes:
        resized[axis.index] = _resize(resized[axis.index], axis.axis, axis.other)
    return tuple(resized)


def export_onnx(
    model: torch.nn.Module, contract: Contract, example: tuple[torch.Tensor, ...], path: Path
) -> int:
    """Export with every -1 axis dynamic to a single file; returns the opset used."""
    # Export at size 2 or more on every dynamic axis: the exporter specialises a size-1 axis.
    batch = tuple(_resize(t, 0, 2) if t.shape[0] == 1 else t for t in example)
    batch = at_other_sizes(batch, [a for a in dynamic_axes(contract, batch) if a.size == 1])
    batch_dim = torch.export.Dim("batch", min=1, max=1 << 20)
    # The batch is one named axis shared by every input; other dynamic axes are AUTO, so the
    # exporter works out which of them must agree (input_ids and attention_mask lengths) itself.
    dynamic_shapes = (
        tuple(
            {axis: batch_dim if axis == 0 else torch.export.Dim.AUTO for axis in spec.dynamic_axes}
            for spec in contract.inputs
        ),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    # The exporter reports optional registries it skips (torchvision ops) as warnings; they say
    # nothing about this model, so only errors are kept.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ContractModule(model, contract),
                batch,
                input_names=contract.input_names,
                output_names=contract.output_names,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    except HandoffError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter errors are long; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HandoffError(
            f"torch.onnx.export failed: {first}", file=MODEL_FILE, field="build_model"
        ) from None
    _strip_stack_traces(path)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False)
    _check_dynamic_inputs(graph, contract)
    opsets = [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")]
    return opsets[0] if opsets else 0


def _check_dynamic_inputs(graph: onnx.ModelProto, contract: Contract) -> None:
    """Every -1 of the contract must be a free axis of the exported graph's input, or a request
    at another size is refused by ONNX Runtime (a 500) though the contract allows it."""
    for index, (spec, value) in enumerate(zip(contract.inputs, graph.graph.input, strict=True)):
        dims = value.type.tensor_type.shape.dim
        for axis in spec.dynamic_axes:
            if dims[axis].HasField("dim_value"):
                raise HandoffError(
                    f"inputs[{index}] '{spec.name}' axis {axis} is -1 (any size) in contract.yaml, but "
                    f"the exported graph fixed it at {dims[axis].dim_value}: the model's code treats "
                    "that size as a constant (a reshape or view with a literal size, a fixed-size "
                    "table); make it follow the input's shape, or write the size in the contract",
                    file="contract.yaml",
                    field=f"inputs[{index}].shape",
                )


def _strip_stack_traces(path: Path) -> None:
    """Drop the exporter's per-node Python stack traces.

    They hold the exporting machine's file paths, so the same weights would hash differently on
    every machine and folder; without them the sha256 identifies the model, not where it was built.
    """
    model = onnx.load(str(path))
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def check_parity(
    model: torch.nn.Module, project: Project, path: Path, example: tuple[torch.Tensor, ...]
) -> tuple[float, list[np.ndarray]]:
    """Max |torch - onnxruntime| over the example, a 3x batch of it, and the example with every
    dynamic non-batch axis at a second size (proves each -1 is dynamic in the served graph)."""
    session = open_session(path)
    contract = project.contract
    axes = dynamic_axes(contract, example)
    runs = [(example, ""), (tuple(torch.cat([t, t, t]) for t in example), "")]
    if axes:
        changed = ", ".join(f"{a} from {a.size} to {a.other}" for a in axes)
        runs.append((at_other_sizes(example, axes), changed))
    worst, example_outputs = 0.0, list[np.ndarray]()
    for inputs, changed in runs:
        try:
            expected = torch_outputs(project.hooks, model, inputs, contract)
        except HandoffError as exc:
            if not changed:
                raise
            raise HandoffError(
                f"contract.yaml declares -1 (any size) there, but the model itself fails with "
                f"{changed}: {exc.detail}; make the model follow the input's size, or write the "
                "size the model needs in the shape",
                file="contract.yaml",
                field=f"inputs[{axes[0].index}].shape",
            ) from None
        check_arrays(contract.outputs, expected, what="outputs", source="the model")
        rows = int(inputs[0].shape[0])
        for index, (spec, array) in enumerate(zip(contract.outputs, expected, strict=True)):
            if array.shape[0] != rows:
                # Requests are batched and answers split by row: an output whose first axis is
                # not the batch hands one client another's rows.
                raise HandoffError(
                    f"outputs[{index}] '{spec.name}' has {array.shape[0]} rows for a batch of {rows}"
                    + (f" ({changed})" if changed else "")
                    + "; the first axis of every output must be the batch",
                    file="contract.yaml",
                    field=f"outputs[{index}].shape",
                )
        try:
            got = run_session(session, contract, [t.detach().numpy() for t in inputs])
        except Exception as exc:
            if not changed:
                raise
            first = str(exc).strip().splitlines()[0]
            raise HandoffError(
                f"the exported graph does not run with {changed}, though torch does and contract.yaml "
                f"declares -1 (any size): the export fixed that size inside the graph ({first}); "
                "look for code that turns the input's size into a Python number",
                file="contract.yaml",
                field=f"inputs[{axes[0].index}].shape",
            ) from None
        check_arrays(contract.outputs, got, what="outputs", source="the exported ONNX model")
        worst = max(
            worst, *(float(np.max(np.abs(e - g), initial=0.0)) for e, g in zip(expected, got, strict=True))
        )
        example_outputs = example_outputs or got
    tolerance = contract.slo.parity_tolerance
    if not worst <= tolerance:
        raise HandoffError(
            f"ONNX Runtime differs from torch by {worst:.3g}, above slo.parity_tolerance "
            f"{tolerance:g}; the exported graph does not compute what the model does",
            file="contract.yaml",
            field="slo.parity_tolerance",
        )
    return worst, example_outputs
