"""The model server's shutdown and its limits, over real connections to a real server process, as
Kubernetes and a hostile or unlucky client meet them: SIGTERM answers every request already sent
(read or not) and exits 0, keep-alive clients are told to close, a slow request head is cut off,
connections past ``max_concurrency`` get 503, and the handover socket never outlives the server."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from handoff.errors import HandoffError
from handoff.files import write_json
from handoff.serving import local_server
from handoff.serving.local_server import ServerHandle

pytestmark = pytest.mark.local

MODEL = "digits-classifier"
INFER = f"/v2/models/{MODEL}/infer"
BODY = json.dumps(
    {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.25] * 64}]}
).encode()
REQUEST = (
    f"POST {INFER} HTTP/1.1\r\nHost: model\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(BODY)}\r\n\r\n"
).encode() + BODY


@contextlib.contextmanager
def running(
    tmp_path: Path, default_onnx: Path, default_project: Path, *, handover: bool = False, **spec: Any
) -> Iterator[tuple[ServerHandle, tuple[str, int]]]:
    """A server started as deploy starts one; with ``handover``, it also offers a takeover socket
    (bound, not listening: a first deploy's) at a handover path, as blue/green deploys do."""
    tmp_path.mkdir(exist_ok=True)
    sock = local_server.bind("127.0.0.1", 0)
    address = sock.getsockname()[:2]
    takeover = local_server.bind("127.0.0.1", 0, listen=False) if handover else None
    offer = local_server.handover_path(tmp_path) if handover else None
    spec_file = tmp_path / "server.json"
    write_json(
        spec_file,
        {
            "model_name": MODEL,
            "onnx_path": str(default_onnx),
            "contract_dir": str(default_project),
            "host": "127.0.0.1",
            "port": address[1],
            **({"handover": str(offer)} if offer else {}),
            **spec,
        },
    )
    handle = local_server.start(
        spec_file,
        sock,
        model_name=MODEL,
        version="1",
        state_dir=tmp_path,
        ready_timeout_s=60,
        takeover=takeover,
        handover=offer,
    )
    try:
        yield handle, address
    finally:
        local_server.terminate(handle)


def exit_code(handle: ServerHandle, timeout_s: float = 15) -> int | None:
    return psutil.Process(handle.pid).wait(timeout=timeout_s)


def read_response(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def test_sigterm_answers_every_request_already_sent_and_exits_0(
    tmp_path: Path, default_onnx: Path, default_project: Path
) -> None:
    """50 whole requests sent, then SIGTERM, while the server is too busy to take them in (here:
    stopped): 25 on connections it accepted but had not read yet, 25 still waiting in the listen
    queue. Every one is answered, none reset, and the process exits 0."""
    with running(tmp_path, default_onnx, default_project) as (handle, address):
        process = psutil.Process(handle.pid)
        accepted = [socket.create_connection(address, timeout=20) for _ in range(25)]
        time.sleep(0.3)  # the server accepts them; nothing was sent on them yet
        process.suspend()  # SIGSTOP: a busy event loop, the worst case
        try:
            queued = [socket.create_connection(address, timeout=20) for _ in range(25)]
            clients = accepted + queued
            for client in clients:
                client.sendall(REQUEST)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # longer than uvicorn's 0.1-s tick: it sees the signal before any I/O
        finally:
            process.resume()
        statuses: list[int | str] = []
        for client in clients:
            try:
                response = read_response(client)
                statuses.append(response.status)
            except (OSError, http.client.HTTPException) as exc:
                statuses.append(type(exc).__name__)
            finally:
                client.close()
        assert statuses == [200] * 50, statuses
        assert exit_code(handle) == 0
        assert "Application shutdown complete" in Path(handle.log).read_text()


def test_a_keep_alive_clients_request_in_flight_at_sigterm_gets_connection_close(
    tmp_path: Path, default_onnx: Path, default_project: Path
) -> None:
    # Batches are held open 1 s, so the second request is surely in flight when SIGTERM arrives.
    batching = {"max_batch_size": 64, "max_wait_ms": 1000}
    with running(tmp_path, default_onnx, default_project, batching=batching) as (handle, address):
        conn = http.client.HTTPConnection(*address, timeout=20)
        conn.request("POST", INFER, body=BODY, headers={"Content-Type": "application/json"})
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and first.getheader("connection") is None  # kept alive
        idle = socket.create_connection(address, timeout=20)  # an idle keep-alive client
        idle.sendall(REQUEST)
        read_response(idle)
        answered: list[http.client.HTTPResponse] = []

        def second() -> None:
            conn.request("POST", INFER, body=BODY, headers={"Content-Type": "application/json"})
            answered.append(conn.getresponse())
            answered[0].read()

        client = threading.Thread(target=second)
        client.start()
        time.sleep(0.4)
        psutil.Process(handle.pid).send_signal(signal.SIGTERM)
        client.join(timeout=20)
        assert answered and answered[0].status == 200
        assert answered[0].getheader("connection") == "close"
        assert idle.recv(1) == b""  # the idle connection was closed, not left to time out
        assert exit_code(handle) == 0
        conn.close()
        idle.close()


def test_a_slow_request_head_is_closed_after_header_timeout_s(
    tmp_path: Path, default_onnx: Path, default_project: Path
) -> None:
    with running(tmp_path, default_onnx, default_project, header_timeout_s=1) as (_, address):
        slow = socket.create_connection(address, timeout=8)
        silent = socket.create_connection(address, timeout=8)  # connects and never says anything
        started = time.monotonic()
        slow.sendall(REQUEST[:30])  # half a request line, then nothing (slowloris)
        assert slow.recv(1024) == b""
        assert silent.recv(1024) == b""
        assert time.monotonic() - started < 4
        # A client that sends its request in time is served as ever, on a connection kept alive.
        conn = http.client.HTTPConnection(*address, timeout=8)
        for _ in range(2):
            conn.request("POST", INFER, body=BODY, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(0.7)  # together longer than the header timeout: only a head is timed
        conn.close()
        slow.close()
        silent.close()


def test_connections_past_max_concurrency_are_answered_503(
    tmp_path: Path, default_onnx: Path, default_project: Path
) -> None:
    with running(tmp_path, default_onnx, default_project, max_concurrency=2) as (_, address):
        held = [socket.create_connection(address, timeout=10) for _ in range(2)]
        time.sleep(0.3)  # accepted by the server
        extra = socket.create_connection(address, timeout=10)
        extra.sendall(REQUEST)
        response = read_response(extra)
        assert response.status == 503 and response.getheader("connection") == "close"
        assert extra.recv(1) == b""  # closed by the server
        extra.close()
        time.sleep(0.2)  # the server has seen it go
        held[0].sendall(REQUEST)  # a connection within the limit is served
        assert read_response(held[0]).status == 200
        for sock in held:
            sock.close()


def test_the_handover_socket_is_removed_when_the_server_ends(
    tmp_path: Path, default_onnx: Path, default_project: Path
) -> None:
    with running(tmp_path / "a", default_onnx, default_project, handover=True) as (handle, _):
        assert Path(handle.handover).is_socket()
        psutil.Process(handle.pid).send_signal(signal.SIGTERM)
        assert exit_code(handle) == 0
        assert not Path(handle.handover).exists()

    # A model that cannot be loaded stops the server (exit 1) and leaves nothing behind either.
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with (
        pytest.raises(HandoffError, match="exited with code 1"),
        running(tmp_path / "b", broken, default_project, handover=True),
    ):
        pass
    assert not list((tmp_path / "b").glob("handoff-*/*.sock"))


@pytest.mark.unit
def test_deploy_writes_handoff_yamls_serving_settings_into_the_spec(
    default_project: Path, tmp_path: Path
) -> None:
    from handoff.deployment import write_spec
    from handoff.project import Project

    spec_file = write_spec(Project.load(default_project), tmp_path, MODEL, "4", 8123, tmp_path / "h.sock")
    spec = json.loads(spec_file.read_text())
    assert {k: spec[k] for k in ("model_version", "port", "max_concurrency", "shutdown_grace_s")} == {
        "model_version": "4",
        "port": 8123,
        "max_concurrency": 256,
        "shutdown_grace_s": 20,
    }
    assert (spec["max_request_bytes"], spec["max_inflight_bytes"]) == (16 * 1024 * 1024, 64 * 1024 * 1024)
    assert (spec["header_timeout_s"], spec["handover"]) == (10, str(tmp_path / "h.sock"))
