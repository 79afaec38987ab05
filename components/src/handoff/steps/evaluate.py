"""evaluate: measure what will be served (the ONNX model in ONNX Runtime) and decide the gate.

The shared evaluation suite (task-aware metrics, per-class results, slices) and the researcher's
own ``metrics`` hook are computed once over the whole held-out split, on ONNX Runtime's outputs;
latency is measured at the contract's batch size. The gate holds every SLO in the contract and,
when the registry has a champion, compares against it on the same data: the held-out split's
sha256 is recorded (register tags the version with it), and a champion evaluated on another
split is not compared at all. The readiness report (Markdown + self-contained HTML, with plots)
lists the checklist with its evidence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from handoff import readiness
from handoff.artifacts import CONFIG_FILE, EXPORT_RECORD_FILE, ONNX_FILE
from handoff.data_hash import data_sha256
from handoff.errors import HandoffError
from handoff.eval_suite import evaluate_outputs
from handoff.files import read_json
from handoff.gates import Champion, Gate, absolute_checks, decide, relative_checks
from handoff.hooks import (
    MODEL_FILE,
    call_hook,
    hook_batch,
    join_split,
    score_split,
    scored_target,
    split_batch,
    user_code,
)
from handoff.lineage import HELDOUT_TAG
from handoff.onnx_io import check_arrays, open_session, run_session
from handoff.project import Project
from handoff.readiness import ReadinessItem
from handoff.steps.export import example_arrays

LATENCY_WARMUP = 20
LATENCY_RUNS = 300


@dataclass(frozen=True)
class EvalResult:
    """What will be served, measured: metrics, latency, the gate, and the readiness checklist."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    slices: dict[str, dict[str, float]]
    latency_p50_ms: float
    latency_p99_ms: float
    latency_batch_size: int
    model_size_mb: float
    champion: Champion | None
    gate: Gate
    readiness: list[ReadinessItem]
    report: str  # the readiness report's folder ('' when none was written)
    samples: int
    # handoff.data_hash of the held-out split: register tags the version with it (HELDOUT_TAG), so
    # a later challenger is compared with this model only on these same items.
    heldout_sha256: str
    seconds: float


@dataclass(frozen=True)
class HeldOut:
    """The held-out split, loaded once and scored for the challenger and the champion alike;
    ``sha256`` names its items (in order), so two evaluations can tell whether they saw the same."""

    batches: list[tuple[tuple[torch.Tensor, ...], Any]]
    sha256: str

    @classmethod
    def load(cls, project: Project, cfg: Any) -> HeldOut:
        _, val_set = call_hook(project.hooks, "build_datasets", cfg)
        with user_code(project.hooks, "loading the validation split"):
            batches = [split_batch(b) for b in DataLoader(val_set, batch_size=256)]
        if not batches:
            raise HandoffError("the validation dataset is empty", file=MODEL_FILE, field="build_datasets")
        with user_code(project.hooks, "hashing the validation split"):
            sha256 = data_sha256(val_set)
        return cls(batches, sha256)

    @property
    def samples(self) -> int:
        return sum(len(x[0]) for x, _ in self.batches)


@dataclass(frozen=True)
class Scores:
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    slices: dict[str, dict[str, float]]
    # What the suite scored (the contract's task.output and its target), for the residual plot.
    predictions: np.ndarray
    targets: np.ndarray


def score(project: Project, session: Any, data: HeldOut) -> Scores:
    """The suite's metrics and the researcher's additions (the suite's win a name clash, so every
    project's gate reads the same definition of accuracy, F1 and RMSE).

    The suite scores the contract's ``task.output`` against the target ``task.target`` picks.
    """
    contract = project.contract
    outputs, inputs, targets = [], [], []
    for x, y in data.batches:
        arrays = [t.numpy() for t in x]
        check_arrays(contract.inputs, arrays, what="inputs", source="the validation dataset")
        got = run_session(session, contract, arrays)
        outputs.append(tuple(torch.from_numpy(a) for a in got))
        inputs.append(x)
        targets.append(y)
    own = score_split(project.hooks, outputs, inputs, targets, contract.output_names)
    merged, joined, target = join_split(project.hooks, outputs, inputs, targets)
    scored = contract.scored_output
    truth, _ = scored_target(target, contract.task, contract.output_names[scored])
    keys = None
    if hasattr(project.hooks, "slices"):
        keys = [str(k) for k in call_hook(project.hooks, "slices", hook_batch((joined, target)))]
    predicted, expected = merged[scored].numpy(), truth.numpy()
    suite = evaluate_outputs(contract.task_type, predicted, expected, keys)
    return Scores(
        {**own, **suite.metrics}, suite.per_class, suite.confusion, suite.slices, predicted, expected
    )


