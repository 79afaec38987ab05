"""Alerting rules, Prometheus operator objects and a Grafana dashboard for a served model, made
from its contract.

Everything here is derived from ``contract.yaml`` (the model's name, which is the ``model`` label
the server puts on its metrics; ``slo.latency_p99_ms``; ``slo.drift``) and ``handoff.yaml``
(namespace, InferenceService name, replicas), so the alerts hold the model to the same SLO its
gates held it to before it was served:

- ``rules.yaml``: a Prometheus rule file. The latency SLO as an error budget (the p99 objective
  lets 1% of requests be slower than ``latency_p99_ms``) with multiwindow, multi-burn-rate alerts
  (Google's SRE workbook, "Alerting on SLOs"), the 5xx ratio, no traffic, absent metrics, and the
  drift gauges ``handoff monitor`` writes.
- ``prometheusrule.yaml`` and ``podmonitor.yaml``: the same rules as a Prometheus operator
  ``PrometheusRule``, and a ``PodMonitor`` that scrapes the KServe predictor's ``/metrics``.
- ``dashboard.json``: a Grafana dashboard whose every query names a metric the model server (or
  ``handoff monitor``) exports.

The functions return plain dicts (deterministic: the same project gives the same bytes, so the
files can be goldens); only ``write_monitoring`` touches the disk.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

from handoff.project import Project

# Where evaluate writes them in its report folder (register attaches them to the version), and
# where `handoff monitoring-config` writes them by default.
MONITORING_DIR = "monitoring"
RULES_FILE = "rules.yaml"
PROMETHEUS_RULE_FILE = "prometheusrule.yaml"
POD_MONITOR_FILE = "podmonitor.yaml"
DASHBOARD_FILE = "dashboard.json"

# The metrics the model server exports (handoff.serving.metrics; the payload log's counters) and
# the gauges `handoff monitor` writes. Every rule and panel below names one of these.
REQUESTS = "handoff_inference_requests_total"
LATENCY = "handoff_inference_request_duration_seconds"
BATCH_SIZE = "handoff_batch_size"
BATCH_REQUESTS = "handoff_batch_requests"
PAYLOAD_ROWS = "handoff_payload_log_rows_total"
PAYLOAD_DROPPED = "handoff_payload_log_dropped_total"
DRIFT_SHARE = "handoff_drift_share"
DRIFT_DETECTED = "handoff_drift_detected"
PREDICTION_DRIFT_SCORE = "handoff_prediction_drift_score"
PREDICTION_DRIFT = "handoff_prediction_drift"
DRIFT_WINDOW_ROWS = "handoff_drift_window_rows"
DRIFT_LAST_RUN = "handoff_drift_last_run_timestamp_seconds"

# A p99 objective: 1% of requests may be slower than latency_p99_ms. That 1% is the error budget
# the burn rates below are multiples of.
LATENCY_BUDGET = 0.01
ERROR_RATIO = 0.05  # 5xx share of requests that pages
MAX_DRIFT_AGE_S = 2 * 24 * 3600  # no verdict for this long: the monitor stopped running
NO_TRAFFIC_WINDOW = "15m"
PORT = 8080  # the handoff-onnx runtime's container port (manifests/base/serving-runtime.yaml)

ALERT_LATENCY_FAST = "HandoffLatencyBudgetBurnFast"
ALERT_LATENCY_SLOW = "HandoffLatencyBudgetBurnSlow"
ALERT_ERRORS = "HandoffErrorRatioHigh"
ALERT_NO_TRAFFIC = "HandoffNoTraffic"
ALERT_ABSENT = "HandoffMetricsAbsent"
ALERT_DRIFT = "HandoffDriftDetected"
ALERT_DRIFT_STALE = "HandoffDriftMonitorStale"

PAGE, TICKET = "page", "ticket"


@dataclass(frozen=True, kw_only=True)
class BurnRate:
    """One multiwindow burn-rate alert: the budget is spent ``factor`` times faster than the SLO
    allows over both windows. The long window makes it significant, the short one makes the alert
    stop soon after the burning stops."""

    alert: str
    severity: str
    factor: float
    long: str
    short: str
    budget_spent: str  # what this rate spends, for the description


# The SRE workbook's pair for a 30-day budget: 14.4x over 1 h spends 2% of it (page), 6x over 6 h
# spends 5% (ticket).
BURN_RATES = (
    BurnRate(alert=ALERT_LATENCY_FAST, severity=PAGE, factor=14.4, long="1h", short="5m", budget_spent="2%"),
    BurnRate(alert=ALERT_LATENCY_SLOW, severity=TICKET, factor=6, long="6h", short="30m", budget_spent="5%"),
)

# Aggregated over pods and replicas, kept apart per namespace (dev and prod may share a Prometheus).
BY = "namespace, model"
RUNBOOK_ROLLBACK = "`handoff rollback` serves the previous champion again"


@dataclass(frozen=True)
class Targets:
    """What the generated files are about, read from the project."""

    model: str  # contract name: the ``model`` label
    isvc: str  # InferenceService name (handoff.yaml project): the predictor pods' label
    namespace: str
    p99_ms: float
    bound: str  # the latency bucket bound equal to the p99 SLO, as the server writes ``le``
    max_drift_share: float
    always_served: bool  # min_replicas >= 1: a model without metrics is down, not scaled to zero


def targets(project: Project) -> Targets:
    """The model, SLO, drift threshold and Kubernetes names the generated files are made of."""
    slo = project.contract.slo
    settings = project.settings
    return Targets(
        model=project.contract.name,
        isvc=settings.project,
        namespace=settings.namespace,
        p99_ms=slo.latency_p99_ms,
        bound=floatToGoString(slo.latency_p99_ms / 1000),
        max_drift_share=slo.drifting.max_drift_share,
        always_served=settings.serving.kserve.min_replicas >= 1,
    )


def _ms(value: float) -> str:
    return f"{value:g} ms"


def _slow_ratio_record(window: str) -> str:
    return f"namespace_model:handoff_inference_slow_requests:ratio_rate{window}"


ERROR_RATIO_RECORD = "namespace_model:handoff_inference_errors:ratio_rate5m"


# --- rules ---------------------------------------------------------------------------------------


def _recording_rules(t: Targets) -> list[dict[str, Any]]:
    sel = f'model="{t.model}"'
    windows = sorted({w for b in BURN_RATES for w in (b.long, b.short)}, key=_seconds)
    records = [
        {
            "record": _slow_ratio_record(window),
            # Share of requests slower than the p99 SLO: all requests minus those in the bucket
            # whose bound is the SLO (the server adds that bound to its buckets).
            "expr": (
                f"1 - (\n"
                f'  sum by ({BY}) (rate({LATENCY}_bucket{{{sel}, le="{t.bound}"}}[{window}]))\n'
                f"  /\n"
                f"  sum by ({BY}) (rate({LATENCY}_count{{{sel}}}[{window}]))\n"
                f")"
            ),
        }
        for window in windows
    ]
    records.append(
        {
            "record": ERROR_RATIO_RECORD,
            # Only 5xx are the service's failures: a 4xx is a request the contract refused (wrong
            # shape, dtype, size), the caller's to fix, and counting it would page the model's
            # owners for someone else's bug. The dashboard shows 4xx apart. `or ... * 0`: a
            # server that never failed has no 5xx series at all, and its ratio is 0, not absent.
            "expr": (
                f"(\n"
                f'  sum by ({BY}) (rate({REQUESTS}{{{sel}, code=~"5.."}}[5m]))\n'
                f"  or\n"
                f"  sum by ({BY}) (rate({REQUESTS}{{{sel}}}[5m])) * 0\n"
                f")\n"
                f"/\n"
                f"sum by ({BY}) (rate({REQUESTS}{{{sel}}}[5m]))"
            ),
        }
    )
    return records


def _seconds(window: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(window[:-1]) * units[window[-1]]


def _alert(
    name: str, expr: str, severity: str, summary: str, description: str, for_: str | None = None
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def _serving_alerts(t: Targets) -> list[dict[str, Any]]:
    sel = f'model="{t.model}"'
    slo = f"p99 latency SLO of {_ms(t.p99_ms)} (contract.yaml slo.latency_p99_ms)"
    alerts = []
    for burn in BURN_RATES:
        threshold = f"({burn.factor:g} * {LATENCY_BUDGET:g})"
        alerts.append(
            _alert(
                burn.alert,
                # No `for`: the short window already needs the burning to go on, and it lets the
                # alert resolve minutes after the burning stops.
                f"{_slow_ratio_record(burn.long)}{{{sel}}} > {threshold}\n"
                f"and\n"
                f"{_slow_ratio_record(burn.short)}{{{sel}}} > {threshold}",
                burn.severity,
                f"Model {t.model} is spending its latency error budget {burn.factor:g}x too fast",
                f"Over the last {burn.long} and the last {burn.short}, more than "
                f"{burn.factor * LATENCY_BUDGET * 100:g}% of requests to model {t.model} took longer than "
                f"{_ms(t.p99_ms)}; its {slo} allows 1%. At this rate {burn.budget_spent} of a 30-day "
                f"error budget goes in {burn.long}. Look at the dashboard's latency and batch size "
                f"panels: longer latency with larger batches or more requests is load (raise "
                f"serving.kserve.max_replicas in handoff.yaml); a step at a rollout is the new "
                f"version ({RUNBOOK_ROLLBACK}). `handoff monitor` says whether the inputs changed.",
            )
        )
    alerts.append(
        _alert(
            ALERT_ERRORS,
            f"{ERROR_RATIO_RECORD}{{{sel}}} > {ERROR_RATIO:g}",
            PAGE,
            f"Model {t.model} answers more than {ERROR_RATIO:.0%} of requests with a server error",
            f"More than {ERROR_RATIO:.0%} of requests to model {t.model} got a 5xx over 5 minutes, "
            f"for 5 minutes (4xx, requests its contract refused, are not counted). Look at the "
            f"predictor's logs: 503s are overload (more connections or request bytes than "
            f"handoff.yaml's serving limits; raise serving.kserve.max_replicas), 500s are the model "
            f"failing. If it began with a rollout, {RUNBOOK_ROLLBACK}.",
            for_="5m",
        )
    )
    alerts.append(
        _alert(
            ALERT_NO_TRAFFIC,
            # The model was served 15 minutes ago and still is (its latency series exists from
            # the server's start, before any request), and nobody called it in between. Without
            # the `offset` a server that just started would count as idle.
            f"sum by ({BY}) (increase({LATENCY}_count{{{sel}}}[{NO_TRAFFIC_WINDOW}])) == 0\n"
            f"and on ({BY})\n"
            f"sum by ({BY}) ({LATENCY}_count{{{sel}}} offset {NO_TRAFFIC_WINDOW})",
            TICKET,
            f"Model {t.model} is served but got no requests for {NO_TRAFFIC_WINDOW}",
            f"The server of model {t.model} is up and scraped but answered no request in the last "
            f"{NO_TRAFFIC_WINDOW}. The callers or the route to the model are broken: check the "
            f"callers' logs and the InferenceService's URL and ingress. If the callers were moved "
            f"to another version on purpose, silence this alert.",
        )
    )
    if t.always_served:
        alerts.append(
            _alert(
                ALERT_ABSENT,
                # absent() keeps the equality matchers as labels, so the alert names the model.
                f"absent({LATENCY}_count{{{sel}}})",
                PAGE,
                f"No metrics from model {t.model} for 15m",
                f"Prometheus has no latency series from model {t.model}'s server, which handoff.yaml "
                f"keeps running (serving.kserve.min_replicas >= 1). The predictor is down or not "
                f"scraped: look at the InferenceService {t.isvc}'s pods and events, and at the "
                f"PodMonitor {t.isvc}-predictor (these metrics come from the handoff-onnx runtime, "
                f"handoff.yaml serving.kserve.runtime: kserve). If a rollout broke it, "
                f"{RUNBOOK_ROLLBACK}.",
                for_="15m",
            )
        )
    return alerts


def _drift_alerts(t: Targets) -> list[dict[str, Any]]:
    sel = f'model="{t.model}"'
    look = (
        "Run `handoff monitor` for the report: which inputs moved, and whether the predictions "
        "did. A change in the world calls for retraining on recent data; a change that came with "
        "a new version calls for `handoff rollback`."
    )
    # max by version: `handoff monitor` labels each verdict with the version it watched, and a
    # Pushgateway adds its own job and instance labels. One alert per verdict: the detected flag
    # already holds the share's threshold (share >= slo.drift.max_drift_share, or the predictions
    # drifted), so a second rule on the share would raise a second ticket for the same event; the
    # share is on the dashboard, against its threshold line.
    by = f"{BY}, version"
    return [
        _alert(
            ALERT_DRIFT,
            f"max by ({by}) ({DRIFT_DETECTED}{{{sel}}}) == 1",
            TICKET,
            f"Model {t.model}'s inputs or predictions drifted",
            f"`handoff monitor`'s last verdict for model {t.model} crossed the contract's drift "
            f"thresholds (contract.yaml slo.drift). {look}",
        ),
        _alert(
            ALERT_DRIFT_STALE,
            f"time() - max by ({BY}) ({DRIFT_LAST_RUN}{{{sel}}}) > {MAX_DRIFT_AGE_S}",
            TICKET,
            f"No drift verdict for model {t.model} in {MAX_DRIFT_AGE_S // 86400} days",
            f"`handoff monitor` has not reported on model {t.model} for more than "
            f"{MAX_DRIFT_AGE_S // 86400} days, so drift would go unnoticed. Look at its schedule "
            f"(the recurring run or CronWorkflow) and its last run's logs, and run `handoff "
            f"monitor` by hand.",
        ),
    ]


def rules(project: Project) -> dict[str, Any]:
    """The Prometheus rule file (``groups``) for the project's served model."""
    t = targets(project)
    return {
        "groups": [
            # Recording rules first: a group evaluates its rules in order, so the alerts read
            # ratios of the same evaluation.
            {
                "name": f"handoff-{t.model}-serving",
                "rules": _recording_rules(t) + _serving_alerts(t),
            },
            {"name": f"handoff-{t.model}-drift", "rules": _drift_alerts(t)},
        ]
    }


