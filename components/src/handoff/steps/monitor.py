"""``handoff monitor``: does the traffic the model server logged still look like what the served
version was trained on?

A window of the payload log (``handoff.payload_log``: sampled requests and responses, as Parquet)
becomes the same columns as the version's registered reference profile
(``handoff.reference_profile``: training inputs, held-out outputs), and Evidently's data drift
preset tests each input column, its value drift test each output column (the predicted class, the
confidence, regression outputs). The verdict follows the contract's ``slo.drift``: drift when at
least ``max_drift_share`` of the input columns drifted, or (``prediction: true``) when an output
column did. Written to ``out_dir``: Evidently's HTML report, the verdict as JSON (every column's
test, score and threshold, the drifted inputs by name), and the verdict as Prometheus gauges
(``metrics.prom`` for a node-exporter textfile collector, and pushed to a Pushgateway when given
one), which the alert rules of ``handoff.monitoring_config`` fire on.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from handoff import __version__
from handoff.ab_state import running_ab
from handoff.artifacts import EXTRA_DIR, ONNX_FILE, REFERENCE_FILE
from handoff.contract import Contract, Drift, load_contract
from handoff.drift_features import (
    CLASS,
    categorical,
    feature_table,
    input_columns,
    prediction_columns,
    tensor_of,
)
from handoff.errors import HandoffError
from handoff.files import sha256_of, write_json
from handoff.payload_log import Window, payload_store, read_window
from handoff.project import Project
from handoff.raw_io import has_raw_hooks
from handoff.reference_profile import load_reference
from handoff.registry import fetch_model
from handoff.serving import local_server

REPORT_FILE = "report.html"
VERDICT_FILE = "verdict.json"
METRICS_FILE = "metrics.prom"
PUSH_JOB = "handoff-monitor"
# The newest rows a verdict reads when --last-rows does not say: a day of busy traffic at
# sample_rate 1.0 would take minutes to read and test, and tells no more about drift.
MAX_WINDOW_ROWS = 50_000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True)
class ColumnDrift:
    """One column's test: its method, score (a p-value or a distance) and threshold."""

    kind: str  # "input" or "output"
    tensor: str  # the contract's tensor the column is taken from
    method: str
    score: float | None  # None where the test could not score (a constant column)
    threshold: float
    drifted: bool


@dataclass
class Verdict:
    model: str
    version: str
    status: str  # "drift", "no drift" or "not enough data"
    drift_detected: bool
    rows: int
    window: dict[str, Any]
    thresholds: dict[str, Any]
    drift_share: float | None = None
    drifted_inputs: list[str] = field(default_factory=list)  # tensors with a drifted column
    drifted_columns: list[str] = field(default_factory=list)
    prediction_drift: bool | None = None
    prediction_drift_score: float | None = None
    reasons: list[str] = field(default_factory=list)
    columns: dict[str, ColumnDrift] = field(default_factory=dict)
    report: str = ""
    seconds: float = 0.0


