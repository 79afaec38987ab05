"""evaluate: measure what will be served (the ONNX model in ONNX Runtime) and decide the gate.

The shared evaluation suite (task-aware metrics, per-class results, slices) and the researcher's
own ``metrics`` hook are computed over the whole held-out split, on ONNX Runtime's outputs, in one
pass that reads the split batch by batch and keeps running counts, never the split itself (its
inputs, its outputs): a split bigger than memory is scored in memory that does not grow with it.
Latency is measured at the contract's batch size. The gate holds every SLO in the contract and,
when the registry has a champion, compares against it on the same data: the held-out split's
fingerprint is recorded (register tags the version with it), a champion evaluated on another
split is not compared at all, and one evaluated on this split is scored in the same pass. The
readiness report (Markdown + self-contained HTML, with plots) lists the checklist with its
evidence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handoff import readiness
from handoff.artifacts import CONFIG_FILE, EXPORT_RECORD_FILE, ONNX_FILE, OPTIMIZE_RECORD_FILE
from handoff.contract_examples import example_arrays
from handoff.errors import HandoffError
from handoff.files import read_json, sha256_of
from handoff.gates import Champion, Gate, absolute_checks, decide, relative_checks
from handoff.lineage import HELDOUT_TAG
from handoff.monitoring_config import MONITORING_DIR, alert_names, write_monitoring
from handoff.onnx_io import open_session
from handoff.project import Project
from handoff.readiness import ReadinessItem
from handoff.reference_profile import build_reference

# Scoring lives in handoff.scoring (optimize scores its candidates the same way); these names stay
# importable from here, where the tests of projects generated before the move import them.
from handoff.scoring import BATCH as BATCH
from handoff.scoring import HeldOut as HeldOut
from handoff.scoring import RivalFailed as RivalFailed
from handoff.scoring import Scores as Scores
from handoff.scoring import measure_latency as measure_latency
from handoff.scoring import score as score
from handoff.scoring import score_with_rival as score_with_rival


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


def find_champion(project: Project, data: HeldOut) -> tuple[Champion | None, Any]:
    """The registry's champion (None when there is none yet) and, when it is to be scored on
    ``data``, an ONNX Runtime session of it (scored in the challenger's pass over the split).

    A champion evaluated on another held-out split (its ``handoff.heldout_sha256`` tag) is not
    scored: these items may be ones it was trained on, and the gate says so.
    """
    from handoff.registry import fetch_model
    from handoff.tracking import CHAMPION, alias_version, use_tracking

    name = project.contract.name
    client = use_tracking(project)
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None, None  # no such model or alias yet: the first model bootstraps
    split = client.get_model_version(name, version).tags.get(HELDOUT_TAG)
    found = Champion(name, version, {}, split)
    if split is not None and split != data.sha256:
        return found, None
    local = fetch_model(project, name, version)
    try:
        return found, open_session(local / ONNX_FILE)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own untyped errors
        raise not_comparable(found, exc) from None


def not_comparable(champion: Champion, error: Exception) -> HandoffError:
    """A champion that cannot be scored on this data (its contract's inputs differ) is reported as
    not comparable rather than silently passed: the error names the version."""
    from handoff.tracking import CHAMPION

    name, version = champion.name, champion.version
    return HandoffError(
        f"the champion {name} v{version} could not be scored on this held-out data, so the "
        f"relative gate cannot compare ({error}); if the contract changed on purpose, remove "
        f"the alias first: MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r})"
    )


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
    watched = readiness.ContractWatch(session, project.contract)  # what "Contract satisfied" reports
    data = HeldOut.load(project, cfg)
    champion, rival = find_champion(project, data)
    try:
        scores, rival_scores = score_with_rival(project, watched, rival, data)
    except RivalFailed as failed:
        assert champion is not None
        raise not_comparable(champion, failed.error) from None
    if champion is not None and rival_scores is not None:
        champion = Champion(champion.name, champion.version, rival_scores.metrics, champion.heldout_sha256)
    timings = measure_latency(project, session, [t.numpy() for t in example_arrays(project, cfg)])
    p50, p99 = float(np.percentile(timings, 50)), float(np.percentile(timings, 99))
    size_mb = (model_dir / ONNX_FILE).stat().st_size / 1e6
    slo = project.contract.slo
    export_record = model_dir / EXPORT_RECORD_FILE
    export = read_json(export_record) if export_record.is_file() else None
    optimize_record = model_dir / OPTIMIZE_RECORD_FILE
    optimized = read_json(optimize_record) if optimize_record.is_file() else None
    onnx_sha256 = sha256_of(model_dir / ONNX_FILE)
    # Every scored batch passed the input check (score_with_rival raises on the first that fails).
    contract_checks = (readiness.heldout_inputs_check(scores.samples), *watched.checks())
    gate = decide(
        [
            readiness.contract_gate(export, onnx_sha256, contract_checks),
            *absolute_checks(slo, scores.metrics, p99, size_mb),
            *relative_checks(slo, scores.metrics, champion, data.sha256),
        ]
    )
    # The reference profile travels with the report: register attaches both to the version.
    reference = build_reference(project, cfg, session, data) if report_dir is not None else None
    evidence = readiness.Evidence(
        project=project,
        metrics=scores.metrics,
        gate=gate,
        export=export,
        onnx_sha256=onnx_sha256,
        contract_checks=contract_checks,
        training_run_id=training_run_id,
        cfg=cfg,
        optimized=optimized,
        reference=None if reference is None else reference.record,
        alerts=tuple(alert_names(project)),
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
            scores.residuals.arrays() if scores.residuals else None,
            scores.samples,
            optimized,
        )
        readiness.write_report(Path(report_dir), evidence, items, pictures, scores.per_class, scores.slices)
        assert reference is not None
        reference.write(Path(report_dir))
        write_monitoring(project, Path(report_dir) / MONITORING_DIR)
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
        samples=scores.samples,
        heldout_sha256=data.sha256,
        seconds=round(time.perf_counter() - started, 3),
    )