def alert_names(project: Project) -> list[str]:
    """Every alert ``rules(project)`` defines, in order."""
    return [r["alert"] for g in rules(project)["groups"] for r in g["rules"] if "alert" in r]


# --- Prometheus operator objects -----------------------------------------------------------------


def _labels(t: Targets) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": t.isvc,
        "app.kubernetes.io/component": "monitoring",
        "app.kubernetes.io/part-of": "handoff",
    }


def prometheus_rule(project: Project) -> dict[str, Any]:
    """``rules(project)`` as a monitoring.coreos.com/v1 PrometheusRule in the project's namespace."""
    t = targets(project)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": f"{t.isvc}-handoff", "namespace": t.namespace, "labels": _labels(t)},
        "spec": rules(project),
    }


def pod_monitor(project: Project) -> dict[str, Any]:
    """A monitoring.coreos.com/v1 PodMonitor scraping the predictor pods' ``/metrics``."""
    t = targets(project)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{t.isvc}-predictor", "namespace": t.namespace, "labels": _labels(t)},
        "spec": {
            "selector": {
                "matchLabels": {
                    "serving.kserve.io/inferenceservice": t.isvc,
                    "component": "predictor",
                }
            },
            "podMetricsEndpoints": [{"portNumber": PORT, "path": "/metrics", "interval": "30s"}],
        },
    }


