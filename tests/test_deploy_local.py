"""Local blue/green deploy on real parts (MLflow on sqlite, the KServe model server): a new version
starts beside the serving one and must pass the smoke test and the contract's latency SLO before
it takes over the port; clients on the port never see a refused connection; a version that fails
leaves the old one serving and the command says why."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
from typer.testing import CliRunner

from handoff.cli import app
from handoff.errors import HandoffError
from handoff.project import Project
from handoff.serving import local_server
from handoff.steps.register import register

from .conftest import edit_yaml, mlflow_state_restored, replace_in
from .test_triton_layout import EVALUATION, MODEL, _export

pytestmark = pytest.mark.local

INFER = f"/v2/models/{MODEL}/infer"
BODY = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.25] * 64}]}


@pytest.fixture(scope="module")
def project(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default project with three registered versions of distinct models (v1, v2, v3)."""
    with mlflow_state_restored():
        yield from _registered_project(default_project, tmp_path_factory)


def _registered_project(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("blue-green")
    project_dir = Path(shutil.copytree(default_project, root / MODEL))
    edit_yaml(
        project_dir / "handoff.yaml",
        lambda s: s["serving"].update(
            port=0, max_request_mib=1, batching={"max_batch_size": 8, "max_wait_ms": 2}
        ),
    )
    # Versions must pass their latency check while this module's own clients load the same two
    # cores (and another test file runs beside it): what they test is the takeover, so the SLO is
    # generous. The test of the latency gate sets one no server meets.
    replace_in(project_dir / "contract.yaml", "latency_p99_ms: 25", "latency_p99_ms: 250")
    loaded = Project.load(project_dir)
    for seed in (0, 1, 2):
        register(project_dir, _export(loaded, seed, root / f"export-{seed}"), EVALUATION)
    yield project_dir
    local_server.stop(loaded.state_dir)


def logits(url: str, session: requests.Session | None = None) -> list[float]:
    response = (session or requests).post(f"{url}{INFER}", json=BODY, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"]


def deploy(project: Path, version: str) -> tuple[int, str, dict[str, Any]]:
    """``handoff deploy --local --version N`` in this process (its imports are paid once): exit code,
    the error the CLI prints (`handoff.cli.main` turns a HandoffError into that line) and the result."""
    result = CliRunner().invoke(app, ["deploy", "--local", "--version", version, "--project", str(project)])
    if isinstance(result.exception, HandoffError):
        return 1, f"error: {result.exception}", {}
    return result.exit_code, result.output, json.loads(result.stdout) if result.exit_code == 0 else {}


@pytest.fixture(autouse=True)
def _own_mlflow_state() -> Iterator[None]:
    with mlflow_state_restored():
        yield


def test_a_new_version_takes_over_the_port_without_a_refused_request(project: Path) -> None:
    code, err, first = deploy(project, "1")
    assert code == 0, err[-2000:]
    url, old_pid = first["url"], first["pid"]
    assert first["served_p99_ms"] > 0
    v1 = logits(url)
    serving = local_server.current(Project.load(project).state_dir)
    assert serving is not None and Path(serving.handover).is_socket()
    # handoff.yaml's serving settings reach the server.
    spec = json.loads(Path(serving.spec).read_text())
    assert (spec["max_request_bytes"], spec["batching"]) == (
        1024 * 1024,
        {"max_batch_size": 8, "max_wait_ms": 2.0},
    )
    too_large = requests.post(f"{url}{INFER}", data=b"0" * (1024 * 1024 + 1), timeout=10)
    assert (
        too_large.status_code == 413
        and "exceeds the server's limit of 1048576 bytes" in too_large.json()["error"]
    )

    # Two clients keep calling while v2 replaces v1: one opens a new connection for every
    # request, one keeps its connection alive. Every request must be answered.
    answers: dict[str, list[list[float] | str]] = {"new connections": [], "keep-alive": []}
    stop = threading.Event()

    def client(kind: str) -> None:
        session = requests.Session() if kind == "keep-alive" else None
        while not stop.is_set():
            try:
                answers[kind].append(logits(url, session))
            except (requests.RequestException, AssertionError) as exc:
                answers[kind].append(f"{type(exc).__name__}: {exc}")

    load = [threading.Thread(target=client, args=(kind,)) for kind in answers]
    for thread in load:
        thread.start()
    try:
        code, err, second = deploy(project, "2")
        time.sleep(0.3)  # answers now come from the new server only
    finally:
        stop.set()
        for thread in load:
            thread.join(timeout=30)
    assert code == 0, err[-2000:]
    assert second["url"] == url and second["pid"] != old_pid  # same address, new server
    v2 = logits(url)
    assert not np.allclose(v1, v2)
    for kind, got in answers.items():
        failures = [a for a in got if isinstance(a, str)]
        assert not failures, (kind, len(got), failures[:3])
        assert got[0] == v1 and got[-1] == v2, kind  # old answered until the new one took over
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(serving.handover).exists()  # nothing left behind in /tmp


def test_a_version_over_its_latency_slo_never_takes_over(project: Path) -> None:
    code, err, serving = deploy(project, "2")  # already serving after the test above: a redeploy
    assert code == 0, err[-2000:]
    before = logits(serving["url"])
    # Deploy enforces the working tree's contract: its SLO now, not the one v3 was registered with.
    replace_in(project / "contract.yaml", "latency_p99_ms: 250", "latency_p99_ms: 0.001")
    try:
        code, err, _ = deploy(project, "3")
    finally:
        replace_in(project / "contract.yaml", "latency_p99_ms: 0.001", "latency_p99_ms: 250")
    assert code == 1
    assert f"{MODEL}/3 did not pass its checks before taking over: served p99 latency" in err
    assert "exceeds slo.latency_p99_ms 0.001" in err
    assert f"the new server was stopped and version 2 keeps serving at {serving['url']}" in err
    assert logits(serving["url"]) == before
    recorded = local_server.current(Project.load(project).state_dir)
    assert recorded is not None and (recorded.version, recorded.pid) == ("2", serving["pid"])
    # Only the old server is left: the new one was stopped, not orphaned.
    servers = [p for p in psutil.process_iter(["cmdline"]) if "handoff.serving" in (p.info["cmdline"] or [])]
    state = str(Project.load(project).state_dir)
    assert [p.pid for p in servers if state in " ".join(p.info["cmdline"])] == [serving["pid"]]


def test_a_new_port_in_handoff_yaml_moves_the_server_there(project: Path) -> None:
    code, err, serving = deploy(project, "2")
    assert code == 0, err[-2000:]
    with socket.socket() as probe:  # a free port, released for the deploy to bind
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"].update(port=free))
    try:
        code, err, moved = deploy(project, "1")
    finally:
        edit_yaml(project / "handoff.yaml", lambda s: s["serving"].update(port=0))
    assert code == 0, err[-2000:]
    assert moved["url"] == f"http://127.0.0.1:{free}" and logits(moved["url"])
    with pytest.raises(requests.ConnectionError):  # the old address is retired with its server
        requests.post(f"{serving['url']}{INFER}", json=BODY, timeout=5)


def test_a_copied_project_never_retires_the_original_projects_server(project: Path, tmp_path: Path) -> None:
    code, err, original = deploy(project, "2")
    assert code == 0, err[-2000:]
    # A copy of the folder (as `cp -r` makes one), and, worse, the original's server record
    # copied into the copy's state folder by hand: neither may reach the original's server.
    copy = Path(shutil.copytree(project, tmp_path / "copy" / MODEL))
    copy_state = Project.load(copy).state_dir
    assert copy_state != Project.load(project).state_dir
    shutil.copyfile(Project.load(project).state_dir / "server.json", copy_state / "server.json")
    try:
        code, err, copied = deploy(copy, "1")
        assert code == 0, err[-2000:]
        assert copied["pid"] != original["pid"] and copied["url"] != original["url"]
        assert psutil.Process(original["pid"]).is_running()
        logits(original["url"])  # the original still answers on its port
        assert logits(copied["url"]) != logits(original["url"])  # v1 beside v2
    finally:
        local_server.stop(copy_state, project=copy)
    assert logits(original["url"])
