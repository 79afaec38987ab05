"""HTTP-level guards for the model server: V2 error bodies for requests FastAPI rejects, a body size
limit, a check of binary tensor requests, and a readiness check that waits for the model.

Stock KServe answers a malformed body with FastAPI's 422 ``{"detail": [...]}`` and lets an
unexpected exception escape to Starlette's outermost handler, which resets the keep-alive
connection. Clients of the Open Inference Protocol expect ``{"error": "..."}`` and a 400.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput
from kserve.protocol.rest.v2_datamodels import RequestOutput
from pydantic import BaseModel, NonNegativeInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

# A child of KServe's logger, so its lines land in the server log in the same format.
log = logging.getLogger("kserve.handoff")


def _where(loc: Sequence[Any], names: list[str | None]) -> str:
    """``("body", "InferenceRequest", "inputs", 0, "data")`` -> ``input 'image' (inputs[0]): data``."""
    path = [part for part in loc if part not in ("body", "InferenceRequest")]
    if len(path) >= 2 and path[0] == "inputs" and isinstance(path[1], int):
        index = path[1]
        name = names[index] if index < len(names) else None
        rest = ".".join(str(part) for part in path[2:]) or "the input"
        label = f"input '{name}' (inputs[{index}])" if name else f"inputs[{index}]"
        return f"{label}: {rest}"
    return ".".join(str(part) for part in path) or "the request body"


def validation_message(exc: RequestValidationError, expected: str) -> str:
    """One readable sentence for what FastAPI found wrong with an inference request body."""
    errors = [e for e in exc.errors() if tuple(e.get("loc", ()))[1:2] != ("bytes",)] or list(exc.errors())
    if not errors:
        return f"invalid request; expected {expected}"
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return f"the request body is not valid JSON ({reason}); expected {expected}"
    body = exc.body if isinstance(exc.body, dict) else {}
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        inputs = []
    names = [i.get("name") if isinstance(i, dict) else None for i in inputs]
    return f"{_where(first.get('loc', ()), names)}: {first.get('msg', 'invalid')}; expected {expected}"


def install(app: FastAPI, expected: str, max_request_bytes: int, model_ready: Callable[[], bool]) -> None:
    """Register the V2 error handlers, the body size limit and the readiness gate on KServe's app."""

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = validation_message(exc, expected)
        log.info("rejected request: %s", message)
        return JSONResponse(status_code=HTTPStatus.BAD_REQUEST, content={"error": message})

    async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
        # KServe's own handler logs a full traceback for every client mistake; one line will do.
        message = str(exc)
        content_type = request.headers.get("content-type", "")
        if "inference-header-content-length" in message and "json" not in content_type:
            # KServe reads a body not labelled JSON as the binary extension and says so cryptically.
            message = (
                f"the request body was sent as {content_type or 'no content type'!r}, not JSON; "
                f"send it with 'Content-Type: application/json': {expected}"
            )
        log.info("rejected request: %s", message)
        return JSONResponse(status_code=HTTPStatus.BAD_REQUEST, content={"error": message})

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        # FastAPI's own refusals (a body that is not UTF-8, an unknown route, a wrong method)
        # say {"detail": ...}; V2 clients read "error".
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code == HTTPStatus.BAD_REQUEST:
            message = f"{message}; expected {expected}"
        return JSONResponse(status_code=exc.status_code, content={"error": message}, headers=exc.headers)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(InvalidInput, invalid_input)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(BinaryRequests, expected=expected)  # inside BodyLimit: bodies are bounded
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(ReadyGate, model_ready=model_ready)


async def _send_json(send: Send, status: int, content: dict[str, Any], close: bool = False) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CloseWhen:
    """Ask the client to close the connection after this response while ``condition()`` holds
    (a retiring server: the client's next request opens a connection to the new version)."""

    def __init__(self, app: Asgi, condition: Callable[[], bool]) -> None:
        self.app = app
        self.condition = condition

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.condition():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)