def measure_latency(project: Project, session: Any, example: list[np.ndarray]) -> np.ndarray:
    """Milliseconds per ``session.run`` at the contract's latency batch size, after a warm-up."""
    size = project.contract.slo.latency_batch_size
    inputs = [np.resize(a, (size, *a.shape[1:])).astype(a.dtype) for a in example]
    for _ in range(LATENCY_WARMUP):
        run_session(session, project.contract, inputs)
    timings = np.empty(LATENCY_RUNS)
    for i in range(LATENCY_RUNS):
        start = time.perf_counter()
        run_session(session, project.contract, inputs)
        timings[i] = (time.perf_counter() - start) * 1000
    return timings


def champion_scores(project: Project, data: HeldOut) -> Champion | None:
    """The registry's champion scored on ``data``; None when there is none yet.

    A champion evaluated on another held-out split (its ``handoff.heldout_sha256`` tag) is not
    scored: these items may be ones it was trained on, and the gate says so. A champion that
    cannot be scored on this data (its contract's inputs differ) is reported as not comparable
    rather than silently passed: the error names the version.
    """
    from handoff.steps.deploy import fetch_model
    from handoff.tracking import CHAMPION, alias_version, use_tracking

    name = project.contract.name
    client = use_tracking(project)
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None  # no such model or alias yet: the first model bootstraps
    split = client.get_model_version(name, version).tags.get(HELDOUT_TAG)
    if split is not None and split != data.sha256:
        return Champion(name, version, {}, split)
    local = fetch_model(project, name, version)
    try:
        scores = score(project, open_session(local / ONNX_FILE), data)
    except Exception as exc:  # noqa: BLE001 - HandoffError, or onnxruntime's own untyped errors
        raise HandoffError(
            f"the champion {name} v{version} could not be scored on this held-out data, so the "
            f"relative gate cannot compare ({exc}); if the contract changed on purpose, remove "
            f"the alias first: MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r})"
        ) from None
    return Champion(name, version, scores.metrics, split)


def evaluate(
    project_dir: Path | str,
    model_dir: Path | str,
    *,
    report_dir: Path | str | None = None,
    training_run_id: str = "",
) -> EvalResult:
    """Evaluate ``model_dir/model.onnx`` on the held-out split, decide the gate, write the report."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    model_dir = Path(model_dir)
    cfg = project.config_from_dict(read_json(model_dir / CONFIG_FILE))
    session = open_session(model_dir / ONNX_FILE)
    data = HeldOut.load(project, cfg)
    scores = score(project, session, data)
    timings = measure_latency(project, session, [t.numpy() for t in example_arrays(project, cfg)])
    p50, p99 = float(np.percentile(timings, 50)), float(np.percentile(timings, 99))
    size_mb = (model_dir / ONNX_FILE).stat().st_size / 1e6
    champion = champion_scores(project, data)
    slo = project.contract.slo
    gate = decide(
        absolute_checks(slo, scores.metrics, p99, size_mb)
        + relative_checks(slo, scores.metrics, champion, data.sha256)
    )
    export_record = model_dir / EXPORT_RECORD_FILE
    evidence = readiness.Evidence(
        project=project,
        metrics=scores.metrics,
        gate=gate,
        champion_version=champion.version if champion else None,
        export=read_json(export_record) if export_record.is_file() else None,
        training_run_id=training_run_id,
        cfg=cfg,
    )
    items = readiness.assess(evidence)
    report = ""
    if report_dir is not None:
        pictures = readiness.pictures(
            project,
            scores.confusion,
            timings,
            slo.latency_p99_ms,
            training_run_id,
            (scores.predictions, scores.targets),
        )
        readiness.write_report(Path(report_dir), evidence, items, pictures, scores.per_class, scores.slices)
        report = str(report_dir)
    return EvalResult(
        metrics=scores.metrics,
        per_class=scores.per_class,
        confusion=scores.confusion,
        slices=scores.slices,
        latency_p50_ms=round(p50, 4),
        latency_p99_ms=round(p99, 4),
        latency_batch_size=slo.latency_batch_size,
        model_size_mb=round(size_mb, 4),
        champion=champion,
        gate=gate,
        readiness=items,
        report=report,
        samples=data.samples,
        heldout_sha256=data.sha256,
        seconds=round(time.perf_counter() - started, 3),
    )
