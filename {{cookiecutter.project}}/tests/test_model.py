"""The project's own tests: fast checks that model.py still honours contract.yaml.

They test model.py through the hooks contract and read shapes, dtypes, ranges and gated metrics
from contract.yaml, so they keep passing whatever architecture model.py holds. Add tests of your
own beside them (this folder is yours: template upgrades never touch it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from handoff.check import check
from handoff.contract_examples import example_arrays
from handoff.onnx_export import export_onnx
from handoff.onnx_io import open_session
from handoff.project import Project
from handoff.steps.evaluate import HeldOut, score

PROJECT = Path(__file__).resolve().parents[1]


def test_model_satisfies_the_contract() -> None:
    """`handoff check`: every hook, the contract's shapes and dtypes, one forward pass, loss and
    metrics, a two-step overfit (the loss falls), and the ONNX export round trip."""
    report = check(PROJECT)
    assert [name for name, _ in report.passed][-1] == "ONNX export round trip"


def test_example_inputs_are_real_held_out_data() -> None:
    """The example export and the serving smoke test replay: the contract's inputs (checked by
    example_arrays), within each declared range, and not a constant placeholder."""
    project = Project.load(PROJECT)
    example = example_arrays(project, project.config())
    for spec, tensor in zip(project.contract.inputs, example, strict=True):
        declared = getattr(spec, "range", None)
        if declared is not None:
            low, high = declared
            assert low <= int(tensor.min()) and int(tensor.max()) <= high, spec.name
    assert any(tensor.unique().numel() > 1 for tensor in example), "every example input is constant"


def test_the_gate_metrics_are_scored_on_the_exported_model(tmp_path: Path) -> None:
    """The shared evaluation suite, as the pipeline's evaluate step runs it: the untrained model
    exported to ONNX and scored on the held-out split. Every metric contract.yaml gates on must be
    among the scores (a renamed metric would otherwise fail the gate only in a pipeline run)."""
    project = Project.load(PROJECT)
    cfg = project.config()
    torch.manual_seed(getattr(cfg, "seed", 0))
    model = project.hooks.build_model(cfg).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, project.contract, example_arrays(project, cfg), path)
    scores = score(project, open_session(path), HeldOut.load(project, cfg))
    slo = project.contract.slo
    gated = set(slo.min_metrics) | set(slo.max_metrics)
    assert gated <= set(scores.metrics), f"not scored: {sorted(gated - set(scores.metrics))}"
    assert all(math.isfinite(value) for value in scores.metrics.values()), scores.metrics