def parse_since(value: str | None) -> datetime | None:
    """``24h``, ``30m``, ``7d``, ``90s`` back from now, or an ISO time (naive = UTC)."""
    if not value:
        return None
    match = _DURATION.match(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: float(match[1])})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise HandoffError(
            f"--since {value!r} is neither a duration (90s, 30m, 24h, 7d) nor an ISO time (2026-12-01T00:00)",
            field="since",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def served_version(project: Project) -> str:
    """The version this machine's model server serves for the project (during an A/B test, the
    champion it started from: `handoff monitor --version` names the challenger), else the champion."""
    name = project.contract.name
    ab = running_ab(project)
    if ab is not None and ab.model_name == name:
        return ab.champion
    handle = local_server.current(project.state_dir, project.root)
    if handle is not None and handle.model_name == name:
        return handle.version
    from handoff.tracking import CHAMPION, alias_version, use_tracking

    version = alias_version(use_tracking(project), name, CHAMPION)
    if version is None:
        raise HandoffError(
            f"no version of {name} is served here and none is the champion: name one with --version"
        )
    return version


def _reference_of(
    project: Project, name: str, version: str
) -> tuple[Contract, pd.DataFrame, pd.DataFrame, str]:
    """The served version's contract, reference tables and model sha256, from the registry."""
    model = fetch_model(project, name, version)
    folder = model / EXTRA_DIR
    if not (folder / REFERENCE_FILE).is_file():
        raise HandoffError(
            f"registered version {name}/{version} has no reference profile ({REFERENCE_FILE}): it was "
            "registered before monitoring existed or without evaluate's report folder: register the "
            "model again with `handoff evaluate --report <folder>` and `handoff register --report <folder>`"
        )
    _, inputs, outputs = load_reference(folder)
    return load_contract(folder), inputs, outputs, sha256_of(model / ONNX_FILE)


def _current(contract: Contract, window: Window) -> pd.DataFrame:
    """The logged rows as the reference's columns."""
    missing = [spec.name for spec in contract.inputs if spec.name not in window.inputs]
    missing += [spec.name for spec in contract.outputs if spec.name not in window.outputs]
    if missing:
        raise HandoffError(
            f"the payload log has no column for {missing}: it holds inputs {sorted(window.inputs)} and "
            f"outputs {sorted(window.outputs)}, the served contract names inputs {contract.input_names} "
            f"and outputs {contract.output_names}"
        )
    columns = input_columns(contract, window.inputs)
    columns.update(prediction_columns(contract, window.outputs))
    return feature_table(columns)


def _evidently(
    reference: pd.DataFrame, current: pd.DataFrame, inputs: list[str], outputs: list[str], drift: Drift
) -> tuple[Any, dict[str, tuple[str, float, float, bool]]]:
    """Run Evidently; each column's (method, score, threshold, drifted), as its tests decided."""
    try:
        from evidently import DataDefinition, Dataset, Report
        from evidently.metrics import ValueDrift
        from evidently.presets import DataDriftPreset
    except ImportError:
        raise HandoffError(
            "handoff monitor compares with Evidently, which is not installed here: "
            f"pip install 'ml-handoff[monitor]=={__version__}' (in a project: `make setup EXTRAS=monitor`; "
            "the platform image has it)"
        ) from None

    labels = categorical(current)
    definition = DataDefinition(
        numerical_columns=[c for c in (*inputs, *outputs) if c not in labels],
        categorical_columns=labels,
    )
    options: dict[str, Any] = {}
    if drift.method is not None:
        options["method"] = drift.method
    if drift.threshold is not None:
        options["threshold"] = drift.threshold
    report = Report(
        [
            DataDriftPreset(columns=inputs, drift_share=drift.max_drift_share, **options),
            *(ValueDrift(column=column, **options) for column in outputs),
        ],
        include_tests=True,
    )
    snapshot = report.run(
        current_data=Dataset.from_pandas(current, data_definition=definition),
        reference_data=Dataset.from_pandas(reference, data_definition=definition),
    )
    found = snapshot.dict()
    scores = {m["id"]: m["value"] for m in found["metrics"]}
    columns: dict[str, tuple[str, float, float, bool]] = {}
    for test in found["tests"]:
        params = test["metric_config"]["params"]
        if params.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        score = float(scores[test["metric_config"]["metric_id"]])
        columns[params["column"]] = (
            params["method"],
            score,
            float(params["threshold"]),
            test["status"] == "FAIL",
        )
    return snapshot, columns


def _verdict(
    contract: Contract, drift: Drift, version: str, window: Window, columns: dict[str, ColumnDrift]
) -> Verdict:
    inputs = {c: d for c, d in columns.items() if d.kind == "input"}
    outputs = {c: d for c, d in columns.items() if d.kind == "output"}
    drifted = sorted(c for c, d in inputs.items() if d.drifted)
    share = len(drifted) / len(inputs) if inputs else 0.0
    reasons = []
    if inputs and share >= drift.max_drift_share:
        reasons.append(
            f"{len(drifted)} of {len(inputs)} input columns drifted ({share:.0%} >= "
            f"slo.drift.max_drift_share {drift.max_drift_share:.0%}): {', '.join(drifted)}"
        )
    # The prediction drift score: a classifier's class column's, else the first output column's.
    scored = next((d for c, d in outputs.items() if c.endswith(CLASS)), next(iter(outputs.values()), None))
    drifted_outputs = sorted(c for c, d in outputs.items() if d.drifted)
    if drift.prediction and drifted_outputs:
        reasons.append(f"the model's outputs drifted: {', '.join(drifted_outputs)} (slo.drift.prediction)")
    return Verdict(
        model=contract.name,
        version=version,
        status="drift" if reasons else "no drift",
        drift_detected=bool(reasons),
        rows=window.rows,
        window=_window_facts(window),
        thresholds=drift.model_dump(),
        drift_share=round(share, 4),
        drifted_inputs=sorted({d.tensor for c, d in inputs.items() if d.drifted}),
        drifted_columns=drifted + drifted_outputs,
        prediction_drift=bool(drifted_outputs),
        prediction_drift_score=None if scored is None else scored.score,
        reasons=reasons,
        columns=columns,
    )


def _window_facts(window: Window) -> dict[str, Any]:
    if not window.rows:
        return {"first": None, "last": None, "requests": 0}
    return {
        "first": str(window.ts.min()) + "Z",
        "last": str(window.ts.max()) + "Z",
        "requests": len(set(window.request_ids)),
    }


def write_gauges(verdict: Verdict, path: Path, pushgateway: str | None = None) -> None:
    """The verdict as the gauges the alert rules read, in a textfile (and pushed when asked)."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

    registry = CollectorRegistry()
    labels = {"model": verdict.model, "version": verdict.version}

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            Gauge(name, doc, list(labels), registry=registry).labels(**labels).set(value)

    gauge("handoff_drift_window_rows", "Logged rows the last drift verdict compared", verdict.rows)
    gauge("handoff_drift_last_run_timestamp_seconds", "When the last drift verdict was made", time.time())
    if verdict.status != "not enough data":
        gauge("handoff_drift_share", "Share of input columns that drifted", verdict.drift_share)
        gauge("handoff_drift_detected", "1 when the verdict crossed slo.drift", float(verdict.drift_detected))
        gauge(
            "handoff_prediction_drift",
            "1 when an output column drifted",
            float(bool(verdict.prediction_drift)),
        )
        gauge(
            "handoff_prediction_drift_score",
            "The scored output's drift score",
            verdict.prediction_drift_score,
        )
    write_to_textfile(str(path), registry)
    if pushgateway:
        try:
            push_to_gateway(
                pushgateway, job=PUSH_JOB, registry=registry, grouping_key={"model": verdict.model}
            )
        except OSError as exc:
            raise HandoffError(
                f"could not push the drift gauges to {pushgateway}: {exc}", field="pushgateway"
            ) from None


def monitor(
    project_dir: Path | str,
    out_dir: Path | str,
    *,
    version: str | None = None,
    store: str | None = None,
    since: str | None = None,
    last_rows: int | None = None,
    pushgateway: str | None = None,
) -> Verdict:
    """Compare the payload log's window with the served version's reference; write the report,
    the verdict and the gauges into ``out_dir``."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    drift = project.contract.slo.drifting  # the project's thresholds, as the engineer set them now
    name = project.contract.name
    version = version or served_version(project)
    pushgateway = pushgateway or project.settings.monitoring.pushgateway
    contract, reference_inputs, reference_outputs, sha256 = _reference_of(project, name, version)
    if has_raw_hooks(contract):
        raise HandoffError(
            f"{name} v{version} answers raw requests (contract.yaml raw:): its payload log holds what "
            "clients send and receive, its reference profile the model's own tensors, which `handoff "
            "monitor` cannot compare yet",
            field="raw",
        )
    window = read_window(
        store or payload_store(project),
        since=parse_since(since),
        last_rows=last_rows or MAX_WINDOW_ROWS,
        model_version=version,
        model_sha256=sha256,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if window.rows < drift.min_rows:
        verdict = Verdict(
            model=name,
            version=version,
            status="not enough data",
            drift_detected=False,
            rows=window.rows,
            window=_window_facts(window),
            thresholds=drift.model_dump(),
            reasons=[
                f"{window.rows} logged rows of version {version}, "
                f"fewer than slo.drift.min_rows {drift.min_rows}"
            ],
        )
    else:
        current = _current(contract, window)
        inputs = [c for c in reference_inputs.columns if c in current.columns]
        outputs = [c for c in reference_outputs.columns if c in current.columns]
        reference = pd.concat([reference_inputs[inputs], reference_outputs[outputs]], ignore_index=True)
        snapshot, tested = _evidently(reference, current[inputs + outputs], inputs, outputs, drift)
        columns = {
            column: ColumnDrift(
                "input" if column in inputs else "output",
                tensor_of(column, [*contract.input_names, *contract.output_names]),
                method,
                _finite(score),
                threshold,
                drifted,
            )
            for column, (method, score, threshold, drifted) in tested.items()
        }
        verdict = _verdict(contract, drift, version, window, columns)
        snapshot.save_html(str(out / REPORT_FILE))
        verdict.report = str(out / REPORT_FILE)
    verdict.seconds = round(time.perf_counter() - started, 3)
    write_json(out / VERDICT_FILE, asdict(verdict))
    write_gauges(verdict, out / METRICS_FILE, pushgateway)
    return verdict


def _finite(score: float) -> float | None:
    """JSON has no NaN: a test that could not score is None."""
    return float(score) if np.isfinite(score) else None
