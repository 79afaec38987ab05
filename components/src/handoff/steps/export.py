"""export: turn the trained checkpoint into one self-contained ONNX file that honours the contract.

Every -1 of the contract exported dynamic (the batch, and any sequence or image axis), the
contract's input/output names in its order (whatever the model returns: a tuple, a dict, a
HuggingFace ``ModelOutput``), ``onnx.checker``, and parity with torch measured in ONNX Runtime (the
engine that will serve it) at two batch sizes and at two sizes of every other dynamic axis
(``handoff.onnx_export``). The output folder holds ``model.onnx``, ``example.json`` (the contract
example and its expected outputs, which the smoke test replays; ``handoff.contract_examples``),
``config.json`` (the Config the weights were trained with) and ``triton/``, the same model as a
Triton model repository with its ``config.pbtxt`` (what a cluster serves).

With model.py's preprocess/postprocess (the contract's ``raw:``), example.json is the raw request
(``raw_example``) and the raw response the model server must give (preprocess -> ONNX Runtime ->
postprocess), and the model's folder in ``triton/`` also holds model.py and the ``*.py`` beside it,
which the handoff-onnx runtime imports to run the hooks.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from handoff.artifacts import CONFIG_FILE, EXAMPLE_FILE, EXPORT_RECORD_FILE, ONNX_FILE
from handoff.checkpoints import load_checkpoint
from handoff.contract import CONTRACT_FILE
from handoff.contract_examples import example_arrays, example_payload, served_example
from handoff.errors import HandoffError
from handoff.files import sha256_of, write_json
from handoff.onnx_export import check_parity, export_onnx
from handoff.project import Project
from handoff.raw_io import check_raw_hooks, has_raw_hooks, served_code
from handoff.triton import TRITON_DIR, write_layout

# example_arrays and export_onnx stay importable from this module too: the tests of projects
# generated before they moved (researcher-owned, never upgraded) import them from here.


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