# --- dashboard -----------------------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model="$model"'


def _rate(metric: str, matchers: str = MODEL) -> str:
    return f"rate({metric}{{{matchers}}}[$__rate_interval])"


def _quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q:g}, sum by (le) ({_rate(histogram + '_bucket')}))"


def _target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}


def _panel(
    title: str,
    description: str,
    targets_: list[tuple[str, str]],
    unit: str,
    *,
    threshold: float | None = None,
    units: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A time series panel; ``threshold`` draws a red line (an SLO or a contract limit), ``units``
    gives a query (by refId) a unit of its own."""
    defaults: dict[str, Any] = {"unit": unit, "custom": {"drawStyle": "line", "fillOpacity": 10}}
    if threshold is not None:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": threshold}],
        }
        defaults["custom"]["thresholdsStyle"] = {"mode": "line"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": defaults,
            "overrides": [
                {
                    "matcher": {"id": "byFrameRefID", "options": ref},
                    "properties": [{"id": "unit", "value": unit_}],
                }
                for ref, unit_ in sorted((units or {}).items())
            ],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": [_target(chr(ord("A") + i), expr, legend) for i, (expr, legend) in enumerate(targets_)],
    }


def _panels(t: Targets) -> list[dict[str, Any]]:
    five = f'{MODEL}, code=~"5.."'
    four = f'{MODEL}, code=~"4.."'
    total = f"sum({_rate(REQUESTS)})"
    seconds = t.p99_ms / 1000
    slo_bucket = f'{MODEL}, le="{t.bound}"'
    return [
        _panel(
            "Requests by status code",
            "Inference requests answered per second, by HTTP status code.",
            [(f"sum by (code) ({_rate(REQUESTS)})", "{{code}}")],
            "reqps",
        ),
        _panel(
            "Error ratio",
            "Share of requests answered with a server error (5xx: alerts at "
            f"{ERROR_RATIO:.0%}) and with a client error (4xx: requests the contract refused).",
            [
                # `or vector(0)`: no 5xx yet is a ratio of 0, not an empty panel.
                (f"(sum({_rate(REQUESTS, five)}) or vector(0)) / {total}", "5xx"),
                (f"(sum({_rate(REQUESTS, four)}) or vector(0)) / {total}", "4xx"),
            ],
            "percentunit",
            threshold=ERROR_RATIO,
        ),
        _panel(
            "Latency p50 and p99 against the SLO",
            f"Request latency as clients see it; the red line is the contract's p99 SLO ({_ms(t.p99_ms)}).",
            [(_quantile(0.5, LATENCY), "p50"), (_quantile(0.99, LATENCY), "p99")],
            "s",
            threshold=seconds,
        ),
        _panel(
            "Requests slower than the SLO",
            f"Share of requests slower than {_ms(t.p99_ms)}; the p99 SLO allows "
            f"{LATENCY_BUDGET:.0%} (the red line). The burn-rate alerts fire at "
            f"{BURN_RATES[0].factor:g}x and {BURN_RATES[1].factor:g}x this.",
            [
                (
                    f"1 - sum({_rate(LATENCY + '_bucket', slo_bucket)}) / sum({_rate(LATENCY + '_count')})",
                    "slower than the SLO",
                )
            ],
            "percentunit",
            threshold=LATENCY_BUDGET,
        ),
        _panel(
            "Batch size (rows per model run)",
            "Rows in each model run: the dynamic batcher joins concurrent requests.",
            [(_quantile(0.5, BATCH_SIZE), "p50"), (_quantile(0.99, BATCH_SIZE), "p99")],
            "short",
        ),
        _panel(
            "Requests per model run",
            "Requests joined into one model run (mean and p99).",
            [
                (
                    f"sum({_rate(BATCH_REQUESTS + '_sum')}) / sum({_rate(BATCH_REQUESTS + '_count')})",
                    "mean",
                ),
                (_quantile(0.99, BATCH_REQUESTS), "p99"),
            ],
            "short",
        ),
        _panel(
            "Payload log",
            "Request rows written to the payload log `handoff monitor` reads, and rows dropped "
            "(the writer fell behind).",
            [
                (f"sum({_rate(PAYLOAD_ROWS)})", "rows written"),
                (f"sum({_rate(PAYLOAD_DROPPED)})", "rows dropped"),
            ],
            "rowsps",
        ),
        _panel(
            "Input drift share",
            f"Share of input features that drifted in `handoff monitor`'s last verdict, per "
            f"version; the red line is contract.yaml slo.drift.max_drift_share "
            f"({t.max_drift_share:g}).",
            [
                (f"max by (version) ({DRIFT_SHARE}{{{MODEL}}})", "drift share v{{version}}"),
                (f"max by (version) ({DRIFT_DETECTED}{{{MODEL}}})", "drift detected v{{version}}"),
            ],
            "percentunit",
            threshold=t.max_drift_share,
            units={"B": "none"},
        ),
        _panel(
            "Prediction drift",
            "The prediction drift test's score, and whether the predictions drifted (1).",
            [
                (f"max by (version) ({PREDICTION_DRIFT_SCORE}{{{MODEL}}})", "score v{{version}}"),
                (f"max by (version) ({PREDICTION_DRIFT}{{{MODEL}}})", "drifted v{{version}}"),
            ],
            "short",
        ),
        _panel(
            "Drift monitor",
            f"Rows in the window the last verdict compared, and the verdict's age (alerts past "
            f"{MAX_DRIFT_AGE_S // 86400} days).",
            [
                (f"max by (version) ({DRIFT_WINDOW_ROWS}{{{MODEL}}})", "window rows v{{version}}"),
                (f"time() - max({DRIFT_LAST_RUN}{{{MODEL}}})", "age of the last verdict"),
            ],
            "short",
            units={"B": "s"},
        ),
    ]


def _uid(model: str) -> str:
    uid = f"handoff-{model}"
    # Grafana caps uids at 40 characters; a hash keeps long names apart.
    return uid if len(uid) <= 40 else f"handoff-{hashlib.sha256(model.encode()).hexdigest()[:32]}"


def dashboard(project: Project) -> dict[str, Any]:
    """A Grafana dashboard (JSON model) for the project's model: traffic, errors, latency against
    the SLO, batching, the payload log and drift."""
    t = targets(project)
    panels = _panels(t)
    for i, panel in enumerate(panels):
        panel["id"] = i + 1
        panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return {
        "annotations": {"list": []},
        "description": f"Model {t.model} as served: generated from its contract.yaml by handoff.",
        "editable": True,
        "graphTooltip": 1,
        "panels": panels,
        "refresh": "1m",
        "schemaVersion": 39,
        "tags": ["handoff", t.model],
        "templating": {
            "list": [
                {
                    "current": {},
                    "hide": 0,
                    "label": "Data source",
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "type": "datasource",
                },
                {
                    "current": {"text": t.model, "value": t.model},
                    "datasource": DATASOURCE,
                    "definition": f"label_values({LATENCY}_count, model)",
                    "hide": 0,
                    "label": "Model",
                    "name": "model",
                    "options": [],
                    "query": {"query": f"label_values({LATENCY}_count, model)", "refId": "model"},
                    "refresh": 1,
                    "type": "query",
                },
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "title": f"{t.model} (handoff)",
        "uid": _uid(t.model),
        "version": 1,
    }


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    """Every query of ``board``'s panels, in panel order."""
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


# --- files ---------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer PromQL expressions) as literal blocks, readable in a diff."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(header: str, obj: dict[str, Any]) -> bytes:
    body = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)
    paragraphs = [textwrap.fill(" ".join(p.split()), width=98) for p in header.strip().split("\n\n")]
    comment = "".join(f"# {line}".rstrip() + "\n" for line in "\n\n".join(paragraphs).splitlines())
    return (comment + body).encode()


