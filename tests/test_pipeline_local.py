"""The whole local pipeline on real engines: kfp.local, MLflow (sqlite), ONNX Runtime, KServe."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from handoff import __version__
from handoff.data_hash import data_sha256
from handoff.files import sha256_of
from handoff.project import Project

from .conftest import edit_yaml, generate, handoff, mlflow_state_restored, replace_in

pytestmark = pytest.mark.local


def registry(project: Path) -> MlflowClient:
    """A client of the project's registry (also set as the default for mlflow.artifacts)."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def use_free_port(project: Path) -> None:
    """Tests must not collide with a developer's server on 8080 (or with each other)."""
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"].update(port=0))


@pytest.fixture(autouse=True)
def _own_mlflow_state() -> Iterator[None]:
    with mlflow_state_restored():
        yield


@pytest.fixture
def served_project(project: Path) -> Iterator[Path]:
    use_free_port(project)
    yield project
    handoff("stop", cwd=project)


def test_run_local_trains_registers_and_serves(served_project: Path) -> None:
    project = served_project
    # Deploy's check of the served p99 (HTTP between two processes) moves with the load beside it:
    # about 7 ms alone, 28 to 52 ms on a loaded two-core machine. The run gets a budget a loaded
    # machine meets; the starter's own SLO is held below on evaluate's ONNX Runtime p99 (in one
    # process, under a millisecond even when loaded); the gate firing is tested in test_deploy_local.py.
    shipped = Project.load(project).contract.slo.latency_p99_ms
    replace_in(project / "contract.yaml", f"latency_p99_ms: {shipped:g} ", "latency_p99_ms: 250 ")
    # Only an int8 form fits this size (the fp32 CNN is 0.16 MB), so the run serves what optimize
    # made, whichever form this machine's timings favour.
    replace_in(project / "contract.yaml", "max_model_size_mb: 50 ", "max_model_size_mb: 0.06 ")
    result = handoff("run", "--local", cwd=project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== digits-classifier: SUCCEEDED ==" in result.stdout

    summary = json.loads((project / "runs" / "latest" / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["metrics"]["accuracy"] >= 0.95  # the contract's minimum, on the ONNX model
    assert summary["gate"]["passed"] is True and summary["gate"]["reasons"] == []
    checks = {c["name"] for c in summary["gate"]["checks"]}
    assert checks == {"contract", "accuracy", "latency_p99_ms", "model_size_mb", "champion"}
    readiness = summary["readiness"]
    assert readiness["items"] == 9 and Path(readiness["report"], "readiness.html").is_file()
    assert summary["latency_ms"]["p99"] <= shipped  # the starter meets its shipped SLO on ONNX Runtime
    assert list(summary["step_seconds"]) == ["train", "export", "optimize", "evaluate", "register", "deploy"]
    assert summary["smoke_test"]["passed"] is True

    # The registry: version 1 carries both aliases and its lineage tags.
    client = registry(project)
    champion = client.get_model_version_by_alias("digits-classifier", "champion")
    assert str(champion.version) == "1" == summary["registered"]["version"]  # int on sqlite, str over REST
    assert str(client.get_model_version_by_alias("digits-classifier", "challenger").version) == "1"
    assert champion.tags["handoff.onnx_sha256"] == summary["onnx_sha256"]
    # What is registered and served is optimize's choice, with the fp32 model it was made from.
    optimized = summary["optimized"]
    assert optimized["form"] in ("int8_static", "int8_dynamic"), optimized["reason"]
    assert optimized["reason"].startswith(f"{optimized['form']}: fp32 breaks model.onnx 0.1")
    assert "MB > slo.max_model_size_mb 0.06 MB" in optimized["reason"]
    assert summary["onnx_sha256"] != optimized["fp32_sha256"]
    assert champion.tags["handoff.optimize.form"] == optimized["form"]
    assert champion.tags["handoff.optimize.fp32_sha256"] == optimized["fp32_sha256"]
    assert f"{optimized['form']}: " in champion.tags["handoff.optimize.candidates"]
    assert champion.tags["handoff.gate"] == "passed"
    assert champion.tags["handoff.template_version"] == __version__
    # The data train saw, hashed by train and carried to the version; no pipeline pod, no image.
    loaded = Project.load(project)
    assert champion.tags["handoff.data_sha256"] == data_sha256(*loaded.hooks.build_datasets(loaded.config()))
    assert champion.tags["handoff.image"] == "-"

    # What is registered is one self-contained ONNX file with the exported bytes.
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/digits-classifier@champion", dst_path=str(project / "check")
        )
    )
    assert sha256_of(downloaded / "model.onnx") == summary["onnx_sha256"]
    assert not list(downloaded.rglob("*.data"))
    attached = {p.name for p in (downloaded / "extra_files").iterdir()}
    assert {"model_card.md", "readiness.html", "readiness.md", "confusion_matrix.png"} <= attached
    assert {"optimize.json", "optimized_forms.png"} <= attached
    assert sha256_of(downloaded / "extra_files" / "model.fp32.onnx") == optimized["fp32_sha256"]
    # What the KFP UI shows: the report as HTML and Markdown output artifacts.
    evaluate_dir = next((project / "runs" / "latest" / "artifacts").glob("*/evaluate"))
    assert (evaluate_dir / "report_html").read_text().startswith("<!doctype html>")
    assert "# Readiness: digits-classifier" in (evaluate_dir / "report_md").read_text()

    # A real V2 request to the server the pipeline left running.
    example = json.loads(next(downloaded.rglob("example.json")).read_text())
    response = requests.post(
        f"{summary['endpoint']}/v2/models/digits-classifier/infer",
        json={"inputs": example["inputs"]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"]  # a request without id still gets one back
    logits = body["outputs"][0]
    assert (logits["name"], logits["datatype"], logits["shape"]) == ("logits", "FP32", [4, 10])
    wrong = requests.post(
        f"{summary['endpoint']}/v2/models/digits-classifier/infer",
        json={"inputs": [{**example["inputs"][0], "name": "pixels"}]},
        timeout=10,
    )
    assert wrong.status_code == 400
    assert "unknown input(s) ['pixels']; expected inputs ['image']" in wrong.json()["error"]

    # A redeploy onto a busy port fails before the serving version is touched.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        edit_yaml(project / "handoff.yaml", lambda s: s["serving"].update(port=busy.getsockname()[1]))
        refused = handoff("deploy", cwd=project)
    assert refused.returncode == 1
    assert "handoff.yaml: serving.port: cannot listen on 127.0.0.1:" in refused.stderr
    assert requests.get(f"{summary['endpoint']}/v2/health/ready", timeout=5).status_code == 200
    missing = handoff("deploy", "--version", "7", cwd=project)
    assert missing.returncode == 1
    assert "error: model 'digits-classifier' has no version '7' in the registry" in missing.stderr

    stopped = handoff("stop", cwd=project)
    assert "stopped digits-classifier v1" in stopped.stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{summary['endpoint']}/v2/health/ready", timeout=2)


def test_nan_loss_stops_the_pipeline_with_nothing_registered(served_project: Path) -> None:
    project = served_project
    replace_in(
        project / "model.py",
        "return F.cross_entropy(outputs, target)",
        "return F.cross_entropy(outputs, target) * float('nan')",
    )
    # Also the plain path: every step a fresh interpreter, as kfp.local starts it by default.
    result = handoff("run", "--local", "--no-fork-server", cwd=project)
    assert result.returncode == 1
    assert "error: train failed:" in result.stdout
    assert "model.py: loss: loss() returned nan at epoch 1, step 1" in result.stdout
    summary = json.loads((project / "runs" / "latest" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["step"] == "train"
    assert summary["registered"] is None and summary["endpoint"] is None
    with pytest.raises(MlflowException):
        registry(project).get_registered_model("digits-classifier")
    assert not (Project.load(project).state_dir / "server.json").exists()


def test_broken_model_py_fails_before_any_step(served_project: Path) -> None:
    project = served_project
    replace_in(project / "model.py", "def build_model(", "def make_model(")
    result = handoff("run", "--local", cwd=project)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {project.resolve() / 'model.py'}: missing hook(s) build_model; model.py must define "
        "Config, build_model, build_datasets, loss, example_inputs (see the template's model.py for "
        "each one's signature)"
    ]
    assert not (project / "mlflow.db").exists()


def test_malformed_contract_fails_before_any_step(served_project: Path) -> None:
    project = served_project
    edit_yaml(project / "contract.yaml", lambda c: c["outputs"][0].update(dtype="float"))
    line = (project / "contract.yaml").read_text().splitlines().index("  dtype: float") + 1
    result = handoff("run", "--local", cwd=project)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: {project.resolve() / 'contract.yaml'}: line {line}: outputs[0].dtype: Input should be"
    )
    assert not (project / "mlflow.db").exists() and not (project / "runs").exists()


def test_failed_gate_registers_a_challenger_but_does_not_promote_or_serve(served_project: Path) -> None:
    project = served_project
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(overrides={"epochs": 1}))
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].update(min_metrics={"accuracy": 0.999}))
    result = handoff("run", "--local", cwd=project)
    assert result.returncode == 1
    assert "gate       FAILED: accuracy 0." in result.stdout
    assert "deploy     skipped: the gate failed" in result.stdout
    summary = json.loads((project / "runs" / "latest" / "summary.json").read_text())
    assert summary["status"] == "gate_failed"
    assert summary["registered"]["aliases"] == ["challenger"]
    assert summary["endpoint"] is None
    client = registry(project)
    assert (
        client.get_model_version_by_alias("digits-classifier", "challenger").tags["handoff.gate"] == "failed"
    )
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("digits-classifier", "champion")


