"""evaluate: measure what will be served (the ONNX model in ONNX Runtime) and decide the gate.

Metrics come from model.py's ``loss``/``metrics`` hooks applied once to the whole held-out split;
latency is measured at the contract's batch size. The gate passes only when every minimum metric
and the p99 latency SLO hold, and it says which failed and by how much.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from handoff.artifacts import CONFIG_FILE, ONNX_FILE
from handoff.errors import HandoffError
from handoff.files import read_json
from handoff.hooks import MODEL_FILE, call_hook, score_split, split_batch, user_code
from handoff.onnx_io import open_session, run_session
from handoff.project import Project
from handoff.steps.export import example_arrays

LATENCY_WARMUP = 20
LATENCY_RUNS = 300


@dataclass(frozen=True)
class Gate:
    """The promotion verdict, with one reason per failed objective."""

    passed: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EvalResult:
    """What will be served, measured: metrics, latency, and the gate decided from them."""

    metrics: dict[str, float]
    latency_p50_ms: float
    latency_p99_ms: float
    latency_batch_size: int
    gate: Gate
    samples: int
    seconds: float


def onnx_metrics(project: Project, session: Any, cfg: Any) -> tuple[dict[str, float], int]:
    """Run the held-out split through ONNX Runtime and score it with the researcher's hooks."""
    _, val_set = call_hook(project.hooks, "build_datasets", cfg)
    outputs, inputs, targets = [], [], []
    with user_code(project.hooks, "loading the validation split"):
        for batch in DataLoader(val_set, batch_size=256):
            x, y = split_batch(batch)
            got = run_session(session, project.contract, [t.numpy() for t in x])
            outputs.append(tuple(torch.from_numpy(a) for a in got))
            inputs.append(x)
            targets.append(y)
    if not targets:
        raise HandoffError("the validation dataset is empty", file=MODEL_FILE, field="build_datasets")
    return score_split(project.hooks, outputs, inputs, targets), sum(len(x[0]) for x in inputs)


def measure_latency(project: Project, session: Any, example: list[np.ndarray]) -> tuple[float, float]:
    """p50/p99 milliseconds of ``session.run`` at the contract's latency batch size."""
    size = project.contract.slo.latency_batch_size
    inputs = [np.resize(a, (size, *a.shape[1:])).astype(a.dtype) for a in example]
    for _ in range(LATENCY_WARMUP):
        run_session(session, project.contract, inputs)
    timings = np.empty(LATENCY_RUNS)
    for i in range(LATENCY_RUNS):
        start = time.perf_counter()
        run_session(session, project.contract, inputs)
        timings[i] = (time.perf_counter() - start) * 1000
    return float(np.percentile(timings, 50)), float(np.percentile(timings, 99))


def decide_gate(project: Project, metrics: dict[str, float], p99_ms: float) -> Gate:
    slo = project.contract.slo
    reasons = []
    for name, minimum in sorted(slo.min_metrics.items()):
        if name not in metrics:
            reasons.append(
                f"metric '{name}' (slo.min_metrics) was not produced by model.py metrics(); "
                f"produced: {', '.join(sorted(metrics))}"
            )
        elif not metrics[name] >= minimum:
            reasons.append(
                f"{name} {metrics[name]:.4f} < minimum {minimum:g} (short by {minimum - metrics[name]:.4f})"
            )
    if not p99_ms <= slo.latency_p99_ms:
        reasons.append(
            f"latency p99 {p99_ms:.2f} ms > slo.latency_p99_ms {slo.latency_p99_ms:g} ms "
            f"at batch {slo.latency_batch_size}"
        )
    return Gate(passed=not reasons, reasons=reasons)


def evaluate(project_dir: Path | str, model_dir: Path | str) -> EvalResult:
    """Evaluate ``model_dir/model.onnx`` on the held-out split and decide the gate."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    model_dir = Path(model_dir)
    cfg = project.config_from_dict(read_json(model_dir / CONFIG_FILE))
    session = open_session(model_dir / ONNX_FILE)
    metrics, samples = onnx_metrics(project, session, cfg)
    example = [t.numpy() for t in example_arrays(project, cfg)]
    p50, p99 = measure_latency(project, session, example)
    gate = decide_gate(project, metrics, p99)
    return EvalResult(
        metrics=metrics,
        latency_p50_ms=round(p50, 4),
        latency_p99_ms=round(p99, 4),
        latency_batch_size=project.contract.slo.latency_batch_size,
        gate=gate,
        samples=samples,
        seconds=round(time.perf_counter() - started, 3),
    )
