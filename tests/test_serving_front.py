"""The model server's front door over real HTTP, as clients nobody here wrote meet it: compressed
bodies, the protocol's versioned paths and the repository index, a refusal that the client reads
even when it sends its whole body first, and a cap on request bytes held at once."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from handoff.serving import local_server
from tests.model_server import start_server

pytestmark = pytest.mark.local

MODEL = "digits-classifier"
VERSION = "7"
LIMIT = 1024 * 1024  # max_request_bytes in this module's server
INFLIGHT = 1536 * 1024  # max_inflight_bytes: one body of LIMIT fits, two do not
IDLE_S = 1.5  # header_timeout_s: also how long a body may stop arriving


@pytest.fixture(scope="module")
def server(
    default_onnx: Path, default_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    state = tmp_path_factory.mktemp("front")
    handle, url = start_server(
        state,
        default_onnx,
        default_project,
        model_version=VERSION,
        max_request_bytes=LIMIT,
        max_inflight_bytes=INFLIGHT,
        header_timeout_s=IDLE_S,
    )
    global SERVER_LOG
    SERVER_LOG = Path(handle.log)
    yield "127.0.0.1", int(url.rsplit(":", 1)[1])
    local_server.terminate(handle)


SERVER_LOG = Path()  # the module's server's log, once started


@pytest.fixture(scope="module")
def session(default_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(default_onnx), providers=["CPUExecutionProvider"])


def body_for(array: np.ndarray, **extra: Any) -> bytes:
    tensor = {"name": "image", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def call(
    server: tuple[str, int],
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(*server, timeout=20)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw)


def images(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 1, 8, 8), dtype=np.float32)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", lambda b: zlib.compress(b, wbits=-15))],
    ids=["gzip", "deflate", "raw-deflate"],
)
def test_a_compressed_body_is_decoded(
    server: tuple[str, int], session: ort.InferenceSession, encoding: str, compress: Any
) -> None:
    array = images(3)
    status, _, answer = call(
        server, "POST", f"/v2/models/{MODEL}/infer", compress(body_for(array)), {"content-encoding": encoding}
    )
    assert status == 200, answer
    want = session.run(None, {"image": array})[0]
    np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"]).reshape(want.shape), want, atol=1e-5)


def test_compression_is_checked_and_counted_at_its_decoded_size(server: tuple[str, int]) -> None:
    infer = f"/v2/models/{MODEL}/infer"
    bomb = gzip.compress(b" " * (LIMIT + 1))  # ~1 KiB on the wire
    status, headers, answer = call(server, "POST", infer, bomb, {"content-encoding": "gzip"})
    assert status == 413 and "connection" not in headers  # read whole: the connection goes on
    assert answer["error"] == f"request body decompresses to more than the server's limit of {LIMIT} bytes"
    status, _, answer = call(server, "POST", infer, body_for(images(1)), {"content-encoding": "br"})
    assert status == 415
    assert answer["error"].startswith("Content-Encoding 'br' is not supported")
    status, _, answer = call(server, "POST", infer, b"not gzip", {"content-encoding": "gzip"})
    assert status == 400 and answer["error"].startswith("the request body is not valid gzip data")
    body = body_for(images(1))
    two_members = gzip.compress(body[:100]) + gzip.compress(body[100:])  # as `cat a.gz b.gz` makes
    assert call(server, "POST", infer, two_members, {"content-encoding": "gzip"})[0] == 200
    status, _, answer = call(
        server, "POST", infer, zlib.compress(body) + b"junk", {"content-encoding": "deflate"}
    )
    assert status == 400
    assert answer["error"].startswith("the request body has 4 bytes after its deflate stream; expected")


def test_versioned_paths_serve_the_registered_version_and_name_it(server: tuple[str, int]) -> None:
    base = f"/v2/models/{MODEL}/versions/{VERSION}"
    status, _, answer = call(server, "POST", f"{base}/infer", body_for(images(2)))
    assert status == 200
    assert (answer["model_name"], answer["model_version"]) == (MODEL, VERSION)
    assert None not in answer.values() and "parameters" not in answer["outputs"][0]
    for path in (base, f"/v2/models/{MODEL}"):
        status, _, metadata = call(server, "GET", path)
        assert status == 200
        assert (metadata["versions"], metadata["platform"]) == ([VERSION], "onnxruntime_onnx")
    assert call(server, "GET", f"{base}/ready")[:3:2] == (200, {"name": MODEL, "ready": True})
    status, _, answer = call(server, "POST", f"/v2/models/{MODEL}/versions/3/infer", body_for(images(1)))
    assert status == 404
    assert answer["error"] == (
        f"model {MODEL} version 3 is not served here; this server serves version {VERSION} "
        f"(/v2/models/{MODEL}/versions/{VERSION})"
    )


def test_the_repository_extension_it_advertises_lists_the_model(server: tuple[str, int]) -> None:
    status, _, metadata = call(server, "GET", "/v2")
    assert status == 200 and "model_repository" in metadata["extensions"]
    status, _, index = call(server, "POST", "/v2/repository/index", b"{}")
    assert (status, index) == (200, [{"name": MODEL, "version": VERSION, "state": "READY"}])
    assert call(server, "POST", f"/v2/repository/models/{MODEL}/load", b"{}")[0] == 200
    status, _, answer = call(server, "POST", f"/v2/repository/models/{MODEL}/unload", b"{}")
    assert status == 400 and "does not unload it; stop the server (handoff stop)" in answer["error"]
    assert call(server, "POST", f"/v2/models/{MODEL}/infer", body_for(images(1)))[0] == 200  # still served


def test_a_body_over_the_limit_is_a_413_the_sender_reads(server: tuple[str, int]) -> None:
    """http.client sends the whole body before it reads: without a lingering close it gets a reset."""
    conn = http.client.HTTPConnection(*server, timeout=20)
    conn.request("POST", f"/v2/models/{MODEL}/infer", body=b"x" * (20 * LIMIT))
    response = conn.getresponse()
    assert response.status == 413 and response.getheader("connection") == "close"
    assert json.loads(response.read())["error"] == (
        f"request body of {20 * LIMIT} bytes exceeds the server's limit of {LIMIT} bytes"
    )


def test_request_bytes_held_at_once_are_capped_with_retry_after(server: tuple[str, int]) -> None:
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {LIMIT}\r\n\r\n"
    ).encode()
    slow = socket.create_connection(server, timeout=20)
    try:
        slow.sendall(head + b" " * 1024)  # the server holds LIMIT bytes for it from now on
        time.sleep(0.3)
        status, headers, answer = call(server, "POST", f"/v2/models/{MODEL}/infer", b" " * LIMIT)
        assert (status, headers["retry-after"]) == (503, "1")
        assert answer["error"].startswith(
            f"the server holds {LIMIT} bytes of other requests (limit {INFLIGHT})"
        )
        # A small request still fits beside it.
        status, _, answer = call(server, "POST", f"/v2/models/{MODEL}/infer", body_for(images(1)))
        assert status == 200
    finally:
        slow.close()
    time.sleep(0.3)  # the server noticed the disconnect and released what it held
    assert call(server, "POST", f"/v2/models/{MODEL}/infer", b" " * (LIMIT - 10))[0] == 400


def test_a_client_error_is_one_log_line_without_a_traceback(server: tuple[str, int]) -> None:
    before = SERVER_LOG.read_text()
    assert call(server, "POST", "/v2/models/nope/infer", b"{}")[0] == 404
    assert call(server, "GET", f"/v2/models/{MODEL}/versions/9/ready")[0] == 404
    assert call(server, "POST", "/v1/models/nope:predict", b"{}")[0] == 404
    assert call(server, "GET", f"/v2/models/{MODEL}/infer")[0] == 405
    time.sleep(0.2)
    logged = SERVER_LOG.read_text()[len(before) :]
    assert "Traceback" not in logged
    rejected = [line for line in logged.splitlines() if "rejected request" in line]
    assert len(rejected) == 3, logged  # the 405 is answered without a log line


def chunked_head(extra: str = "") -> bytes:
    return (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one response read off a raw socket (with Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), rest[:length]


def test_what_a_refused_or_abandoned_body_held_is_released(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=20) as sock:  # chunked, over the limit: a 413
        sock.sendall(
            chunked_head() + chunk(b" " * (LIMIT // 2)) + chunk(b" " * (LIMIT // 2)) + chunk(b" " * 64)
        )
        assert read_response(sock)[0] == 413
    with socket.create_connection(server, timeout=20) as sock:  # chunked, then the client goes away
        sock.sendall(chunked_head() + chunk(b" " * (LIMIT // 2)))
        time.sleep(0.3)
    time.sleep(0.3)
    # Nothing is held any more: a body of the whole limit is read (and is a 400, not a 503).
    assert call(server, "POST", f"/v2/models/{MODEL}/infer", b" " * LIMIT)[0] == 400


def test_a_body_that_stops_arriving_is_a_408_and_frees_what_it_held(server: tuple[str, int]) -> None:
    head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT}\r\n\r\n"
    with socket.create_connection(server, timeout=20) as sock:
        sock.sendall(head.encode() + b" " * 10)
        started = time.monotonic()
        status, body = read_response(sock)
        assert status == 408 and time.monotonic() - started < IDLE_S + 2
        assert json.loads(body)["error"] == f"the request body stopped arriving: nothing for {IDLE_S:g} s"
    assert call(server, "POST", f"/v2/models/{MODEL}/infer", b" " * LIMIT)[0] == 400


def test_a_refusal_drains_no_longer_than_the_body_and_keeps_a_connection_it_read_whole(
    server: tuple[str, int],
) -> None:
    infer = f"/v2/models/{MODEL}/infer"
    conn = http.client.HTTPConnection(*server, timeout=20)
    started = time.monotonic()  # refused before its body is read: drained to its end, then closed
    conn.request("POST", infer, body=body_for(images(1)), headers={"content-encoding": "br"})
    response = conn.getresponse()
    response.read()
    assert (response.status, response.getheader("connection")) == (415, "close")
    assert time.monotonic() - started < 2  # not the 5 s a drain may wait for a body still coming
    conn.close()
    conn = http.client.HTTPConnection(*server, timeout=20)  # refused once read whole: kept alive
    conn.request("POST", infer, body=gzip.compress(b" " * (LIMIT + 1)), headers={"content-encoding": "gzip"})
    response = conn.getresponse()
    response.read()
    assert (response.status, response.getheader("connection")) == (413, None)
    sock = conn.sock
    conn.request("POST", infer, body=body_for(images(1)))
    response = conn.getresponse()
    response.read()
    assert response.status == 200 and conn.sock is sock


def test_a_client_that_waited_for_100_continue_reads_its_413(server: tuple[str, int]) -> None:
    with socket.create_connection(server, timeout=20) as sock:
        sock.sendall(chunked_head("Expect: 100-continue\r\n"))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        for _ in range(3):
            sock.sendall(chunk(b" " * (LIMIT // 2)))
        sock.sendall(b"0\r\n\r\n")
        assert read_response(sock)[0] == 413


def test_a_header_length_that_is_not_ascii_digits_is_a_400(server: tuple[str, int]) -> None:
    headers = {"inference-header-content-length": "\u00b2".encode().decode("latin-1")}
    status, _, answer = call(server, "POST", f"/v2/models/{MODEL}/infer", b"{}", headers)
    assert status == 400 and "Inference-Header-Content-Length must be the byte length" in answer["error"]
