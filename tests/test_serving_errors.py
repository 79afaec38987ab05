"""The model server over real HTTP, as an on-call engineer meets it: every bad request is a 400 with a
V2 ``{"error": ...}`` body that names the input and what the contract expects, the keep-alive
connection survives it, oversized bodies are refused unread, and readiness waits for the model."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from handoff.errors import HandoffError
from handoff.files import write_json
from handoff.serving import local_server

pytestmark = pytest.mark.local

MODEL = "digits-classifier"
INFER = f"/v2/models/{MODEL}/infer"


def spec_for(state: Path, onnx_path: Path, project_dir: Path, port: int) -> Path:
    spec = {
        "model_name": MODEL,
        "onnx_path": str(onnx_path),
        "contract_dir": str(project_dir),
        "host": "127.0.0.1",
        "port": port,
    }
    write_json(state / "spec.json", spec)
    return state / "spec.json"


@pytest.fixture(scope="module")
def server(
    default_onnx: Path, default_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """One real server for the module: (host, port)."""
    state = tmp_path_factory.mktemp("server")
    sock = local_server.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    spec = spec_for(state, default_onnx, default_project, port)
    handle = local_server.start(
        spec, sock, model_name=MODEL, version="1", state_dir=state, ready_timeout_s=60
    )
    yield "127.0.0.1", port
    local_server.terminate(handle)


def good_body(request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "image", "shape": [2, 1, 8, 8], "datatype": "FP32"}]}
    body["inputs"][0]["data"] = [0.5] * 128
    if request_id is not None:
        body["id"] = request_id
    return body


def image(**change: Any) -> dict[str, Any]:
    tensor = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64, **change}
    return {"inputs": [tensor]}


def post(conn: http.client.HTTPConnection, body: Any, path: str = INFER) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=raw, headers={"content-type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


BAD_REQUESTS: dict[str, tuple[Any, str]] = {
    "malformed-json": (b'{"inputs": [', "the request body is not valid JSON"),
    "not-utf8": (b"\x80", "the request body is not valid JSON ("),
    "no-inputs": ({"id": "x"}, "inputs: Field required; expected a V2 inference request like"),
    "input-without-data": (
        {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32"}]},
        "input 'image' (inputs[0]): data: Field required",
    ),
    "inputs-not-a-list": ({"inputs": {"image": [0.0]}}, "inputs: Input should be a valid list"),
    "wrong-name": (image(name="pixels"), "unknown input(s) ['pixels']; expected inputs ['image']"),
    "wrong-rank": (
        image(shape=[1, 64]),
        "input 'image': expected shape [-1, 1, 8, 8] (-1 = any), got [1, 64]",
    ),
    # A client's bugs a lenient parser would hide (shape -1 is a contract's "any size", never a size).
    "negative-dim": (
        image(shape=[-1, 1, 8, 8]),
        "input 'image' (inputs[0]): shape must be sizes (integers >= 0), got [-1, 1, 8, 8]",
    ),
    "shape-of-strings": (
        image(shape=["1", "1", "8", "8"]),
        'input \'image\' (inputs[0]): shape must be a list of integers, got ["1", "1", "8", "8"]',
    ),
    "shape-with-a-bool": (
        image(shape=[True, 1, 8, 8]),
        "input 'image' (inputs[0]): shape must be a list of integers, got [true, 1, 8, 8]",
    ),
    "lower-case-datatype": (
        image(datatype="fp32"),
        "input 'image' (inputs[0]): unknown datatype 'fp32' (did you mean FP32?)",
    ),
    "duplicate-key": (
        b'{"inputs": [{"name": "image", "name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", '
        b'"data": [' + b"0, " * 63 + b"0]}]}",
        'the request body repeats a key (Detected duplicate key "name"',
    ),
    "wrong-datatype": (image(datatype="FP64"), "input 'image': expected datatype FP32, got FP64"),
    "short-data": (image(data=[0.0] * 60), "input 'image': shape [1, 1, 8, 8] needs 64 values, data has 60"),
    "ragged-data": (
        image(data=[[0.0] * 8] * 6 + [[0.0] * 7, [0.0] * 9]),  # 64 values, but not in rows of 8
        "input 'image': data must be a flat",
    ),
    "data-not-a-list": (image(data=0.5), "input 'image' (inputs[0]): data must be a list, got a number"),
    "strings": (image(data=["0.5"] * 64), "input 'image': data must be numbers for datatype FP32"),
    "nulls": (image(data=[None] * 64), "input 'image': data must be numbers for datatype FP32"),
    "absurd-shape": (
        image(shape=[10**12, 1, 8, 8]),
        "input 'image': shape [1000000000000, 1, 8, 8] needs 64000000000000 values, data has 64",
    ),
    "nan": (
        b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [NaN'
        + b", 0" * 63
        + b"]}]}",
        "input 'image': data holds NaN or infinite values",
    ),
    "infinity": (
        b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [-Infinity'
        + b", 0" * 63
        + b"]}]}",
        "input 'image': data holds NaN or infinite values",
    ),
    "overflows-fp32": (image(data=[1e300] + [0.0] * 63), "input 'image': data holds NaN or infinite values"),
    "input-twice": (
        {"inputs": image()["inputs"] * 2},
        "input(s) ['image'] given more than once; expected inputs ['image']",
    ),
    "unknown-output": ({**image(), "outputs": [{"name": "probs"}]}, "unknown output(s) ['probs']"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_is_a_v2_400_and_the_connection_keeps_working(
    server: tuple[str, int], case: str
) -> None:
    body, message = BAD_REQUESTS[case]
    conn = http.client.HTTPConnection(*server, timeout=10)
    status, answer = post(conn, body)
    assert (status, list(answer)) == (400, ["error"]), answer
    assert message in answer["error"]
    # The same keep-alive connection carries the next request.
    sock = conn.sock
    status, answer = post(conn, good_body("after-" + case))
    assert status == 200 and answer["id"] == "after-" + case
    assert conn.sock is sock
    conn.close()


def test_a_request_without_id_gets_one(server: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*server, timeout=10)
    status, answer = post(conn, good_body())
    assert status == 200 and answer["id"]
    assert answer["outputs"][0]["shape"] == [2, 10]


def test_a_body_is_read_as_json_whatever_its_content_type_and_says_so_when_it_is_not(
    server: tuple[str, int],
) -> None:
    conn = http.client.HTTPConnection(*server, timeout=10)
    # tritonclient sends no Content-Type, curl -d sends a form's: both are JSON when they parse.
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):
        conn.request("POST", INFER, body=json.dumps(good_body("typed")), headers=headers)
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())["id"]) == (200, "typed")
    conn.request("POST", INFER, body=b"image=0.5", headers={"content-type": "text/plain"})
    response = conn.getresponse()
    assert response.status == 400
    error = json.loads(response.read())["error"]
    assert "sent as 'text/plain', not JSON, and does not parse as JSON" in error
    assert "send it with 'Content-Type: application/json'" in error


def test_an_unknown_model_is_a_v2_404(server: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*server, timeout=10)
    status, answer = post(conn, good_body(), path="/v2/models/nope/infer")
    assert (status, answer) == (404, {"error": "Model with name nope does not exist."})
    conn.request("GET", "/v2/models/nope")
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (404, answer)


def test_metadata_comes_from_the_contract(server: tuple[str, int]) -> None:
    answer = requests.get(f"http://{server[0]}:{server[1]}/v2/models/{MODEL}", timeout=10).json()
    assert answer["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert answer["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


def test_a_body_over_the_limit_is_413_before_it_is_read(server: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*server, timeout=10)
    conn.putrequest("POST", INFER)
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(16 * 1024 * 1024 + 1))
    conn.endheaders()  # not one byte of the body is sent
    response = conn.getresponse()
    assert response.status == 413
    assert response.getheader("connection") == "close"
    assert "exceeds the server's limit of 16777216 bytes" in json.loads(response.read())["error"]


def _popen_server(spec: Path, sock: Any, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in local_server.RUN_ONLY_ENV}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "handoff.serving", str(spec), str(sock.fileno())],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(sock.fileno(),),
        )


def test_ready_is_503_until_the_model_is_loaded(
    default_onnx: Path, default_project: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)  # loading blocks until the model's bytes are written into it
    sock = local_server.bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    process = _popen_server(spec_for(tmp_path, fifo, default_project, 0), sock, tmp_path / "log")
    sock.close()
    try:
        ready = requests.get(f"{url}/v2/health/ready", timeout=20)
        assert (ready.status_code, list(ready.json())) == (503, ["error"])
        infer = requests.post(f"{url}{INFER}", json=good_body(), timeout=10)
        assert infer.status_code == 503 and "not ready" in infer.json()["error"]
        writer = threading.Thread(target=lambda: fifo.write_bytes(default_onnx.read_bytes()))
        writer.start()
        deadline = time.monotonic() + 20
        while requests.get(f"{url}/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.05)
        writer.join()
        assert requests.post(f"{url}{INFER}", json=good_body(), timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_a_corrupt_model_never_becomes_ready_and_says_why_in_one_line(
    default_project: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an onnx model")
    sock = local_server.bind("127.0.0.1", 0)
    spec = spec_for(tmp_path, corrupt, default_project, sock.getsockname()[1])
    with pytest.raises(HandoffError, match="exited with code 1 before it was ready"):
        local_server.start(spec, sock, model_name=MODEL, version="1", state_dir=tmp_path, ready_timeout_s=30)
    log = (tmp_path / "server.log").read_text()
    lines = [line for line in log.splitlines() if "cannot be loaded" in line]
    assert len(lines) == 1 and f"model {MODEL} cannot be loaded from {corrupt}: HandoffError" in lines[0]
    assert "Traceback" not in log
