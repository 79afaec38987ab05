"""The local A/B router: one process on the project's port in front of two model servers (the
champion's and the challenger's, both the real KServe server on private loopback ports).

Each inference request goes to one arm, chosen by a stable hash of its key: the header named by
``key_header`` when the request has it (a user or session id: a caller then sticks to one arm),
else the V2 request's ``id``; a request with neither is drawn at random. ``sha256(key)`` read as a
number in [0, 1) below ``share`` / 100 goes to the challenger, so the split is the same in every
process and after a restart. Every response says which arm answered it (``x-handoff-ab-arm``) and
which registered version (``x-handoff-model-version``).

Feedback (``/v2/models/<name>/feedback``) and everything else (metadata, readiness, ``/metrics``)
go to the champion's server: both arms write the same payload and feedback stores. ``GET /ab``
answers the router's own counts per arm (requests, errors, latency quantiles measured here, as a
caller sees them), which ``handoff ab status`` reports beside the metrics computed from feedback.

The router speaks the same blue/green socket protocol as the model server (``takeover``), so
``handoff ab start`` puts it on the port without refusing a connection, and ``handoff ab stop``
or a later ``handoff deploy`` replaces it the same way.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools
import numpy as np
import orjson
import uvicorn

from handoff.serving import graceful, takeover
from handoff.serving.v2_wire import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ARM_HEADER = "x-handoff-ab-arm"
VERSION_HEADER = "x-handoff-model-version"
STATUS_PATH = "/ab"
ARMS = ("champion", "challenger")
_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
# Latencies kept per arm for the quantiles: the newest ones, a bounded memory whatever the traffic.
MAX_LATENCIES = 200_000
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the router sets itself are not passed on.
_NOT_FORWARDED = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-connection",
    b"host",
    b"content-length",
    # The router read the whole body already (answering the caller's 100-continue itself): an arm
    # asked to continue would answer 100 first, ahead of its response.
    b"expect",
}
# The arm's own: the router's server writes its own date and server headers.
_NOT_RETURNED = _NOT_FORWARDED | {b"date", b"server"}
_CLOSE = (b"connection", b"close")
FORWARD_TIMEOUT_S = 60.0
_JSON = [(b"content-type", b"application/json")]


def arm_for(key: str, share: float) -> str:
    """The arm a request key goes to: stable across processes and restarts (a hash, not ``hash()``)."""
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "challenger" if draw < share / 100 else "champion"


def request_id(body: bytes, headers: dict[bytes, bytes]) -> str | None:
    """The V2 request's ``id``: from the JSON head of a binary-extension request, else the body."""
    length = headers.get(b"inference-header-content-length")
    try:
        head = body[: int(length)] if length is not None else body
        found = orjson.loads(head).get("id")
    except (ValueError, AttributeError, orjson.JSONDecodeError):
        return None
    return found if isinstance(found, str) and found else None


class ArmStats:
    """What the router saw of one arm: requests by status, and the newest latencies."""

    def __init__(self) -> None:
        self.statuses: collections.Counter[int] = collections.Counter()
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=MAX_LATENCIES)

    def record(self, status: int, seconds: float) -> None:
        self.statuses[status] += 1
        if status < 400:
            self.latencies_ms.append(seconds * 1000)

    def summary(self) -> dict[str, Any]:
        requests = sum(self.statuses.values())
        errors = sum(n for status, n in self.statuses.items() if status >= 500)
        latencies = np.fromiter(self.latencies_ms, float)

        def quantile(q: float) -> float | None:
            return round(float(np.quantile(latencies, q)), 3) if len(latencies) else None

        return {
            "requests": requests,
            "errors": errors,  # 5xx: the arm (or its server) failed; 4xx are the caller's
            "rejected": sum(n for status, n in self.statuses.items() if 400 <= status < 500),
            "p50_ms": quantile(0.5),
            "p99_ms": quantile(0.99),
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
        }


class UpstreamError(Exception):
    """An arm's server closed the connection or answered something that is not HTTP/1.1."""


