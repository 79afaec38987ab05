"""export: turn the trained checkpoint into one self-contained ONNX file that honours the contract.

Dynamic batch axis, the contract's input/output names, ``onnx.checker``, and parity with torch
measured in ONNX Runtime (the engine that will serve it) at two batch sizes. The output folder
holds ``model.onnx``, ``example.json`` (the contract example and its expected outputs, which the
smoke test replays), ``config.json`` (the Config the weights were trained with) and ``triton/``,
the same model as a Triton model repository with its ``config.pbtxt`` (what a cluster serves).
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
from handoff.hooks import MODEL_FILE, ModelModule, as_tuple, call_hook, user_code
from handoff.onnx_io import check_arrays, open_session, run_session
from handoff.project import Project
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
    hooks: ModelModule, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> list[np.ndarray]:
    """The torch model's outputs as arrays, in the contract's order."""
    with torch.no_grad(), user_code(hooks, "the model's forward pass"):
        return [t.detach().cpu().numpy() for t in as_tuple(model(*inputs))]


def export_onnx(
    model: torch.nn.Module, contract: Contract, example: tuple[torch.Tensor, ...], path: Path
) -> int:
    """Export with a dynamic batch axis to a single file; returns the opset used."""
    # Export at batch 2 or more so the exporter cannot specialise the batch axis to 1.
    batch = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in example)
    batch_dim = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic_shapes = tuple({0: batch_dim} for _ in batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    # The exporter reports optional registries it skips (torchvision ops) as warnings; they say
    # nothing about this model, so only errors are kept.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
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
    opsets = [
        o.version
        for o in onnx.load(str(path), load_external_data=False).opset_import
        if o.domain in ("", "ai.onnx")
    ]
    return opsets[0] if opsets else 0


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
    """Max |torch - onnxruntime| over the example and a 3x batch of it (proves a dynamic batch)."""
    session = open_session(path)
    contract = project.contract
    worst, example_outputs = 0.0, list[np.ndarray]()
    for inputs in (example, tuple(torch.cat([t, t, t]) for t in example)):
        expected = torch_outputs(project.hooks, model, inputs)
        check_arrays(contract.outputs, expected, what="outputs", source="the model")
        got = run_session(session, contract, [t.detach().numpy() for t in inputs])
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
    write_json(out / EXAMPLE_FILE, example_payload(project.contract, example, outputs))
    write_json(out / CONFIG_FILE, dataclasses.asdict(cfg))
    triton = write_layout(project.contract, project.root / CONTRACT_FILE, path, out)
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
