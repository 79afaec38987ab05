"""deploy: serve a registered version with the KServe model server on this machine and smoke-test it.

The model is fetched from the registry (what was registered is what is served) and its sha256 is
checked against the version's tag before anything starts. The previous local server of the
project is stopped first; if the new one fails its smoke test it is stopped too and the step fails.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from handoff.artifacts import EXAMPLE_FILE, ONNX_FILE
from handoff.errors import HandoffError
from handoff.files import read_json, sha256_of, write_json
from handoff.project import Project
from handoff.serving import local_server
from handoff.serving.smoke import smoke_test
from handoff.steps.register import SHA_TAG
from handoff.tracking import use_tracking


@dataclass(frozen=True)
class DeployResult:
    url: str
    model_name: str
    version: str
    pid: int
    smoke_passed: bool
    smoke_detail: str
    smoke_latency_ms: float
    seconds: float


def fetch_model(project: Project, name: str, version: str) -> Path:
    """Download a registered version into the project's state folder and verify its sha256."""
    client = use_tracking(project)
    expected = client.get_model_version(name, version).tags.get(SHA_TAG)
    dest = project.state_dir / "models" / f"{name}-v{version}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
    )
    onnx_path = local / ONNX_FILE
    if not onnx_path.is_file():
        raise HandoffError(f"registered version {name}/{version} has no {ONNX_FILE} artifact")
    actual = sha256_of(onnx_path)
    if expected != actual:
        raise HandoffError(
            f"registered version {name}/{version}: artifact sha256 {actual[:12]}… does not "
            f"match its {SHA_TAG} tag {str(expected)[:12]}…; refusing to serve it"
        )
    return local


def deploy(project_dir: Path | str, model_name: str, version: str) -> DeployResult:
    """Serve ``model_name`` version ``version`` on the configured host/port and smoke-test it."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    model_dir = fetch_model(project, model_name, version)
    example = read_json(next(model_dir.rglob(EXAMPLE_FILE)))
    serving = project.settings.serving
    local_server.stop(project.state_dir)
    port = serving.port or local_server.free_port(serving.host)
    local_server.ensure_port_free(serving.host, port)
    spec_file = model_dir / "server.json"
    write_json(
        spec_file,
        {
            "model_name": model_name,
            "onnx_path": str(model_dir / ONNX_FILE),
            "project_dir": str(project.root),
            "host": serving.host,
            "port": port,
        },
    )
    url = f"http://{serving.host}:{port}"
    handle = local_server.start(
        spec_file,
        url=url,
        model_name=model_name,
        version=version,
        state_dir=project.state_dir,
        ready_timeout_s=serving.ready_timeout_s,
    )
    smoke = smoke_test(url, model_name, project.contract, example)
    if not smoke.passed:
        local_server.stop(project.state_dir)
        raise HandoffError(
            f"smoke test of {model_name}/{version} at {url} failed: {smoke.detail}; the server was stopped"
        )
    return DeployResult(
        url=url,
        model_name=model_name,
        version=version,
        pid=handle.pid,
        smoke_passed=True,
        smoke_detail=smoke.detail,
        smoke_latency_ms=smoke.latency_ms,
        seconds=round(time.perf_counter() - started, 3),
    )
