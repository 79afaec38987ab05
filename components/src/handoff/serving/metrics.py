"""Prometheus metrics of the model server, served with KServe's own at ``GET /metrics``.

KServe's histograms time the model's pre/predict/post steps; these add what an on-call engineer
alerts on: inference requests by status code, their latency as clients see it (every request,
rejected ones included), and the batch sizes the dynamic batcher forms.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUESTS = Counter(
    "handoff_inference_requests",  # exposed as handoff_inference_requests_total
    "Inference requests answered, by model and HTTP status code",
    ["model", "code"],
)
LATENCY = Histogram(
    "handoff_inference_request_duration_seconds",
    "Inference request latency, from the request's arrival to the end of its response",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BATCH_SIZE = Histogram(
    "handoff_batch_size",
    "Rows in each model run (dynamic batching puts several requests in one run)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
BATCH_REQUESTS = Histogram(
    "handoff_batch_requests",
    "Requests in each model run",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)

_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


def record_batch(model: str, rows: int, requests: int) -> None:
    BATCH_SIZE.labels(model).observe(rows)
    BATCH_REQUESTS.labels(model).observe(requests)


class RequestMetrics:
    """ASGI middleware counting and timing every inference request, whatever answered it.

    The model label is the served model's name, or ``other`` for any other name in the path, so
    requests for made-up models cannot grow the label set without bound.
    """

    def __init__(self, app: Asgi, model_name: str) -> None:
        self.app = app
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _INFER_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        model = self.model_name if match.group(1) == self.model_name else "other"
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            REQUESTS.labels(model, str(status)).inc()
            LATENCY.labels(model).observe(time.perf_counter() - started)
