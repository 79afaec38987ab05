"""Prometheus metrics of the model server, served with KServe's own at ``GET /metrics``.

KServe's ``request_predict_seconds`` times the model's run; these add what an on-call engineer
alerts on: inference requests by status code, their latency as clients see it (every request,
rejected ones included; the front door records both), the batch sizes the dynamic batcher
forms, and the payload log's rows written and dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

REQUESTS = Counter(
    "handoff_inference_requests",  # exposed as handoff_inference_requests_total
    "Inference requests answered, by model and HTTP status code",
    ["model", "code"],
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_latency: Histogram | None = None
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


def payload_log_metrics(registry: CollectorRegistry = REGISTRY) -> tuple[Counter, Counter]:
    """The payload log's rows written and dropped, by model: the model server's (the default
    registry) and the cluster's payload collector's (a registry of its own) are the same series."""
    return (
        Counter(
            "handoff_payload_log_rows",  # exposed as handoff_payload_log_rows_total
            "Rows the payload log wrote to its store",
            ["model"],
            registry=registry,
        ),
        Counter(
            "handoff_payload_log_dropped",
            "Sampled rows the payload log dropped (its queue was full, or its store could not be written)",
            ["model"],
            registry=registry,
        ),
    )


PAYLOAD_ROWS, PAYLOAD_DROPPED = payload_log_metrics()


def latency_histogram(slo_s: float | None = None) -> Histogram:
    """The request latency histogram, made on the first call in the process (a server serves one
    model): its buckets are LATENCY_BUCKETS and the contract's ``slo.latency_p99_ms`` (``slo_s``,
    in seconds), so an alert rule reads the share of requests slower than the SLO exactly, from
    the ``le`` bucket of that bound."""
    global _latency
    if _latency is None:
        bounds = sorted({*LATENCY_BUCKETS, *([slo_s] if slo_s else [])})
        _latency = Histogram(
            "handoff_inference_request_duration_seconds",
            "Inference request latency, from the request's arrival to the end of its response",
            ["model"],
            buckets=bounds,
        )
    return _latency


def payload_counters(model: str) -> tuple[Callable[[float], None], Callable[[float], None]]:
    """``(written, dropped)``: count the payload log's rows of ``model``."""
    return PAYLOAD_ROWS.labels(model).inc, PAYLOAD_DROPPED.labels(model).inc


def batch_recorder(model: str) -> Callable[[int, int], None]:
    """``record(rows, requests)`` for each model run of ``model``."""
    sizes, requests_per_run = BATCH_SIZE.labels(model), BATCH_REQUESTS.labels(model)

    def record(rows: int, requests: int) -> None:
        sizes.observe(rows)
        requests_per_run.observe(requests)

    return record


class RequestCounter:
    """``count(status)`` for inference requests to ``model``, one child per status code seen."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.children: dict[int, Any] = {}

    def __call__(self, status: int) -> None:
        child = self.children.get(status)
        if child is None:
            child = self.children[status] = REQUESTS.labels(self.model, str(status))
        child.inc()
