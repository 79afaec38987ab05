"""The model server's front door: the V2 routes of the one model it serves, answered in front of
KServe's FastAPI app.

Inference is the server's hot path and its largest requests, so it is served here as plain ASGI:
no FastAPI routing or pydantic models (which build a Python object for every tensor value, 2 GB
for a 16 MiB request, and cost more per request than a small model's run). Everything this does
not route (liveness, ``/metrics``, V1, docs) goes on to KServe's app unchanged.

Routes, for model ``m`` at registered version ``v``: ``/v2/models/m[/versions/v]`` (metadata),
``…/ready``, ``…/infer``; ``/v2/health/ready`` (503 until the model is loaded); ``/v2`` (server
metadata); the model repository extension's ``/v2/repository/index`` (the model and its state)
and ``…/models/m/load`` (a no-op: it is loaded) and ``…/unload`` (refused: nothing would
answer). Another model's name is a 404, another version of this one a 404 naming the version
served. On ``…/infer``:

* bodies over ``max_request_bytes`` are a 413 before they are read, and compressed bodies
  (``Content-Encoding`` gzip or deflate) count at their decoded size; other encodings are a 415;
* request bodies held at once are capped at ``max_inflight_bytes``: past it a 503 with
  ``Retry-After``;
* a refused body still on the wire is read and dropped before the connection closes (a lingering
  close), so a client that sends its whole body before reading, as ``http.client`` does, reads
  the refusal instead of a reset;
* any ``Content-Type`` (or none, as tritonclient sends) is read as JSON, or as the binary tensor
  extension when ``Inference-Header-Content-Length`` is present; a large body is decoded (and a
  large response encoded) off the event loop, so health checks keep answering;
* a body that stops arriving for ``idle_timeout_s`` (the server's ``header_timeout_s``) is a 408,
  and what it held is released;
* every response carries ``Connection: close`` while the server is closing (retired, or
  shutting down), so keep-alive clients move to the next server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, TypeVar

import numpy as np
import orjson
from kserve.errors import InferenceError, InvalidInput

from handoff import __version__, feedback
from handoff.payload_log import PayloadLog
from handoff.serving import metrics
from handoff.serving.kserve_internals import PREDICT_HIST_TIME
from handoff.serving.onnx_model import OnnxModel
from handoff.serving.v2_wire import (
    Request,
    WireError,
    decode_binary,
    decode_json,
    encode_response,
    error_body,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")

log = logging.getLogger("kserve.handoff")

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready)?$")
# Bodies (and outputs) at least this large are decompressed, decoded (encoded) in a worker thread.
OFF_LOOP_BYTES = 256 * 1024
# A refused body is read and dropped (at most this long, and this many bytes or four times the
# body limit) before the connection is closed.
DRAIN_S = 5.0
DRAIN_BYTES = 64 * 1024 * 1024
SWEEP_S = 0.25  # how often bodies that stopped arriving are looked for
JSON_HEADERS = [(b"content-type", b"application/json")]
CLOSE = (b"connection", b"close")


class Refused(Exception):
    """A request answered with an error before the model saw it."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class FrontDoor:
    """ASGI app serving model ``model`` (at registered version ``version``) in front of ``app``."""

    def __init__(
        self,
        app: Asgi,
        model: OnnxModel,
        *,
        version: str,
        expected: str,
        max_request_bytes: int,
        max_inflight_bytes: int,
        idle_timeout_s: float = 10.0,
        closing: Callable[[], bool] = lambda: False,
        feedback: PayloadLog | None = None,
    ) -> None:
        self.app = app
        self.feedback = feedback
        self.model = model
        self.version = version
        self.expected = expected
        self.max_request_bytes = max_request_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.idle_timeout_s = idle_timeout_s
        self.reading: set[_Body] = set()  # requests whose body is being read
        self.sweeper: asyncio.Task[None] | None = None
        self.closing = closing
        self.inflight = 0  # request body bytes held, all requests together
        # Ids for requests without one: unique to this server (a random prefix) and cheap to make.
        prefix, numbers = uuid.uuid4().hex[:12], itertools.count(1)
        self.new_id = lambda: f"{prefix}-{next(numbers)}"
        # Large bodies are decoded here, one at a time: a JSON parse holds the GIL for its whole
        # length, and the event loop must get it back between two of them, not after four.
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        name = model.name
        self.metadata = orjson.dumps(
            {
                "name": name,
                "versions": [version],
                "platform": "onnxruntime_onnx",
                "inputs": model.get_input_types(),
                "outputs": model.get_output_types(),
            }
        )
        # Buckets with the contract's latency SLO as a bound: alert rules count the slower requests.
        self.latency = metrics.latency_histogram(model.contract.slo.latency_p99_ms / 1000).labels(name)
        self.count = metrics.RequestCounter(name)
        self.predict_time = PREDICT_HIST_TIME.labels(name)  # KServe's own, which dashboards read
        routes: dict[str, dict[str, Callable[..., Awaitable[int]]]] = {
            "/v2/health/ready": {"GET": self.server_ready},
            "/v2": {"GET": self.server_metadata},
            "/v2/": {"GET": self.server_metadata},
            "/v2/repository/index": {"POST": self.repository_index},
        }
        routes[f"/v2/repository/models/{name}/load"] = {"POST": self.repository_load}
        routes[f"/v2/repository/models/{name}/unload"] = {"POST": self.repository_unload}
        for base in (f"/v2/models/{name}", f"/v2/models/{name}/versions/{version}"):
            routes[base] = {"GET": self.model_metadata}
            routes[f"{base}/ready"] = {"GET": self.model_ready}
            routes[f"{base}/infer"] = {"POST": self.infer}
            routes[f"{base}/feedback"] = {"POST": self.record_feedback}
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        methods = self.routes.get(path)
        if methods is None:
            match = _MODEL_PATH.match(path)
            if match is not None:
                await self.not_served(scope, receive, send, match)
                return
            await self.app(scope, receive, self._closing_send(send) if self.closing() else send)
            return
        handler = methods.get(scope["method"])
        if handler is None:
            allow = ", ".join(methods).encode()
            message = f"{scope['method']} is not allowed on {path}; use {', '.join(methods)}"
            await self.respond(send, HTTPStatus.METHOD_NOT_ALLOWED, error_body(message), [(b"allow", allow)])
            return
        if handler == self.infer:
            started = time.perf_counter()
            status = await self.infer(scope, receive, send)
            self.count(status)
            self.latency.observe(time.perf_counter() - started)
            return
        await handler(scope, receive, send)

    def _closing_send(self, send: Send) -> Send:
        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), CLOSE]
            await send(message)

        return closing_send

    async def respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
        more: bool = False,
    ) -> None:
        """Send a whole response (``more``: all of its body, with the message end still to come)."""
        head = [*(headers or JSON_HEADERS), (b"content-length", str(len(body)).encode())]
        if close or self.closing():
            head.append(CLOSE)
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body, "more_body": more})

    # --- the model's routes ------------------------------------------------------------------

    async def not_served(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str]) -> None:
        name, version, _ = match.groups()
        if name != self.model.name:
            message = f"Model with name {name} does not exist."
        else:
            message = (
                f"model {name} version {version} is not served here; this server serves version "
                f"{self.version} (/v2/models/{name}/versions/{self.version})"
            )
        log.info("rejected request: %s %s: %s", scope["method"], scope["path"], message)
        if scope["path"].endswith("/infer"):
            metrics.REQUESTS.labels("other" if name != self.model.name else name, "404").inc()
        await self.respond(send, HTTPStatus.NOT_FOUND, error_body(message))

    async def model_metadata(self, scope: Scope, receive: Receive, send: Send) -> int:
        await self.respond(send, HTTPStatus.OK, self.metadata)
        return HTTPStatus.OK

    async def model_ready(self, scope: Scope, receive: Receive, send: Send) -> int:
        ready = bool(self.model.ready)
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        await self.respond(send, status, orjson.dumps({"name": self.model.name, "ready": ready}))
        return status

    async def server_ready(self, scope: Scope, receive: Receive, send: Send) -> int:
        if not self.model.ready:
            body = error_body("the model is not loaded yet")
            await self.respond(send, HTTPStatus.SERVICE_UNAVAILABLE, body)
            return HTTPStatus.SERVICE_UNAVAILABLE
        await self.respond(send, HTTPStatus.OK, b'{"ready":true}')
        return HTTPStatus.OK

    async def server_metadata(self, scope: Scope, receive: Receive, send: Send) -> int:
        body = {
            "name": "handoff-onnx",
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_repository"],
        }
        await self.respond(send, HTTPStatus.OK, orjson.dumps(body))
        return HTTPStatus.OK

    async def small_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | int:
        """A JSON route's whole body, with the request limits and timeouts of inference; or the
        status it was refused with (the refusal is sent)."""
        state = _Body(receive)
        self.watch(state)
        try:
            return await self.read_body(state)
        except Refused as refused:
            await self.refuse(scope, state, send, refused)
            return refused.status
        finally:
            self.inflight -= state.held
            self.reading.discard(state)

    async def repository_index(self, scope: Scope, receive: Receive, send: Send) -> int:
        """The model repository extension's index: this server's one model, its version and state
        (``{"ready": true}`` in the body lists only ready models, as Triton's does)."""
        body = await self.small_body(scope, receive, send)
        if isinstance(body, int):
            return body
        ready_only = False
        if body.strip():
            try:
                ready_only = orjson.loads(body).get("ready") is True
            except (orjson.JSONDecodeError, AttributeError):
                message = 'the index request body must be a JSON object such as {"ready": true}'
                await self.respond(send, HTTPStatus.BAD_REQUEST, error_body(message))
                return HTTPStatus.BAD_REQUEST
        ready = bool(self.model.ready)
        entry = {"name": self.model.name, "version": self.version, "state": "READY" if ready else "LOADING"}
        await self.respond(send, HTTPStatus.OK, orjson.dumps([] if ready_only and not ready else [entry]))
        return HTTPStatus.OK

    async def repository_load(self, scope: Scope, receive: Receive, send: Send) -> int:
        """The served model is loaded once, at start: loading it again changes nothing."""
        await self.respond(send, HTTPStatus.OK, b"{}")
        return HTTPStatus.OK

    async def repository_unload(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Refused: an unloaded model would leave a running server that answers nothing (KServe's
        own route would do exactly that)."""
        message = (
            f"this server serves model {self.model.name} version {self.version} only and does not "
            "unload it; stop the server (handoff stop) or deploy another version"
        )
        log.info("rejected request: %s", message)
        await self.respond(send, HTTPStatus.BAD_REQUEST, error_body(message))
        return HTTPStatus.BAD_REQUEST

    async def record_feedback(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Record ground truth for answered requests (``handoff.feedback`` says the body), to be
        joined with the payload log by request id."""
        body = await self.small_body(scope, receive, send)
        if isinstance(body, int):
            return body
        if self.feedback is None:
            message = (
                "this server keeps no payload log, so feedback could not be joined to its predictions; "
                "set monitoring.sample_rate above 0 in handoff.yaml and deploy again"
            )
            await self.respond(send, HTTPStatus.CONFLICT, error_body(message))
            return HTTPStatus.CONFLICT
        try:
            reports = feedback.parse(body, self.model.contract)
        except feedback.BadFeedback as exc:
            log.info("rejected feedback: %s", exc)
            await self.respond(send, HTTPStatus.BAD_REQUEST, error_body(str(exc)))
            return HTTPStatus.BAD_REQUEST
        for request_id, labels in reports:
            self.feedback.offer({feedback.LABEL: labels}, {}, request_id)
        rows = sum(len(labels) for _, labels in reports)
        await self.respond(send, HTTPStatus.OK, orjson.dumps({"recorded": len(reports), "rows": rows}))
        return HTTPStatus.OK

    def watch(self, body: _Body) -> None:
        """Have the sweep time ``body``'s waits, started on the running loop at first use."""
        loop = asyncio.get_running_loop()
        if self.sweeper is None or self.sweeper.get_loop() is not loop:
            self.sweeper = loop.create_task(self.sweep(), name="request-body-sweep")
        self.reading.add(body)

    async def sweep(self) -> None:
        """Every SWEEP_S, give up on each body that has sent nothing for ``idle_timeout_s``."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for body in list(self.reading):
                since = body.waiting_since
                if since is not None and now - since > self.idle_timeout_s and not body.timed_out:
                    body.timed_out = True
                    if body.task is not None:
                        body.task.cancel()

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> int:
        body_state = _Body(receive)
        self.watch(body_state)
        try:
            if not self.model.ready:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, f"Model {self.model.name} is not ready")
            headers = _headers(scope)
            encoding = _encoding(headers)
            self.reserve(headers, body_state)
            body = await self.read_body(body_state)
            body = await self.decompress(body, encoding, body_state)
            request, feeds = await self.decode(body, headers)
            del body  # held no longer than its arrays need it
            response_id = request.id or self.new_id()
            predicting = time.perf_counter()
            # The payload log records the id the response carries, so feedback can be joined to it.
            outputs = await self.model.infer(request, feeds, request_id=response_id)
            self.predict_time.observe(time.perf_counter() - predicting)
            encoded = (self.model.name, self.version, response_id, outputs)
            if sum(output.array.nbytes for output in outputs) >= OFF_LOOP_BYTES:
                payload, response_headers = await self.off_loop(encode_response, *encoded)
            else:
                payload, response_headers = encode_response(*encoded)
            await self.respond(send, HTTPStatus.OK, payload, response_headers)
            return HTTPStatus.OK
        except Refused as refused:
            await self.refuse(scope, body_state, send, refused)
            return refused.status
        except (WireError, InvalidInput) as exc:
            message = str(exc) if isinstance(exc, InvalidInput) else f"{exc}; expected {self.expected}"
            log.info("rejected request: %s", message)
            await self.respond(send, HTTPStatus.BAD_REQUEST, error_body(message))
            return HTTPStatus.BAD_REQUEST
        except InferenceError as exc:
            await self.respond(send, HTTPStatus.INTERNAL_SERVER_ERROR, error_body(str(exc)))
            return HTTPStatus.INTERNAL_SERVER_ERROR
        except Exception as exc:  # a bug here is still a V2 answer, counted as a 500
            log.exception("request failed for model %s", self.model.name)
            message = f"the server failed on this request: {type(exc).__name__}: {exc}"
            await self.respond(send, HTTPStatus.INTERNAL_SERVER_ERROR, error_body(message), close=True)
            return HTTPStatus.INTERNAL_SERVER_ERROR
        finally:
            self.inflight -= body_state.held
            self.reading.discard(body_state)

    # --- request bodies ----------------------------------------------------------------------

    def reserve(self, headers: dict[bytes, bytes], body: _Body) -> None:
        """Count a request's declared body against the body limit (413 past it) and the in-flight
        cap (503 past it); what is held is released when the request ends."""
        length = headers.get(b"content-length", b"")
        declared = int(length) if length.isdigit() and length.isascii() else 0
        if declared > self.max_request_bytes:
            raise Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {declared} bytes exceeds the server's limit of "
                f"{self.max_request_bytes} bytes",
            )
        self.hold(body, declared)

    def hold(self, body: _Body, more: int) -> None:
        """Hold ``more`` bytes for ``body``'s request, or 503 when other requests hold so many that
        the cap would be passed (a lone request may always use the whole body limit)."""
        others = self.inflight - body.held
        if others and others + body.held + more > self.max_inflight_bytes:
            raise Refused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server holds {others} bytes of other requests (limit {self.max_inflight_bytes}); "
                "retry shortly",
                [*JSON_HEADERS, (b"retry-after", b"1")],
            )
        body.held += more
        self.inflight += more

    async def read_body(self, body: _Body) -> bytes:
        """The whole body, counted against the limit and the cap as it arrives (a chunked body
        declares no length); a client that sends nothing for ``idle_timeout_s`` gets a 408."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await body.next(self.idle_timeout_s)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                raise Refused(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body of more than {self.max_request_bytes} bytes exceeds the server's "
                    f"limit of {self.max_request_bytes} bytes",
                )
            if size > body.held:  # a chunked body: held as it arrives
                self.hold(body, size - body.held)
            chunks.append(chunk)
            if body.complete:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def decompress(self, body: bytes, encoding: bytes, state: _Body) -> bytes:
        if encoding == b"identity":
            return body
        limit = self.max_request_bytes
        if len(body) >= OFF_LOOP_BYTES:
            decoded = await self.off_loop(_inflate, body, encoding, limit)
        else:
            decoded = _inflate(body, encoding, limit)
        if decoded is None:
            raise Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body decompresses to more than the server's limit of {limit} bytes",
            )
        self.hold(state, len(decoded))
        return decoded

    async def decode(self, body: bytes, headers: dict[bytes, bytes]) -> tuple[Request, dict[str, np.ndarray]]:
        """The request and its inputs as arrays, checked against the contract."""
        if len(body) >= OFF_LOOP_BYTES:
            return await self.off_loop(self._decode, body, headers)
        return self._decode(body, headers)

    async def off_loop(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.decoder, function, *args)

    def _decode(self, body: bytes, headers: dict[bytes, bytes]) -> tuple[Request, dict[str, np.ndarray]]:
        header_length = headers.get(b"inference-header-content-length")
        try:
            if header_length is not None:
                request = decode_binary(body, header_length.decode(errors="replace"))
            else:
                request = decode_json(body)
        except WireError as exc:
            content_type = headers.get(b"content-type", b"").decode(errors="replace")
            if header_length is None and content_type and "json" not in content_type:
                raise WireError(
                    f"the request body was sent as {content_type!r}, not JSON, and does not parse as "
                    f"JSON ({exc}); send it with 'Content-Type: application/json'"
                ) from None
            raise
        feeds = self.model.decode(request)
        if len(body) >= OFF_LOOP_BYTES:
            # The JSON values (a Python object each) are done with: free them before the model runs.
            request = request._replace(inputs=[])
        return request, feeds

    async def refuse(self, scope: Scope, body: _Body, send: Send, refused: Refused) -> None:
        """Answer ``refused``; then read and drop what is left of the body before the connection
        closes, so a client that sends its whole body before reading reads the answer. Not for a
        client that waits for ``100 Continue`` and has not had it: it sends nothing more."""
        if refused.status == 499:
            return  # nobody to answer
        log.info("rejected request: %s", refused.message)
        message = error_body(refused.message)
        if body.complete:
            await self.respond(send, refused.status, message, refused.headers or None)
            return
        if refused.status == HTTPStatus.REQUEST_TIMEOUT:  # the client stalled: nothing to wait for
            await self.respond(send, refused.status, message, close=True)
            return
        await self.respond(send, refused.status, message, refused.headers or None, close=True, more=True)
        expects_continue = b"100-continue" in _headers(scope).get(b"expect", b"").lower()
        if body.received or not expects_continue:
            await body.drain(max(DRAIN_BYTES, 4 * self.max_request_bytes), min(self.idle_timeout_s, DRAIN_S))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Body:
    """One request's body as it arrives, and the in-flight bytes held for the request."""

    __slots__ = ("complete", "held", "receive", "received", "task", "timed_out", "waiting_since")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.held = 0
        self.received = False  # receive() called (which answers a 100-continue)
        self.complete = False  # the last chunk arrived
        self.task = asyncio.current_task()
        self.waiting_since: float | None = None  # waiting for the client since (monotonic)
        self.timed_out = False  # the front door's sweep gave up waiting

    async def next(self, idle_timeout_s: float) -> Message:
        """The next chunk; a 408 when the client sent nothing for ``idle_timeout_s`` (the front
        door's sweep cancels the wait: cheaper than a timer per chunk)."""
        self.received = True
        self.waiting_since = time.monotonic()
        try:
            message = await self.receive()
        except asyncio.CancelledError:
            if not self.timed_out or self.task is None:
                raise
            self.task.uncancel()
            raise Refused(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the request body stopped arriving: nothing for {idle_timeout_s:g} s",
            ) from None
        finally:
            self.waiting_since = None
        if message["type"] != "http.request":
            self.complete = True  # nothing more will come
            raise Refused(499, "the client disconnected before its request body arrived")
        self.complete = not message.get("more_body", False)
        return message

    async def drain(self, limit: int, idle_timeout_s: float) -> None:
        """Read and drop the rest of the body: at most ``limit`` bytes, for at most DRAIN_S."""
        deadline = time.monotonic() + DRAIN_S
        dropped = 0
        while not self.complete and dropped <= limit and time.monotonic() < deadline:
            try:
                message = await self.next(idle_timeout_s)
            except Refused:
                return
            dropped += len(message.get("body", b""))


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by lower-case name (the first of repeated ones, as KServe reads them)."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        found.setdefault(name, value)
    return found