GENERATED = (
    "Generated from contract.yaml and handoff.yaml by `handoff monitoring-config`: edit those and "
    "generate again rather than editing this file."
)


def _headers(t: Targets) -> dict[str, str]:
    return {
        RULES_FILE: f"""
Prometheus alerting rules for model {t.model} (p99 SLO {_ms(t.p99_ms)}). {GENERATED}

Load it with `rule_files:` in prometheus.yml, or apply {PROMETHEUS_RULE_FILE} where the
Prometheus operator runs. Check it with `promtool check rules {RULES_FILE}`.
""",
        PROMETHEUS_RULE_FILE: f"""
The rules of {RULES_FILE} as a Prometheus operator PrometheusRule. {GENERATED}

The operator loads it only into a Prometheus that selects it: its ruleNamespaceSelector must
include namespace {t.namespace} and its ruleSelector must match these labels.
kube-prometheus-stack (Helm) selects `release: <its release name>` unless installed with
prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false: add the label your Prometheus
selects (a kustomize `labels:` entry).
""",
        POD_MONITOR_FILE: f"""
Scrapes /metrics of the model server on the predictor pods of InferenceService {t.isvc}.
{GENERATED}

A PodMonitor, not a ServiceMonitor: in Serverless mode no Service exposes the container's port
(Knative's Services lead to its activator and queue-proxy), and KServe labels the predictor pods
alike in Serverless and raw deployment modes. The metrics come from the handoff-onnx runtime
(handoff.yaml serving.kserve.runtime: kserve) on container port {PORT}; Triton exports metrics of
its own. portNumber needs Prometheus operator 0.79 or later (older ones: targetPort: {PORT}).

Prometheus must be allowed to reach the pods on port {PORT} (a NetworkPolicy; with an Istio
sidecar in STRICT mTLS, Istio's metrics merging or a PERMISSIVE port), and must select this
object as it selects the PrometheusRule (podMonitorSelector, podMonitorNamespaceSelector).
""",
    }


def write_monitoring(project: Project, out_dir: Path) -> list[Path]:
    """Write rules.yaml, prometheusrule.yaml, podmonitor.yaml and dashboard.json into ``out_dir``;
    the paths written."""
    t = targets(project)
    headers = _headers(t)
    files = {
        RULES_FILE: _yaml(headers[RULES_FILE], rules(project)),
        PROMETHEUS_RULE_FILE: _yaml(headers[PROMETHEUS_RULE_FILE], prometheus_rule(project)),
        POD_MONITOR_FILE: _yaml(headers[POD_MONITOR_FILE], pod_monitor(project)),
        DASHBOARD_FILE: (json.dumps(dashboard(project), indent=2, sort_keys=True) + "\n").encode(),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        # Plain writes: these are files to commit and apply, readable by everyone who may
        # (atomic_write_bytes makes private ones).
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    return written
