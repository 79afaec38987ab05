"""Alerting rules and the Grafana dashboard made from the contract, checked with the real Prometheus.

Every alert of the default project's rule file fires on synthetic series that break its rule and
stays quiet on series that do not, in ``promtool test rules``. The dashboard is checked against a
real model server: one real ``prometheus`` scrapes it (and a ``metrics.prom`` with the drift
gauges, as ``handoff monitor`` writes it) with the generated rules loaded, and every panel's query
must return a sample there, so each names a metric and label the server really exports.
``manifests/monitoring/`` holds the default project's files; regenerate them with
``pytest tests/test_monitoring_config.py --regenerate-goldens``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from handoff import monitoring_config as mc
from handoff.project import Project
from handoff.serving import local_server
from tests.model_server import start_server

from .conftest import TEMPLATE, check_golden, edit_yaml

pytestmark = pytest.mark.local

GOLDENS = TEMPLATE / "manifests" / "monitoring"
GENERATED = (mc.RULES_FILE, mc.PROMETHEUS_RULE_FILE, mc.POD_MONITOR_FILE, mc.DASHBOARD_FILE)
NAMESPACE = "ml-models"  # the namespace label the synthetic series carry
VERSION = "3"  # the version the drift gauges and the served model carry
ALERTS = [
    "HandoffLatencyBudgetBurnFast",
    "HandoffLatencyBudgetBurnSlow",
    "HandoffErrorRatioHigh",
    "HandoffNoTraffic",
    "HandoffMetricsAbsent",
    "HandoffDriftDetected",
    "HandoffDriftMonitorStale",
]
RATE_INTERVAL = "1m"  # $__rate_interval at a 1 s scrape interval: many samples per window


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(
            f"{name} not found on PATH: install Prometheus (Debian and Ubuntu: `apt-get install "
            "prometheus`; scripts/install-test-deps.sh does)"
        )
    return found


@pytest.fixture(scope="module")
def loaded(default_project: Path) -> Project:
    return Project.load(default_project)


@pytest.fixture(scope="module")
def written(loaded: Project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monitoring")
    mc.write_monitoring(loaded, out)
    return out


# --- the rule file ---------------------------------------------------------------------------


def test_promtool_accepts_the_rule_file_and_the_prometheus_rule_holds_the_same_groups(
    loaded: Project, written: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(written / mc.RULES_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 12 rules found" in done.stdout
    # What the operator loads is the same rule file: its spec, checked by promtool too.
    operator = yaml.safe_load((written / mc.PROMETHEUS_RULE_FILE).read_text())
    assert operator["spec"] == yaml.safe_load((written / mc.RULES_FILE).read_text()) == mc.rules(loaded)
    assert operator["metadata"]["namespace"] == loaded.settings.namespace
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(operator["spec"]))
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(tmp_path / "spec.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_names_the_model_and_says_what_to_look_at(loaded: Project) -> None:
    assert mc.alert_names(loaded) == ALERTS
    for rule in alert_rules(loaded).values():
        assert rule["labels"]["severity"] in ("page", "ticket")
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        assert "digits-classifier" in rule["annotations"]["summary"], rule["alert"]
        assert re.search(r"[Ll]ook at|[Cc]heck|Run `handoff", rule["annotations"]["description"]), rule[
            "alert"
        ]
        assert "{{" not in text  # annotations are Go templates: literal braces would break them
    latency = alert_rules(loaded)["HandoffLatencyBudgetBurnFast"]["annotations"]["description"]
    assert "25 ms" in latency and "slo.latency_p99_ms" in latency and "handoff rollback" in latency


def alert_rules(project: Project) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in mc.rules(project)["groups"] for r in g["rules"] if "alert" in r}


# --- promtool test rules: each alert fires on series that break it, and only on those --------


@dataclass(frozen=True)
class Case:
    """Synthetic series (metric selector -> promtool's expanding notation) and when to evaluate."""

    series: dict[str, str]
    eval_time: str


@dataclass(frozen=True)
class AlertTest:
    interval: str
    firing: Case
    quiet: tuple[Case, ...]
    labels: dict[str, str]  # the firing alert's labels besides severity


def series_of(model: str, bound: str) -> dict[str, str]:
    """Selectors of the served model's series, one pod's, as a scrape labels them."""
    target = f'model="{model}", namespace="{NAMESPACE}", pod="{model}-predictor-1"'
    return {
        "slow_ok": f'handoff_inference_request_duration_seconds_bucket{{{target}, le="{bound}"}}',
        "count": f"handoff_inference_request_duration_seconds_count{{{target}}}",
        "200": f'handoff_inference_requests_total{{{target}, code="200"}}',
        "400": f'handoff_inference_requests_total{{{target}, code="400"}}',
        "500": f'handoff_inference_requests_total{{{target}, code="500"}}',
    }


def drift_series(metric: str, model: str) -> str:
    # As a Pushgateway serves them: `handoff monitor`'s labels and the gateway's job.
    return f'{metric}{{model="{model}", version="{VERSION}", namespace="{NAMESPACE}", job="handoff-monitor"}}'


def alert_tests(project: Project) -> dict[str, AlertTest]:
    t = mc.targets(project)
    s = series_of(t.model, t.bound)
    other = series_of("another-model", t.bound)
    served = {"namespace": NAMESPACE, "model": t.model}
    latency = {s["count"]: "0+60x420"}  # 60 requests a minute for 7 hours
    return {
        "HandoffLatencyBudgetBurnFast": AlertTest(
            "1m",
            # Half the requests slower than the SLO: 50x the budget's rate.
            Case({**latency, s["slow_ok"]: "0+30x90"}, "70m"),
            (
                # 10% slow: 10x, under the page's 14.4x.
                Case({**latency, s["slow_ok"]: "0+54x90"}, "70m"),
                # An hour of slow requests, then fast ones: the 5 minute window says it stopped.
                Case({**latency, s["slow_ok"]: "0+30x60 1800+60x30"}, "80m"),
                # Another model's slow requests are not this one's.
                Case({other["count"]: "0+60x90", other["slow_ok"]: "0x90"}, "70m"),
            ),
            served,
        ),
        "HandoffLatencyBudgetBurnSlow": AlertTest(
            "1m",
            # 10% slow for 7 hours: 10x the budget's rate, over the ticket's 6x.
            Case({**latency, s["slow_ok"]: "0+54x420"}, "400m"),
            (
                Case({**latency, s["slow_ok"]: "0+58.2x420"}, "400m"),  # 3% slow: 3x
                Case({**latency, s["slow_ok"]: "0+54x360 19440+60x60"}, "410m"),  # stopped 50m ago
            ),
            served,
        ),
        "HandoffErrorRatioHigh": AlertTest(
            "1m",
            # 10% of requests answered 500 for half an hour.
            Case({s["200"]: "0+54x30", s["500"]: "0+6x30"}, "20m"),
            (
                # As many 400s as successes: refused requests are the callers' errors.
                Case({s["200"]: "0+60x30", s["400"]: "0+60x30", s["500"]: "0+1x30"}, "20m"),
                Case({s["200"]: "0+60x30", other["500"]: "0+60x30"}, "20m"),
            ),
            served,
        ),
        "HandoffNoTraffic": AlertTest(
            "1m",
            Case({s["count"]: "500x40"}, "30m"),  # served, and the count stands still
            (
                Case({s["count"]: "0+10x40"}, "30m"),
                # A server that started 10 minutes ago has not been idle for 15.
                Case({s["count"]: "_x20 0x20"}, "30m"),
            ),
            served,
        ),
        "HandoffMetricsAbsent": AlertTest(
            "1m",
            Case({other["count"]: "0+60x30"}, "20m"),  # only another model's server is scraped
            (Case({s["count"]: "0x30"}, "20m"), Case({other["count"]: "0+60x30"}, "10m")),
            {"model": t.model},
        ),
        "HandoffDriftDetected": AlertTest(
            "1m",
            Case({drift_series(mc.DRIFT_DETECTED, t.model): "1x10"}, "5m"),
            (
                Case({drift_series(mc.DRIFT_DETECTED, t.model): "0x10"}, "5m"),
                Case({drift_series(mc.DRIFT_DETECTED, "another-model"): "1x10"}, "5m"),
            ),
            {**served, "version": VERSION},
        ),
        "HandoffDriftMonitorStale": AlertTest(
            "1h",
            # The last verdict's time stays at the epoch, where promtool's clock starts.
            Case({drift_series(mc.DRIFT_LAST_RUN, t.model): "0x60"}, "50h"),
            (Case({drift_series(mc.DRIFT_LAST_RUN, t.model): "0+3600x60"}, "50h"),),  # hourly runs
            served,
        ),
    }


def promtool_test(rule_file: Path, test_file: Path, interval: str, tests: list[dict[str, Any]]) -> str:
    """promtool's report of failed cases; empty when all passed."""
    spec = {"rule_files": [str(rule_file)], "evaluation_interval": interval, "tests": tests}
    test_file.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [tool("promtool"), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    return "" if done.returncode == 0 else done.stdout + done.stderr


def unit_test(interval: str, case: Case, alert: str, expected: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "interval": interval,
        "input_series": [{"series": k, "values": v} for k, v in case.series.items()],
        "alert_rule_test": [{"alertname": alert, "eval_time": case.eval_time, "exp_alerts": expected}],
    }


def test_every_alert_has_a_promtool_test(loaded: Project) -> None:
    assert sorted(alert_tests(loaded)) == sorted(mc.alert_names(loaded))


@pytest.mark.parametrize("alert", ALERTS)
def test_the_alert_fires_when_its_rule_is_broken_and_stays_quiet_otherwise(
    alert: str, loaded: Project, written: Path, tmp_path: Path
) -> None:
    spec = alert_tests(loaded)[alert]
    rule = alert_rules(loaded)[alert]
    expected = [{"exp_labels": {**spec.labels, **rule["labels"]}, "exp_annotations": rule["annotations"]}]
    # One promtool run: the firing case first, then the quiet ones (its report names the time
    # and the alerts it got).
    cases = [unit_test(spec.interval, spec.firing, alert, expected)]
    cases += [unit_test(spec.interval, case, alert, []) for case in spec.quiet]
    failed = promtool_test(written / mc.RULES_FILE, tmp_path / "test.yaml", spec.interval, cases)
    assert failed == "", f"{alert}: a case failed (the first fires, the others must not):\n{failed}"


def test_a_drift_verdict_raises_one_ticket(loaded: Project, written: Path, tmp_path: Path) -> None:
    """The gauges of one drift verdict (the share at or over slo.drift.max_drift_share, the
    detected flag 1) are one event: HandoffDriftDetected fires and no other drift alert does."""
    t = mc.targets(loaded)
    rule = alert_rules(loaded)[mc.ALERT_DRIFT]
    labels = {"namespace": NAMESPACE, "model": t.model, "version": VERSION, **rule["labels"]}
    drift_alerts = [name for name, r in alert_rules(loaded).items() if "drift" in r["expr"]]
    cases = []
    for share in (t.max_drift_share, 1.0):
        gauges = {
            drift_series(mc.DRIFT_SHARE, t.model): f"{share:g}x10",
            drift_series(mc.DRIFT_DETECTED, t.model): "1x10",
            drift_series(mc.DRIFT_LAST_RUN, t.model): "0+60x10",  # a fresh verdict every minute
        }
        for alert in drift_alerts:
            fired = alert == mc.ALERT_DRIFT
            expected = [{"exp_labels": labels, "exp_annotations": rule["annotations"]}] if fired else []
            cases.append(unit_test("1m", Case(gauges, "5m"), alert, expected))
    failed = promtool_test(written / mc.RULES_FILE, tmp_path / "test.yaml", "1m", cases)
    assert failed == "", f"one drift verdict must raise one ticket:\n{failed}"


# --- made from the contract and handoff.yaml --------------------------------------------------


def test_a_stricter_contract_moves_the_slo_bound_and_the_drift_threshold(
    project: Path, tmp_path: Path
) -> None:
    def stricter(contract: dict[str, Any]) -> None:
        contract["slo"]["latency_p99_ms"] = 40
        contract["slo"]["drift"] = {"max_drift_share": 0.3}

    edit_yaml(project / "contract.yaml", stricter)
    edit_yaml(project / "handoff.yaml", lambda h: h["serving"]["kserve"].update(min_replicas=0))
    changed = Project.load(project)
    text = "\n".join(r["expr"] for g in mc.rules(changed)["groups"] for r in g["rules"])
    # The bucket bound as the server writes it (prometheus_client's floatToGoString of 0.04 s).
    assert 'le="0.04"' in text and 'le="0.025"' not in text
    assert "40 ms" in alert_rules(changed)["HandoffLatencyBudgetBurnFast"]["annotations"]["description"]
    # Scaled to zero when idle (min_replicas 0), a model without metrics is not an outage.
    assert "HandoffMetricsAbsent" not in mc.alert_names(changed)
    panels = {p["title"]: p for p in mc.dashboard(changed)["panels"]}
    steps = panels["Latency p50 and p99 against the SLO"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == 0.04
    # The drift share's threshold line (the verdict, so HandoffDriftDetected, holds it too).
    drift = panels["Input drift share"]
    assert drift["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 0.3
    assert "(0.3)" in drift["description"]
    # And the moved rules still fire where they should, and only there.
    mc.write_monitoring(changed, tmp_path / "out")
    specs = alert_tests(changed)
    for alert in ("HandoffLatencyBudgetBurnFast",):
        rule, spec = alert_rules(changed)[alert], specs[alert]
        expected = [{"exp_labels": {**spec.labels, **rule["labels"]}, "exp_annotations": rule["annotations"]}]
        cases = [unit_test(spec.interval, spec.firing, alert, expected)]
        cases += [unit_test(spec.interval, case, alert, []) for case in spec.quiet]
        failed = promtool_test(tmp_path / "out" / mc.RULES_FILE, tmp_path / "test.yaml", spec.interval, cases)
        assert failed == "", failed


def test_the_pod_monitor_scrapes_the_predictor_pods_of_the_deployed_service(loaded: Project) -> None:
    monitor = mc.pod_monitor(loaded)
    assert monitor["metadata"]["namespace"] == loaded.settings.namespace
    # KServe labels every predictor pod with its InferenceService's name (the deploy step names it
    # after handoff.yaml's project) and its component, in Serverless and raw deployment modes.
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": loaded.settings.project,
        "component": "predictor",
    }
    # The handoff-onnx runtime's container port, where the server answers /metrics.
    runtime = yaml.safe_load((TEMPLATE / "manifests/base/serving-runtime.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert [p["containerPort"] for p in container["ports"]] == [endpoint["portNumber"]]
    assert endpoint["path"] == "/metrics"


@pytest.mark.golden
@pytest.mark.parametrize("name", GENERATED)
def test_manifests_monitoring_holds_what_the_default_project_generates(
    written: Path, name: str, request: pytest.FixtureRequest
) -> None:
    actual = (written / name).read_text()
    check_golden(
        GOLDENS / name, actual, request, "tests/test_monitoring_config.py", "the default project generates"
    )
    assert str(TEMPLATE) not in actual and "/tmp/" not in actual and "pytest" not in actual


# --- the dashboard and the rules against a real server ----------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def post(url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def images(rows: int, width: int = 8) -> dict[str, Any]:
    data = [0.5] * (rows * 8 * width)
    return {"inputs": [{"name": "image", "shape": [rows, 1, 8, width], "datatype": "FP32", "data": data}]}


def write_drift_metrics(path: Path, model: str) -> None:
    """The gauges `handoff monitor` writes, as prometheus_client writes a textfile."""
    registry = CollectorRegistry()
    values = {
        mc.DRIFT_SHARE: 0.2,
        mc.DRIFT_DETECTED: 0,
        mc.PREDICTION_DRIFT_SCORE: 0.41,
        mc.PREDICTION_DRIFT: 0,
        mc.DRIFT_WINDOW_ROWS: 500,
        mc.DRIFT_LAST_RUN: time.time(),
    }
    for name, value in values.items():
        Gauge(name, f"{name} of the last verdict", ["model", "version"], registry=registry).labels(
            model, VERSION
        ).set(value)
    write_to_textfile(str(path), registry)


class TextfileHandler(http.server.BaseHTTPRequestHandler):
    """Serves one metrics.prom, as a textfile collector or a Pushgateway would expose it."""

    path_served: Path

    def do_GET(self) -> None:
        body = self.path_served.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # quiet test output
        pass


@dataclass(frozen=True)
class Stack:
    prometheus: str  # base URL
    scrape: str  # the model server's /metrics, as Prometheus scraped it
    drift: str  # metrics.prom


def instant(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """The samples an instant query returns, asked with promtool."""
    done = subprocess.run(
        [tool("promtool"), "query", "instant", "-o", "json", prometheus, expr],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, f"promtool query instant {expr!r} failed: {done.stderr}"
    return list(json.loads(done.stdout or "[]"))


def wait_for(prometheus: str, expr: str, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        query = urllib.parse.urlencode({"query": expr})
        with contextlib.suppress(OSError):
            if json.loads(get(f"{prometheus}/api/v1/query?{query}"))["data"]["result"]:
                return
        time.sleep(0.25)
    pytest.fail(f"Prometheus never saw {what} ({expr}) within {timeout_s} s")


@pytest.fixture(scope="module")
def stack(
    loaded: Project, written: Path, default_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The default model served for real with its payload log, the drift gauges in a textfile, and
    a real Prometheus scraping both every second with the generated rules loaded."""
    model = loaded.contract.name
    root = tmp_path_factory.mktemp("stack")
    payload_log = {"store": str(root / "payloads"), "sample_rate": 1.0, "max_bytes": 64 << 20}
    handle, server = start_server(
        root, default_onnx, loaded.root, model_name=model, model_version=VERSION, payload_log=payload_log
    )
    drift_file = root / "metrics.prom"
    write_drift_metrics(drift_file, model)
    handler = type("Handler", (TextfileHandler,), {"path_served": drift_file})
    textfile = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=textfile.serve_forever, daemon=True).start()
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(written / mc.RULES_FILE)],
        "scrape_configs": [
            {"job_name": "model-server", "static_configs": [{"targets": [server.removeprefix("http://")]}]},
            {
                "job_name": "handoff-monitor",
                "metrics_path": "/metrics.prom",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{textfile.server_address[1]}"]}],
            },
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (root / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            url, 'up{job="model-server"} == 1 and on() up{job="handoff-monitor"} == 1', "both targets up"
        )
        infer = f"{server}/v2/models/{model}/infer"
        # Requests after the first scrape, so every counter rises between two samples.
        assert [post(infer, images(rows)) for rows in (1, 2, 3, 1, 4)] == [200] * 5
        assert post(infer, images(1, width=7)) == 400  # the contract refuses the shape
        # The status code series start with their first request: a rate needs two samples of it.
        wait_for(url, f'rate({mc.REQUESTS}{{code="400"}}[1m])', "two samples of the refused request")
        wait_for(url, f"increase({mc.PAYLOAD_ROWS}[1m]) > 0", "the payload log's rows")
        yield Stack(url, get(f"{server}/metrics").decode(), drift_file.read_text())
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()
        textfile.shutdown()
        local_server.terminate(handle)


def substituted(expr: str, model: str) -> str:
    return expr.replace("$model", model).replace("$__rate_interval", RATE_INTERVAL)


def test_every_dashboard_query_returns_samples_from_a_real_server(loaded: Project, stack: Stack) -> None:
    board = mc.dashboard(loaded)
    exprs = mc.dashboard_exprs(board)
    assert exprs and all("$__rate_interval" in e or "rate(" not in e for e in exprs)
    empty = [e for e in exprs if not instant(stack.prometheus, substituted(e, loaded.contract.name))]
    # `or vector(0)` answers even for a metric nobody exports: each selector on its own must find
    # series, with every label a regex matcher reads (no 5xx happened, but `code` exists).
    for expr in exprs:
        for name, matchers in SELECTOR.findall(substituted(expr, loaded.contract.name)):
            exact = ", ".join(f'{k}="{v}"' for k, v in re.findall(r'(\w+)="([^"]*)"', matchers))
            found = instant(stack.prometheus, f"{name}{{{exact}}}")
            assert found, f"{name}{{{exact}}} (in {expr}) has no series"
            for label in re.findall(r'(\w+)=~"', matchers):
                assert all(label in sample["metric"] for sample in found), f"{name} has no label {label}"
    assert empty == [], (
        f"dashboard queries that found no series (a metric or label the server lacks): {empty}"
    )
    # The model variable lists the served model.
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "model"]
    metric = re.fullmatch(r"label_values\((\w+), model\)", variable["query"]["query"])
    assert metric, variable
    models = {s["metric"]["model"] for s in instant(stack.prometheus, f"count by (model) ({metric[1]})")}
    assert loaded.contract.name in models


def test_the_latency_slo_line_and_the_drift_threshold_come_from_the_contract(loaded: Project) -> None:
    panels = {p["title"]: p for p in mc.dashboard(loaded)["panels"]}
    steps = panels["Latency p50 and p99 against the SLO"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == loaded.contract.slo.latency_p99_ms / 1000 == 0.025
    steps = panels["Input drift share"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == 0.5  # slo.drift's default: the default contract has no slo.drift


def test_the_servers_metrics_pass_promtool_check_metrics(stack: Stack) -> None:
    done = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=stack.scrape, capture_output=True, text=True, timeout=30
    )
    # Lint findings are lines "<metric> <problem>"; a parse error is not. KServe's own metrics are
    # KServe's to name; every handoff_ metric must lint clean.
    findings = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode in (0, 3), findings  # 1: the scrape did not parse; 3: lint findings
    assert not [f for f in findings if f.startswith("error")], findings
    assert [f for f in findings if f.startswith("handoff_")] == []


SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def test_every_rule_reads_metrics_and_labels_the_server_or_the_monitor_exports(
    loaded: Project, stack: Stack
) -> None:
    exported = stack.scrape + stack.drift
    groups = mc.rules(loaded)["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    for rule in (r for g in groups for r in g["rules"]):
        selectors = SELECTOR.findall(rule["expr"])
        assert selectors, rule
        for name, matchers in selectors:
            if ":" in name:
                assert name in recorded, f"{rule.get('alert') or rule.get('record')} reads unrecorded {name}"
                continue
            assert re.search(rf"^{name}\{{", exported, re.M), f"{name} is not exported"
            for label, value in re.findall(r'(\w+)="([^"]*)"', matchers):
                # The exact label value (le = the SLO's bound, model = the contract's name) is in
                # the scrape: an alert on a value nobody writes would never fire.
                assert re.search(rf'^{name}\{{[^}}]*\b{label}="{re.escape(value)}"', exported, re.M), (
                    f'{name} has no {label}="{value}"'
                )


def test_prometheus_loads_the_rules_and_records_the_ratios_from_the_real_series(
    loaded: Project, stack: Stack
) -> None:
    health = json.loads(get(f"{stack.prometheus}/api/v1/rules"))["data"]["groups"]
    assert {r["health"] for g in health for r in g["rules"]} == {"ok"}, health
    assert len([r for g in health for r in g["rules"]]) == 12
    for record in (r["record"] for g in mc.rules(loaded)["groups"] for r in g["rules"] if "record" in r):
        wait_for(stack.prometheus, record, f"the recording rule {record}")
        (sample,) = instant(stack.prometheus, record)
        assert sample["metric"]["model"] == loaded.contract.name, sample
