"""HTTP-level guards for what KServe's own app still answers (everything the front door,
``front.py``, does not route): V2 error bodies for requests FastAPI rejects, one log line (no
traceback) for each client error, and a body size limit.

Stock KServe answers a malformed body with FastAPI's 422 ``{"detail": [...]}`` and lets an
unexpected exception escape to Starlette's outermost handler, which resets the keep-alive
connection. Clients of the Open Inference Protocol expect ``{"error": "..."}`` and a 400.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput, ModelNotFound
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def install(app: FastAPI, expected: str, max_request_bytes: int) -> None:
    """Register the V2 error handlers and the body size limit on KServe's app."""

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = validation_message(exc, expected)
        log.info("rejected request: %s", message)
        return JSONResponse(status_code=HTTPStatus.BAD_REQUEST, content={"error": message})

    async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
        # KServe's own handler logs a full traceback for every client mistake; one line will do.
        message = str(exc)
        log.info("rejected request: %s", message)
        return JSONResponse(status_code=HTTPStatus.BAD_REQUEST, content={"error": message})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        log.info("rejected request: %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=HTTPStatus.NOT_FOUND, content={"error": str(exc)})

    async def not_implemented(request: Request, exc: Exception) -> JSONResponse:
        message = f"{request.method} {request.url.path} is not implemented by this server ({exc})"
        log.info("rejected request: %s", message)
        return JSONResponse(status_code=HTTPStatus.NOT_IMPLEMENTED, content={"error": message})

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
    app.add_exception_handler(ModelNotFound, not_found)
    app.add_exception_handler(NotImplementedError, not_implemented)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)


async def _send_json(send: Send, status: int, content: dict[str, Any], close: bool = False) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