class _Response:
    """httptools' callbacks for one response: its headers, body and whether it is whole. An
    interim (1xx) response is skipped: the final one follows it on the same connection."""

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only  # a HEAD request's response has no body, whatever it declares
        self.parser: httptools.HttpResponseParser | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False

    def interim(self) -> bool:
        return self.parser is not None and 100 <= self.parser.get_status_code() < 200

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_headers_complete(self) -> None:
        if self.head_only and not self.interim():
            self.complete = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.interim():
            self.complete = True


class Upstream:
    """Keep-alive HTTP/1.1 connections to one arm's model server, reused request after request.

    A few lines of asyncio streams and httptools (the parser uvicorn serves with) rather than an
    HTTP client library: the router's whole job is one forwarded request, and a general client
    costs more per request than the small model it forwards to (bench/ab_router.py: httpx added
    2 ms, aiohttp 1 ms, this about a third of that).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.authority = parts.netloc.encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        head = [f"{method} ".encode() + target + b" HTTP/1.1", b"host: " + self.authority]
        head += [k + b": " + v for k, v in headers]
        head.append(b"content-length: " + str(len(body)).encode())
        message = b"\r\n".join(head) + b"\r\n\r\n" + body
        while self.idle:  # a kept connection the server closed meanwhile fails before any answer
            reader, writer = self.idle.pop()
            try:
                return await self._exchange(reader, writer, message, method == "HEAD")
            except (OSError, _Closed):
                writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await self._exchange(reader, writer, message, method == "HEAD")
        except _Closed:
            writer.close()
            raise UpstreamError("the connection closed before a whole response") from None

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes, head_only: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        response = _Response(head_only)
        parser = response.parser = httptools.HttpResponseParser(response)
        received = False
        try:
            writer.write(message)
            while not response.complete:
                data = await reader.read(65536)
                if not data:
                    if received:
                        raise UpstreamError("the connection closed in the middle of a response")
                    raise _Closed
                received = True
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    raise UpstreamError(f"not an HTTP response: {exc}") from None
        except BaseException:  # a failure, or the router's timeout cancelling it: never reused
            writer.close()
            raise
        # Reused only when nothing follows the response (an arm answers one request at a time).
        leftover = getattr(reader, "_buffer", b"")  # asyncio keeps unread bytes there (no public API)
        if parser.should_keep_alive() and not reader.at_eof() and not leftover:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return parser.get_status_code(), response.headers, b"".join(response.body)


class _Closed(Exception):
    """A connection closed before any byte of the response: safe to send the request again."""


class Router:
    """ASGI app splitting a model's inference requests between two arms (module docstring)."""

    def __init__(
        self,
        *,
        model_name: str,
        arms: dict[str, dict[str, str]],
        share: float,
        key_header: str | None,
        max_request_bytes: int,
        closing: Callable[[], bool] = lambda: False,
    ) -> None:
        self.model_name = model_name
        self.arms = arms  # arm -> {"version", "url"}
        self.share = share
        self.key_header = key_header.lower().encode() if key_header else None
        self.max_request_bytes = max_request_bytes
        self.closing = closing
        self.stats = {arm: ArmStats() for arm in ARMS}
        self.started = time.time()
        self.upstreams = {arm: Upstream(arms[arm]["url"]) for arm in ARMS}
        self._random = random.Random()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == STATUS_PATH and method == "GET":
            await self.respond(send, HTTPStatus.OK, orjson.dumps(self.status()))
            return
        body = await self.read_body(receive, send)
        if body is None:
            return
        headers = dict(scope["headers"])
        match = _INFER.match(path) if method == "POST" else None
        if match is None:
            await self.forward("champion", scope, headers, body, send, record=False)
            return
        name, version = match.groups()
        arm = self.choose(headers, body, version)
        await self.forward(arm, scope, headers, body, send, record=name == self.model_name)

    def choose(self, headers: dict[bytes, bytes], body: bytes, version: str | None) -> str:
        """The arm for one request: the one serving an explicitly asked-for version, else by key."""
        for arm, served in self.arms.items():
            if version is not None and served["version"] == version:
                return arm
        key = headers.get(self.key_header) if self.key_header else None
        text = key.decode("latin-1") if key else request_id(body, headers)
        if text is None:
            return "challenger" if self._random.random() < self.share / 100 else "champion"
        return arm_for(text, self.share)

    def status(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "share": self.share,
            "key_header": self.key_header.decode() if self.key_header else None,
            "started": self.started,
            "arms": {arm: {**self.arms[arm], **self.stats[arm].summary()} for arm in ARMS},
        }

    async def read_body(self, receive: Receive, send: Send) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                text = f"the request body is larger than the server's limit of {self.max_request_bytes} bytes"
                await self.respond(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, error_body(text), close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def forward(
        self, arm: str, scope: Scope, headers: dict[bytes, bytes], body: bytes, send: Send, *, record: bool
    ) -> None:
        target = self.arms[arm]
        query = scope["query_string"]
        path = scope["raw_path"] or scope["path"].encode()
        # Hop-by-hop: the fixed ones, and any the caller's Connection header names (RFC 9110 7.6.1).
        named = {
            token.strip().lower().encode()
            for key, value in scope["headers"]
            if key == b"connection"
            for token in value.decode("latin-1").split(",")
        }
        passed = [(k, v) for k, v in scope["headers"] if k not in _NOT_FORWARDED and k not in named]
        started = time.perf_counter()
        try:
            status, answered, content = await asyncio.wait_for(
                self.upstreams[arm].request(
                    scope["method"], path + (b"?" + query if query else b""), passed, body
                ),
                FORWARD_TIMEOUT_S,
            )
            answered = [(k, v) for k, v in answered if k not in _NOT_RETURNED]
        except (OSError, TimeoutError, UpstreamError) as exc:
            status = HTTPStatus.BAD_GATEWAY
            content = error_body(f"the {arm} arm (version {target['version']}) did not answer: {exc!r}")
            answered = list(_JSON)
        if record:
            self.stats[arm].record(status, time.perf_counter() - started)
        version = str(target["version"]).encode()
        answered += [(ARM_HEADER.encode(), arm.encode()), (VERSION_HEADER.encode(), version)]
        await self.respond(send, status, content, answered)

    async def respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
    ) -> None:
        head = [*(headers or _JSON), (b"content-length", str(len(body)).encode())]
        if close or self.closing():
            head.append(_CLOSE)
        await send({"type": "http.response.start", "status": int(status), "headers": head})
        await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def route(spec_path: Path, spec: dict[str, Any], fd: int | None, takeover_fd: int | None) -> None:
    """Serve the router described by ``spec`` (``spec["router"]``) until SIGTERM, as the model
    server serves its model: graceful shutdown, head timeout, concurrency limit, blue/green."""
    settings = spec["router"]
    retiring, shutting_down = threading.Event(), threading.Event()
    router = Router(
        model_name=settings["model_name"],
        arms=settings["arms"],
        share=float(settings["share"]),
        key_header=settings.get("key_header"),
        max_request_bytes=int(spec["max_request_bytes"]),
        closing=lambda: retiring.is_set() or shutting_down.is_set(),
    )
    config = uvicorn.Config(
        router,
        http=graceful.protocol(float(spec["header_timeout_s"]), shutting_down),
        limit_concurrency=int(spec["max_concurrency"]) + 1,
        lifespan="on",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
    )
    server = graceful.GracefulServer(
        config, shutdown_grace_s=float(spec["shutdown_grace_s"]), shutting_down=shutting_down
    )
    sock = socket.socket(fileno=fd) if fd is not None else socket.create_server((spec["host"], spec["port"]))
    handover = Path(spec["handover"]) if spec.get("handover") else None
    what = f"A/B router for {settings['model_name']}"
    try:
        if takeover_fd is not None:
            takeover.on_signals(
                socket.socket(fileno=takeover_fd),
                handover,
                lambda taken: takeover.take_over(server, taken, spec_path, what),
                lambda: takeover.retire(server, retiring, what),
                what,
            )
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if handover is not None:
            handover.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"{what} stopped", file=sys.stderr, flush=True)