def _encoding(headers: dict[bytes, bytes]) -> bytes:
    """The body's Content-Encoding (``identity`` when none), or a 415 for one not decoded here."""
    encoding = headers.get(b"content-encoding", b"identity").strip().lower() or b"identity"
    if encoding not in (b"identity", b"gzip", b"x-gzip", b"deflate"):
        raise Refused(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {encoding.decode(errors='replace')!r} is not supported; send the "
            "body as is, or compressed with gzip or deflate",
        )
    return encoding


def _inflate(body: bytes, encoding: bytes, limit: int) -> bytes | None:
    """``body`` decompressed, or None when it decodes to more than ``limit`` bytes. Gzip may hold
    several members (RFC 1952); deflate is zlib-wrapped as HTTP says, or raw as some clients send
    it. Bytes after the compressed data are an error, not ignored."""
    name = encoding.decode()
    if encoding == b"deflate":
        wbits = 15 if body[:1] and body[0] & 0x0F == 8 and int.from_bytes(body[:2], "big") % 31 == 0 else -15
    else:
        wbits = 31
    parts: list[bytes] = []
    size = 0
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise WireError(f"the request body is not valid {name} data ({exc})") from None
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            return None
        if not inflater.eof:
            raise WireError(f"the request body ends inside its {name} stream")
        parts.append(part)
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
        if wbits != 31:
            raise WireError(f"the request body has {len(rest)} bytes after its {name} stream")