class ReadyGate:
    """``/v2/health/ready`` answers 503 until the model is loaded (stock KServe says ready at once)."""

    def __init__(self, app: Asgi, model_ready: Callable[[], bool]) -> None:
        self.app = app
        self.model_ready = model_ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v2/health/ready" and not self.model_ready():
            await _send_json(send, HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the model is not loaded yet"})
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Answer 413 to a body over ``max_bytes``: from Content-Length before reading any of it, or
    while reading a chunked body (which is buffered up to the limit, then replayed)."""

    def __init__(self, app: Asgi, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send, size: str) -> None:
        message = f"request body of {size} exceeds the server's limit of {self.max_bytes} bytes"
        log.info("rejected request: %s", message)
        # The unread body is still on the wire, so this connection cannot carry another request.
        await _send_json(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": message}, close=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self._too_large(send, f"{int(length)} bytes")
                return
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        total = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._too_large(send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


# Bytes per element of the V2 datatypes that travel as raw little-endian arrays.
BINARY_ITEM_SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
}
HEADER_LENGTH = b"inference-header-content-length"


class _BinaryInput(BaseModel):
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class _BinaryHeader(BaseModel):
    """The JSON part of a binary-extension request: what KServe's decoder reads without checking."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[_BinaryInput]
    outputs: list[RequestOutput] | None = None


def binary_request_error(body: bytes, header_length: bytes) -> str | None:
    """What is wrong with a V2 binary tensor extension request, or None when KServe can decode it.

    KServe slices the raw bytes after the JSON header by each input's ``binary_data_size`` and
    reshapes them unchecked, so a wrong size or shape would be a 500; here it is a 400 that says
    which input and how many bytes its shape and datatype need.
    """
    if not header_length.isdigit() or int(header_length) > len(body):
        return (
            f"Inference-Header-Content-Length must be the byte length of the JSON header at the "
            f"start of the body ({len(body)} bytes), got {header_length.decode(errors='replace')!r}"
        )
    split = int(header_length)
    try:
        header = _BinaryHeader.model_validate_json(body[:split])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the JSON header"
        return f"binary request: {where}: {first['msg']}"
    raw_bytes = len(body) - split
    declared = 0
    for tensor in header.inputs:
        where = f"input '{tensor.name}'"
        size = (tensor.parameters or {}).get("binary_data_size")
        if tensor.data is not None:
            continue
        if size is None:
            return f"{where}: needs 'data' or parameters.binary_data_size"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"{where}: parameters.binary_data_size must be a byte count, got {size!r}"
        if tensor.datatype == "BYTES":
            # Length-prefixed elements: their count is checked against the shape once decoded
            # (``OnnxModel``); here only that the sizes add up.
            declared += size
            continue
        item = BINARY_ITEM_SIZES.get(tensor.datatype)
        if item is None:
            return f"{where}: datatype {tensor.datatype!r} cannot be sent as binary data here"
        needed = math.prod(tensor.shape) * item
        if size != needed:
            return (
                f"{where}: binary_data_size is {size} bytes, but shape {tensor.shape} of "
                f"{tensor.datatype} needs {needed}"
            )
        declared += size
    if declared != raw_bytes:
        return (
            f"the inputs' binary_data_size add up to {declared} bytes, but {raw_bytes} follow the JSON header"
        )
    return None


class BinaryRequests:
    """Answer 400 to a binary tensor extension request KServe would fail to decode (see
    ``binary_request_error``); pass every other request through untouched."""

    def __init__(self, app: Asgi, expected: str) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The first of repeated headers, as KServe reads it (``dict(request.headers)``).
        headers = scope.get("headers", ()) if scope["type"] == "http" else ()
        length = next((value for name, value in headers if name == HEADER_LENGTH), None)
        if length is None:
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        problem = binary_request_error(b"".join(chunks), length.strip())
        if problem is not None:
            log.info("rejected request: %s", problem)
            await _send_json(send, HTTPStatus.BAD_REQUEST, {"error": f"{problem}; expected {self.expected}"})
            return

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)
