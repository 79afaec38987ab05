"""deploy: serve a registered version with the KServe model server on this machine and smoke-test it.

The model is fetched from the registry (what was registered is what is served), its sha256 is
checked against the version's tag, and it is served with the contract it was registered with.
The new server must pass the smoke test; if it does not start or fails, the version that was
serving before is started again and the step fails saying why.
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException

from handoff.artifacts import EXAMPLE_FILE, EXTRA_DIR, ONNX_FILE
from handoff.contract import CONTRACT_FILE, load_contract
from handoff.errors import HandoffError
from handoff.files import read_json, sha256_of, write_json
from handoff.project import Project
from handoff.serving import local_server
from handoff.serving.local_server import ServerHandle
from handoff.serving.smoke import smoke_test
from handoff.steps.register import SHA_TAG
from handoff.tracking import use_tracking


@dataclass(frozen=True)
class DeployResult:
    """Where the version is served and what the smoke test saw."""

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
    try:
        expected = client.get_model_version(name, version).tags.get(SHA_TAG)
    except MlflowException:
        raise HandoffError(
            f"model {name!r} has no version {version!r} in the registry ({project.tracking_uri})"
        ) from None
    dest = project.state_dir / "models" / f"{name}-v{version}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
    )
    for needed in (ONNX_FILE, f"{EXTRA_DIR}/{EXAMPLE_FILE}", f"{EXTRA_DIR}/{CONTRACT_FILE}"):
        if not (local / needed).is_file():
            raise HandoffError(
                f"registered version {name}/{version} has no {needed} artifact; "
                "register it again with `handoff register`"
            )
    actual = sha256_of(local / ONNX_FILE)
    if expected != actual:
        raise HandoffError(
            f"registered version {name}/{version}: artifact sha256 {actual[:12]}… does not "
            f"match its {SHA_TAG} tag {str(expected)[:12]}…; refusing to serve it"
        )
    return local


def _port_of(handle: ServerHandle) -> tuple[str, int]:
    parts = urlsplit(handle.url)
    return str(parts.hostname), int(parts.port or 80)


def _restore(project: Project, previous: ServerHandle | None) -> str:
    """Start the previously served version again; returns a sentence for the error message."""
    if previous is None:
        return "nothing was serving before"
    try:
        sock = local_server.bind(*_port_of(previous))
        local_server.start(
            Path(previous.spec),
            sock,
            model_name=previous.model_name,
            version=previous.version,
            state_dir=project.state_dir,
            ready_timeout_s=project.settings.serving.ready_timeout_s,
        )
    except HandoffError as exc:
        return f"restarting the previous version {previous.version} failed too: {exc}"
    return f"the previous version {previous.version} is serving again at {previous.url}"


def deploy(project_dir: Path | str, model_name: str, version: str) -> DeployResult:
    """Serve ``model_name`` version ``version`` on the configured host/port and smoke-test it."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    model_dir = fetch_model(project, model_name, version)
    registered = model_dir / EXTRA_DIR
    contract = load_contract(registered)  # the contract this version was registered with
    example = read_json(registered / EXAMPLE_FILE)
    serving = project.settings.serving
    spec_file = model_dir / "server.json"
    with local_server.deploy_lock(project.state_dir):
        previous = local_server.current(project.state_dir)
        reuses_port = previous is not None and serving.port != 0 and _port_of(previous)[1] == serving.port
        sock: socket.socket | None = None
        if not reuses_port:
            sock = local_server.bind(serving.host, serving.port)  # a busy port fails before any stop
        local_server.stop(project.state_dir)
        try:
            if sock is None:
                sock = local_server.bind(serving.host, serving.port)
            write_json(
                spec_file,
                {
                    "model_name": model_name,
                    "onnx_path": str(model_dir / ONNX_FILE),
                    "contract_dir": str(registered),
                    "host": serving.host,
                    "port": sock.getsockname()[1],
                },
            )
            handle = local_server.start(
                spec_file,
                sock,
                model_name=model_name,
                version=version,
                state_dir=project.state_dir,
                ready_timeout_s=serving.ready_timeout_s,
            )
        except HandoffError as exc:
            raise HandoffError(f"{exc}; {_restore(project, previous)}") from None
        smoke = smoke_test(handle.url, model_name, contract, example)
        if not smoke.passed:
            local_server.stop(project.state_dir)
            raise HandoffError(
                f"smoke test of {model_name}/{version} at {handle.url} failed: {smoke.detail}; "
                f"the new server was stopped and {_restore(project, previous)}"
            )
    return DeployResult(
        url=handle.url,
        model_name=model_name,
        version=version,
        pid=handle.pid,
        smoke_passed=True,
        smoke_detail=smoke.detail,
        smoke_latency_ms=smoke.latency_ms,
        seconds=round(time.perf_counter() - started, 3),
    )
