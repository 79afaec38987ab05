"""The A/B router's HTTP/1.1 forwarding, against real uvicorn servers on 127.0.0.1 (the model
server's HTTP stack): what a caller sends arrives once, what comes back is the caller's own
answer, however the caller and the arm use the protocol."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from handoff.serving.ab_router import Router, arm_for

pytestmark = pytest.mark.unit

# Callers whose key the stable hash sends to each arm (at a 50% share).
ON_CHAMPION = next(f"x-user: u-{i}" for i in range(100) if arm_for(f"u-{i}", 50) == "champion")
ON_CHALLENGER = next(f"x-user: u-{i}" for i in range(100) if arm_for(f"u-{i}", 50) == "challenger")


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An arm that answers after a moment with the body and headers it received."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await asyncio.sleep(0.05)  # inference: an interim response, if any, goes out first, alone
    names = b",".join(sorted(k for k, _ in scope["headers"]))
    out = b'{"echo": ' + body + b', "headers": "' + names + b'"}'
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    await send({"type": "http.response.body", "body": out})


def serve(app: Any) -> tuple[uvicorn.Server, int]:
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, http="httptools", log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, sock.getsockname()[1]


@pytest.fixture(scope="module")
def router() -> Iterator[int]:
    arm, arm_port = serve(echo)
    closed = socket.create_server(("127.0.0.1", 0))  # a challenger that is down: nothing accepts
    dead_port = closed.getsockname()[1]
    closed.close()
    arms = {
        "champion": {"version": "1", "url": f"http://127.0.0.1:{arm_port}"},
        "challenger": {"version": "2", "url": f"http://127.0.0.1:{dead_port}"},
    }
    front, port = serve(
        Router(model_name="m", arms=arms, share=50, key_header="x-user", max_request_bytes=1 << 20)
    )
    yield port
    for server in (front, arm):
        server.should_exit = True


def exchange(port: int, body: bytes, *headers: str, expect_continue: bool = False) -> bytes:
    """One request on a fresh connection, as raw bytes both ways; the whole answer back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        head = ["POST /v2/models/m/infer HTTP/1.1", "host: router", f"content-length: {len(body)}", *headers]
        if expect_continue:
            head.append("expect: 100-continue")
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if expect_continue:  # as curl does for a large body: wait for the go-ahead
            assert conn.recv(100).startswith(b"HTTP/1.1 100 Continue")
        conn.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_a_caller_that_asks_to_continue_gets_its_own_answer_and_the_next_caller_too(router: int) -> None:
    first = exchange(router, b'{"id": "A"}', ON_CHAMPION, expect_continue=True)
    second = exchange(router, b'{"id": "B"}', ON_CHAMPION)
    assert first.startswith(b"HTTP/1.1 200 ") and b'"echo": {"id": "A"}' in first
    assert second.startswith(b"HTTP/1.1 200 ") and b'"echo": {"id": "B"}' in second
    # Hop-by-hop headers stay with the router; the arm's own date and server are not doubled.
    assert b"expect" not in first.split(b'"headers": ')[1]
    head = first.split(b"\r\n\r\n")[0].lower()
    assert head.count(b"\r\ndate: ") == 1 and head.count(b"\r\nserver: ") == 1


def test_headers_the_caller_names_hop_by_hop_are_not_forwarded(router: int) -> None:
    answer = exchange(router, b"{}", ON_CHAMPION, "connection: x-secret", "x-secret: 1", "x-kept: 1")
    received = answer.split(b'"headers": ')[1]
    assert b"x-kept" in received and b"x-secret" not in received


def test_an_arm_that_is_down_is_a_502_naming_it(router: int) -> None:
    answer = exchange(router, b"{}", ON_CHALLENGER)
    assert answer.startswith(b"HTTP/1.1 502 ") and b"x-handoff-ab-arm: challenger" in answer.lower()
    assert b"the challenger arm (version 2) did not answer" in answer
