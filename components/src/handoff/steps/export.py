"""export: turn the trained checkpoint into one self-contained ONNX file that honours the contract.

Every -1 of the contract exported dynamic (the batch, and any sequence or image axis), the
contract's input/output names in its order (whatever the model returns: a tuple, a dict, a
HuggingFace ``ModelOutput``), ``onnx.checker``, and parity with torch measured in ONNX Runtime (the
engine that will serve it) at two batch sizes and at two sizes of every other dynamic axis. The output folder
holds ``model.onnx``, ``example.json`` (the contract example and its expected outputs, which the
smoke test replays), ``config.json`` (the Config the weights were trained with) and ``triton/``,
the same model as a Triton model repository with its ``config.pbtxt`` (what a cluster serves).

With model.py's preprocess/postprocess (the contract's ``raw:``), example.json is the raw request
(``raw_example``) and the raw response the model server must give (preprocess -> ONNX Runtime ->
postprocess), and the model's folder in ``triton/`` also holds model.py and the ``*.py`` beside it,
which the handoff-onnx runtime imports to run the hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from handoff.artifacts import CONFIG_FILE, EXAMPLE_FILE, EXPORT_RECORD_FILE, ONNX_FILE
from handoff.checkpoints import load_checkpoint
from handoff.contract import CONTRACT_FILE, Contract
from handoff.errors import HandoffError
from handoff.files import sha256_of, write_json
from handoff.hooks import MODEL_FILE, ModelModule, as_tuple, call_hook, contract_outputs, user_code
from handoff.onnx_io import check_arrays, open_session, run_session
from handoff.project import Project
from handoff.raw_io import (
    check_raw_hooks,
    has_raw_hooks,
    postprocess,
    preprocess,
    raw_request,
    served_code,
    v2_tensor,
)
from handoff.triton import TRITON_DIR, write_layout


@dataclass(frozen=True)
class ExportResult:
    """The exported file's identity and how closely it matches the torch model."""

    model_dir: str
    triton_repository: str  # the Triton model repository (root) holding the same model.onnx
    onnx_sha256: str
    onnx_bytes: int
    opset: int
    parity_max_abs_diff: float
    parity_tolerance: float
    seconds: float


def example_arrays(project: Project, cfg: Any) -> tuple[torch.Tensor, ...]:
    """model.py's example batch, checked against the contract's inputs."""
    value = call_hook(project.hooks, "example_inputs", cfg)
    try:
        example = tuple(t.detach().cpu() for t in as_tuple(value))
    except HandoffError:
        raise HandoffError(
            f"example_inputs() must return a tensor or a tuple of tensors, got {type(value).__name__}",
            file=MODEL_FILE,
            field="example_inputs",
        ) from None
    check_arrays(
        project.contract.inputs,
        [t.numpy() for t in example],
        what="inputs",
        source="model.py example_inputs()",
    )
    return example


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


def example_payload(
    contract: Contract, inputs: tuple[torch.Tensor, ...], outputs: list[np.ndarray]
) -> dict[str, Any]:
    """The contract example as an Open Inference Protocol v2 request plus expected outputs."""
    return {
        "inputs": [
            {
                "name": spec.name,
                "datatype": spec.v2_datatype,
                "shape": list(t.shape),
                "data": t.detach().numpy().reshape(-1).tolist(),
            }
            for spec, t in zip(contract.inputs, inputs, strict=True)
        ],
        "expected_outputs": [
            {
                "name": spec.name,
                "datatype": spec.v2_datatype,
                "shape": list(a.shape),
                "data": a.reshape(-1).tolist(),
            }
            for spec, a in zip(contract.outputs, outputs, strict=True)
        ],
    }


def served_example(
    project: Project, cfg: Any, path: Path, example: tuple[torch.Tensor, ...], outputs: list[np.ndarray]
) -> dict[str, Any]:
    """example.json for a model with preprocess/postprocess: the request a client sends (raw when
    preprocess runs) and the response the model server must give, computed as it computes it:
    raw -> preprocess -> ONNX Runtime -> postprocess."""
    contract, hooks = project.contract, project.hooks
    assert contract.raw is not None
    if contract.raw.inputs:
        raw = raw_request(hooks, contract, cfg)
        feeds = preprocess(hooks, contract, raw)
        outputs = run_session(open_session(path), contract, list(feeds.values()))
        check_arrays(contract.outputs, outputs, what="outputs", source="ONNX Runtime on preprocess()'s")
        request = [v2_tensor(spec, raw[spec.name]) for spec in contract.raw.inputs]
    else:
        request = example_payload(contract, example, outputs)["inputs"]
    if contract.raw.outputs:
        answer = postprocess(hooks, contract, dict(zip(contract.output_names, outputs, strict=True)))
        expected = [v2_tensor(spec, answer[spec.name]) for spec in contract.raw.outputs]
    else:
        expected = [v2_tensor(spec, a) for spec, a in zip(contract.outputs, outputs, strict=True)]
    return {"inputs": request, "expected_outputs": expected}


def export(project_dir: Path | str, checkpoint: Path | str, model_dir: Path | str) -> ExportResult:
    """Export the checkpoint to ``model_dir`` (model.onnx, example.json, config.json, triton/)."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    model, cfg = load_checkpoint(project, checkpoint)
    example = example_arrays(project, cfg)
    out = Path(model_dir)
    path = out / ONNX_FILE
    opset = export_onnx(model, project.contract, example, path)
    worst, outputs = check_parity(model, project, path, example)
    check_raw_hooks(project.hooks, project.contract, project.root / CONTRACT_FILE)
    raw = has_raw_hooks(project.contract)
    payload = (
        served_example(project, cfg, path, example, outputs)
        if raw
        else example_payload(project.contract, example, outputs)
    )
    write_json(out / EXAMPLE_FILE, payload)
    write_json(out / CONFIG_FILE, dataclasses.asdict(cfg))
    code = served_code(project.root) if raw else []
    triton = write_layout(project.contract, project.root / CONTRACT_FILE, path, out, code=code)
    expected = {ONNX_FILE, EXAMPLE_FILE, CONFIG_FILE, EXPORT_RECORD_FILE, TRITON_DIR}
    leftovers = sorted(p.name for p in out.iterdir() if p.name not in expected)
    if leftovers:
        raise HandoffError(
            f"export must write one self-contained ONNX file, found extra {leftovers}", file=out
        )
    result = ExportResult(
        model_dir=str(out),
        triton_repository=str(triton),
        onnx_sha256=sha256_of(path),
        onnx_bytes=path.stat().st_size,
        opset=opset,
        parity_max_abs_diff=worst,
        parity_tolerance=project.contract.slo.parity_tolerance,
        seconds=round(time.perf_counter() - started, 3),
    )
    # Travels with the model, so evaluation's readiness report can cite the parity check.
    write_json(out / EXPORT_RECORD_FILE, dataclasses.asdict(result))
    return result