def test_a_regression_run_shows_its_max_bound_and_a_residual_plot_not_classification_metrics(
    tmp_path: Path,
) -> None:
    project = generate(tmp_path, starter="tabular-regression")
    use_free_port(project)
    # No model reaches this rmse: the gate fails, so nothing is served (and nothing to stop).
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].update(max_metrics={"rmse": 0.001}))
    result = handoff("run", "--local", cwd=project)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    bounds = {
        line.split()[1]: line.partition("(contract:")[2]
        for line in result.stdout.splitlines()
        if line.startswith("metric ")
    }
    assert bounds["rmse"] == " <= 0.001)" and bounds["r2"] == " >= 0.3)"
    assert "deploy     skipped: the gate failed" in result.stdout
    # What the KFP UI shows for regression: metrics and the residual plot, no confusion matrix.
    evaluate_dir = next((project / "runs" / "latest" / "artifacts").glob("*/evaluate"))
    outputs = json.loads((evaluate_dir / "executor_output.json").read_text())["artifacts"]
    assert "confusion" not in outputs and "confusion" not in {p.name for p in evaluate_dir.iterdir()}
    assert {"mae", "rmse", "r2"} <= set(outputs["metrics"]["artifacts"][0]["metadata"])
    assert (
        '<img alt="residuals against predictions" src="data:image/png;base64,'
        in (evaluate_dir / "residuals").read_text()
    )
