"""The payload collector: where KServe's logger sends an InferenceService's traffic on a cluster.

On a cluster the model server keeps no payload log of its own. The InferenceService asks KServe
for its logger instead (``spec.predictor.logger``, :mod:`handoff.kube.isvc_manifest`): KServe's
agent, a sidecar in front of the model server, sends every request and every 200 response to this
collector, which pairs them and writes the same Parquet payload log a local server writes
(:class:`handoff.payload_log.PayloadLog`), for ``handoff monitor`` to read.

What the agent sends (kserve ``pkg/logger/handler.go`` and ``worker.go``, with cloudevents
sdk-go's HTTP binding, ``v2/protocol/http/write_request.go``): one HTTP POST per request and one
per response, each a CloudEvent in binary content mode, so the body is the inference body as the
model server received or answered it (V2 JSON here, or the V2 binary tensor extension) and the
event's attributes are headers:

    Ce-Id                    the request's ``Ce-Id`` header, else a uuid the agent made: the same
                             for a request and its response, which is how they pair
    Ce-Type                  org.kubeflow.serving.inference.request / .response
    Ce-Source                the predictor pod's name
    Ce-Specversion, Ce-Time  1.0, and when the request arrived / the response was answered
    Ce-Inferenceservicename, Ce-Namespace, Ce-Component (predictor), Ce-Endpoint (default/canary)
    Ce-Annotations           JSON of the InferenceService annotations ``logger.metadataAnnotations``
                             names: handoff lists its ``handoff.dev/model-version``, so each row
                             carries the version the pod serves, on Triton too (whose responses
                             say ``model_version: "1"``)
    Content-Type             the *request's* content type, on the response event too

The agent logs a response only when the model server answered 200, queues events in memory and
sends each once: an answer other than 200 is logged by the agent, never retried. So the collector
answers 200 as soon as an event is decoded and queued (the writing happens on PayloadLog's thread),
and 400 only for a body that is not a V2 request or response, which nothing would fix by sending
it again. The two events of a pair travel separately and may arrive in either order: the first
waits (``pending_ttl_s``, at most ``max_pending`` events and ``max_pending_bytes``), and one whose
partner never comes is dropped and counted.

Two modes, one code path:

* for one project (``serve_collector``, the ``handoff collect`` command): the project's
  ``monitoring`` settings (``store`` must be set), its contract's model only, and each tensor
  checked against the contract's request inputs and response outputs;
* for a namespace (``python -m handoff.payload_collector --store URI``, the Deployment in
  ``manifests/monitoring/collector.yaml``): every model the namespace serves, each into
  ``<store>/<model name>``, which is what a project sets as its ``monitoring.store``.

``GET /healthz`` answers while the server runs; ``GET /metrics`` is Prometheus text: events
received, pairs logged, events dropped by reason, events waiting, and the payload log's rows
written and dropped (``handoff_payload_log_rows_total``, as the model server names them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from handoff import feedback
from handoff.contract import Contract, TensorSpec, load_contract
from handoff.errors import HandoffError
from handoff.payload_log import MIB, PayloadLog
from handoff.serving.metrics import payload_log_metrics
from handoff.serving.v2_wire import (
    NUMPY_OF_DATATYPE,
    Request,
    Tensor,
    WireError,
    bytes_elements,
    decode_binary,
    decode_json,
    flat_values,
    object_array,
    parse_json,
)
from handoff.settings import SETTINGS_FILE, load_settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# CloudEvent types of KServe's logger (pkg/logger/worker.go: CEInferenceRequest/Response).
REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
# The InferenceService annotation that names the registered version (isvc_manifest.VERSION_KEY),
# which the InferenceService's logger.metadataAnnotations forwards in Ce-Annotations.
VERSION_ANNOTATION = "handoff.dev/model-version"
DEFAULT_PORT = 8080
# A pair's first event waits this long for the other; the agent sends both within the request's
# own time, so this only has to cover a slow model and the agent's queue.
PENDING_TTL_S = 60.0
MAX_PENDING = 10_000
MAX_PENDING_BYTES = 256 * MIB
# The largest event body read: a request the model server accepted (serving.max_request_mib,
# 16 MiB by default) or its response; past it the event is refused unread.
MAX_BODY_BYTES = 64 * MIB
# Payload logs kept open at once, one per (model, version): a rollout adds one, and the oldest
# (the version that stopped serving) is closed, which writes what it still holds.
MAX_OPEN_LOGS = 8
# A model's name as a path segment of the store (the contract's name is a DNS-1123 label).
MODEL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class EventError(ValueError):
    """An event the collector cannot log (answered 400 with this sentence)."""


@dataclass
class Decoded:
    """One event, decoded: ``arrays`` by tensor name (batch axis first)."""

    id: str
    kind: str  # "request" or "response"
    arrays: dict[str, np.ndarray]
    v2_id: str | None  # the body's "id"
    model: str | None  # a response's model_name, else the InferenceService's name
    version: str | None  # Ce-Annotations' version, else a response's model_version
    size: int  # the body's bytes: what waiting for the partner holds
    arrived: float = field(default_factory=time.monotonic)


# --- decoding ------------------------------------------------------------------------------------


def _binary_header_end(body: bytes) -> int | None:
    """Where the JSON header of a V2 binary-extension body ends, or None when the body is not one.

    The agent forwards the body without the ``Inference-Header-Content-Length`` header, so the
    header's end is found by parsing: a JSON object followed by bytes. Latin-1 maps each byte to one
    character, so the parser's end offset is a byte offset."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
    except ValueError:
        return None
    return end if end < len(body) else None


def _array(tensor: Tensor, where: str) -> np.ndarray:
    """One tensor as numpy, in its own shape and its V2 datatype's numpy type (BYTES: bytes objects)."""
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        if tensor.raw is not None:
            items = bytes_elements(tensor.raw, count, where)
        else:
            flat = flat_values(tensor.data)
            if not all(isinstance(v, str) for v in flat):
                raise WireError(f"{where}: data must be strings for datatype BYTES")
            items = [v.encode("utf-8") for v in flat]
        if len(items) != count:
            raise WireError(f"{where}: shape {tensor.shape} needs {count} values, data has {len(items)}")
        return object_array(items, tensor.shape)
    dtype = NUMPY_OF_DATATYPE[tensor.datatype]
    try:
        if tensor.raw is not None:  # sizes were checked against the shape when it was split off
            array = np.frombuffer(tensor.raw, dtype=dtype)
        else:
            array = np.asarray(tensor.data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"{where}: data is not {tensor.datatype} values ({exc})") from None
    if array.size != count:
        raise WireError(f"{where}: shape {tensor.shape} needs {count} values, data has {array.size}")
    return array.reshape(tensor.shape)


def _arrays(tensors: list[Tensor], what: str) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        where = f"{what} '{tensor.name}'"
        if tensor.name in arrays:
            raise WireError(f"{where} appears twice")
        if not tensor.shape:
            raise WireError(f"{where}: shape {tensor.shape} has no batch axis")
        arrays[tensor.name] = _array(tensor, where)
    return arrays


def decode_request(body: bytes) -> Request:
    """A V2 inference request body: JSON, or the binary tensor extension."""
    try:
        return decode_json(body)
    except WireError:
        end = _binary_header_end(body)
        if end is None:
            raise
        return decode_binary(body, str(end))


def decode_response(body: bytes) -> tuple[dict[str, Any], list[Tensor]]:
    """A V2 inference response body: its JSON document (or binary-extension header) and outputs."""
    end: int | None = None
    try:
        document = parse_json(body)
    except WireError:
        end = _binary_header_end(body)
        if end is None:
            raise
        document = parse_json(body[:end])
    if not isinstance(document, dict) or not isinstance(document.get("outputs"), list):
        raise WireError("a V2 response is a JSON object with an 'outputs' list")
    offset = end or 0
    tensors = []
    for index, entry in enumerate(document["outputs"]):
        if not isinstance(entry, dict):
            raise WireError(f"outputs[{index}]: must be a JSON object")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
        where = f"output '{name}' (outputs[{index}])"
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise WireError(f"outputs[{index}]: name and datatype must be strings")
        if datatype not in NUMPY_OF_DATATYPE and datatype != "BYTES":
            raise WireError(f"{where}: unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WireError(f"{where}: shape must be a list of sizes, got {json.dumps(shape)}")
        if isinstance(entry.get("data"), list):
            tensors.append(Tensor(name, datatype, shape, entry["data"]))
            continue
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if end is None or type(size) is not int or size < 0:
            raise WireError(f"{where}: needs 'data' or parameters.binary_data_size")
        if offset + size > len(body):
            raise WireError(f"{where}: binary_data_size {size} runs past the end of the body")
        item = NUMPY_OF_DATATYPE.get(datatype)
        if item is not None and size != math.prod(shape) * item.itemsize:
            raise WireError(f"{where}: binary_data_size is {size} bytes, shape {shape} needs more or less")
        tensors.append(Tensor(name, datatype, shape, raw=memoryview(body)[offset : offset + size]))
        offset += size
    return document, tensors


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value else None


def _annotations(headers: Mapping[str, str]) -> dict[str, str]:
    """Ce-Annotations as a dict: JSON, percent-encoded by CloudEvents HTTP bindings that encode
    header values (the HTTP binding spec 1.0.2), plain by those that do not (sdk-go's)."""
    raw = headers.get("ce-annotations")
    if not raw:
        return {}
    for text in (raw, unquote(raw)):
        with contextlib.suppress(ValueError):
            value = json.loads(text)
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    raise EventError(f"Ce-Annotations must be a JSON object, got {raw[:200]!r}")


def decode_event(headers: Mapping[str, str], body: bytes) -> Decoded:
    """One CloudEvent of KServe's logger (``headers`` lower-cased), or EventError saying why not."""
    event_id = _header(headers, "ce-id")
    event_type = _header(headers, "ce-type")
    if event_id is None or event_type is None:
        raise EventError(
            "not a CloudEvent in binary mode: Ce-Id and Ce-Type headers are required (KServe's "
            "logger sends them; structured-mode events are not supported)"
        )
    annotations = _annotations(headers)
    version = annotations.get(VERSION_ANNOTATION)
    isvc = _header(headers, "ce-inferenceservicename")
    try:
        if event_type == REQUEST_TYPE:
            request = decode_request(body)
            arrays = _arrays(request.inputs, "input")
            return Decoded(event_id, "request", arrays, request.id, isvc, version, len(body))
        if event_type == RESPONSE_TYPE:
            document, outputs = decode_response(body)
            arrays = _arrays(outputs, "output")
            v2_id = document.get("id") if isinstance(document.get("id"), str) else None
            model = document.get("model_name")
            version = version or (
                str(document["model_version"]) if document.get("model_version") is not None else None
            )
            return Decoded(
                event_id,
                "response",
                arrays,
                v2_id,
                model if isinstance(model, str) else isvc,
                version,
                len(body),
            )
    except WireError as exc:
        kind = "request" if event_type == REQUEST_TYPE else "response"
        raise EventError(f"event {event_id}: the {kind} body is not a V2 {kind}: {exc}") from None
    raise EventError(
        f"event {event_id}: unknown Ce-Type {event_type!r}; expected {REQUEST_TYPE} or {RESPONSE_TYPE}"
    )


# --- pairing -------------------------------------------------------------------------------------


class Pending:
    """Events waiting for their partner, oldest first, bounded by age, count and bytes."""

    def __init__(self, ttl_s: float, max_events: int, max_bytes: int) -> None:
        self.ttl_s, self.max_events, self.max_bytes = ttl_s, max_events, max_bytes
        self.events: OrderedDict[str, Decoded] = OrderedDict()
        self.bytes = 0

    def pair(self, event: Decoded) -> tuple[tuple[Decoded, Decoded] | None, list[tuple[Decoded, str]]]:
        """(request, response) when ``event`` completes a pair, and the events dropped to make room
        (each with its reason)."""
        partner = self.events.get(event.id)
        if partner is not None and partner.kind != event.kind:
            self._remove(event.id)
            request, response = (partner, event) if event.kind == "response" else (event, partner)
            return (request, response), []
        dropped: list[tuple[Decoded, str]] = []
        if partner is not None:  # the same event twice (a client's Ce-Id reused): keep the newer
            self._remove(event.id)
            dropped.append((partner, "duplicate"))
        self.events[event.id] = event
        self.bytes += event.size
        while len(self.events) > self.max_events or self.bytes > self.max_bytes:
            oldest = next(iter(self.events))
            dropped.append((self._remove(oldest), "overflow"))
        return None, dropped

    def expire(self, now: float) -> list[Decoded]:
        expired = []
        while self.events:
            oldest = next(iter(self.events.values()))
            if now - oldest.arrived < self.ttl_s:
                break
            expired.append(self._remove(oldest.id))
        return expired

    def _remove(self, event_id: str) -> Decoded:
        event = self.events.pop(event_id)
        self.bytes -= event.size
        return event


# --- where pairs go ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the collector writes, and what it accepts.

    ``store`` is one model's store (``model`` set: a project's collector) or the root of one per
    model (``model`` None: ``<store>/<model name>``). ``inputs``/``outputs``: the contract's request
    inputs and response outputs, which a project's collector holds every pair to."""

    store: str
    sample_rate: float
    max_bytes: int
    model: str | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    contract: Contract | None = None  # a project's: what feedback labels are checked against

    @classmethod
    def of_project(cls, project_dir: Path) -> Target:
        """A project's collector: handoff.yaml's ``monitoring`` (its ``store`` required)."""
        settings = load_settings(project_dir)
        monitoring = settings.monitoring
        if monitoring.store is None:
            raise HandoffError(
                "the payload collector writes the store `handoff monitor` reads, and none is set: "
                "expected an object-store URI the cluster can write (s3://bucket/payloads/<model>), "
                "found null",
                file=SETTINGS_FILE,
                field="monitoring.store",
            )
        contract = load_contract(project_dir)
        return cls(
            store=monitoring.store,
            sample_rate=monitoring.sample_rate,
            max_bytes=int(monitoring.max_mib * MIB),
            model=contract.name,
            inputs=tuple(contract.request_inputs),
            outputs=tuple(contract.response_outputs),
            contract=contract,
        )

    def store_of(self, model: str) -> str:
        if self.model is not None:
            if model != self.model:
                raise EventError(
                    f"this collector logs model '{self.model}' (contract.yaml), not '{model}'; "
                    "point that InferenceService's logger at its own project's collector"
                )
            return self.store
        if not MODEL_NAME.match(model):
            raise EventError(f"model name {model!r} is not a DNS-1123 label, so not a store folder name")
        return f"{self.store.rstrip('/')}/{model}"

    def check(
        self, arrays: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], what: str
    ) -> dict[str, np.ndarray]:
        """``arrays`` as the contract types them; EventError naming a tensor the contract lacks or
        types otherwise (the model server checked the request, so this is a contract that moved)."""
        if self.model is None:
            return arrays
        expected = {spec.name: spec for spec in specs}
        if arrays.keys() - expected.keys():
            unknown = sorted(arrays.keys() - expected.keys())
            raise EventError(f"{what}(s) {unknown} are not in contract.yaml; expected {sorted(expected)}")
        typed = {}
        for name, array in arrays.items():
            spec = expected[name]
            if array.dtype != spec.numpy_dtype and not (
                array.dtype == object and spec.v2_datatype == "BYTES"
            ):
                raise EventError(f"{what} '{name}' is {array.dtype}, contract.yaml says {spec.dtype}")
            typed[name] = array
        return typed


# --- the ASGI app --------------------------------------------------------------------------------


class PayloadCollector:
    """The ASGI app: ``POST /`` (KServe's logger events), ``POST /v2/models/<model>/feedback`` (ground
    truth, ``handoff.feedback``), ``GET /healthz``, ``GET /metrics``."""

    def __init__(
        self,
        target: Target,
        *,
        pending_ttl_s: float = PENDING_TTL_S,
        max_pending: int = MAX_PENDING,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        flush_s: float = 2.0,
    ) -> None:
        self.target = target
        self.pending = Pending(pending_ttl_s, max_pending, max_pending_bytes)
        self.flush_s = flush_s
        self.logs: OrderedDict[tuple[str, str], PayloadLog] = OrderedDict()
        self.feedback_logs: dict[str, PayloadLog] = {}
        # Evicted logs still writing what they held: close() waits for them.
        self._closing: list[threading.Thread] = []
        # A registry of its own: several collectors (tests) in one process do not collide.
        self.registry = CollectorRegistry()
        self.received = Counter(
            "handoff_collector_events", "Logger events received, by type", ["type"], registry=self.registry
        )
        self.paired = Counter(
            "handoff_collector_pairs",
            "Request/response pairs offered to the payload log, by model",
            ["model"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "handoff_collector_dropped",
            "Events not logged, by reason (malformed, expired, overflow, duplicate, mismatch, too_large)",
            ["reason"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "handoff_collector_pending_events", "Events waiting for their partner", registry=self.registry
        )
        self.rows, self.rows_dropped = payload_log_metrics(self.registry)  # the model server's series
        for reason in ("malformed", "expired", "overflow", "duplicate", "mismatch", "too_large"):
            self.dropped.labels(reason)  # every reason shows, at 0, from the start
        self._sweeper: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self.sweep()
        method, path = scope["method"], scope["path"]
        if path == "/healthz" and method in ("GET", "HEAD"):
            await _answer(send, 200, b"ok\n", b"text/plain")
        elif path == "/metrics" and method == "GET":
            await _answer(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())
        elif path == "/" and method == "POST":
            status, message = await self._event(scope, receive)
            await _answer(send, status, json.dumps({"error": message}).encode() if message else b"")
        elif (model := _feedback_model(path)) is not None and method == "POST":
            status, answer = await self._feedback(model, receive)
            await _answer(send, status, json.dumps(answer).encode())
        elif path in ("/", "/healthz", "/metrics"):
            await _answer(send, 405, b'{"error": "method not allowed"}')
        else:
            where = "not found: KServe's logger posts to /, feedback goes to /v2/models/<model>/feedback"
            await _answer(send, 404, json.dumps({"error": where}).encode())

    async def _event(self, scope: Scope, receive: Receive) -> tuple[int, str | None]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = await _read_body(receive, MAX_BODY_BYTES)
        if body is None:
            self.dropped.labels("too_large").inc()
            return 413, f"event bodies are limited to {MAX_BODY_BYTES // MIB} MiB"
        self.received.labels(headers.get("ce-type", "none")).inc()
        try:
            if len(body) > 1 << 20:  # a large body is decoded off the event loop
                event = await asyncio.to_thread(decode_event, headers, body)
            else:
                event = decode_event(headers, body)
        except EventError as exc:
            self.dropped.labels("malformed").inc()
            log.warning("payload collector: %s", exc)
            return 400, str(exc)
        pair, dropped = self.pending.pair(event)
        for lost, reason in dropped:
            self.dropped.labels(reason).inc()
            log.warning("payload collector: event %s (%s) dropped: %s", lost.id, lost.kind, reason)
        self.waiting.set(len(self.pending.events))
        if pair is None:
            return 200, None
        try:
            self._log(*pair)
        except EventError as exc:
            self.dropped.labels("mismatch").inc(2)
            log.warning("payload collector: event %s: %s", event.id, exc)
            return 400, f"event {event.id}: {exc}"
        return 200, None

    async def _feedback(self, model: str, receive: Receive) -> tuple[int, dict[str, Any]]:
        """Ground truth for logged requests (``handoff.feedback``): on a cluster product code posts
        it here, beside the payload log it is joined with."""
        body = await _read_body(receive, MAX_BODY_BYTES)
        if body is None:
            return 413, {"error": f"feedback bodies are limited to {MAX_BODY_BYTES // MIB} MiB"}
        try:
            store = self.target.store_of(model)
            reports = feedback.parse(body, self.target.contract)
        except (EventError, feedback.BadFeedback) as exc:
            return 400, {"error": str(exc)}
        writer = self.feedback_logs.get(model)
        if writer is None:
            writer = feedback.feedback_log(store, model=model, version="", max_bytes=self.target.max_bytes)
            self.feedback_logs[model] = writer
        for request_id, labels in reports:
            writer.offer({feedback.LABEL: labels}, {}, request_id)
        return 200, {"recorded": len(reports), "rows": sum(len(labels) for _, labels in reports)}

    def _log(self, request: Decoded, response: Decoded) -> None:
        model = response.model or request.model
        if model is None:
            raise EventError("neither the response's model_name nor Ce-Inferenceservicename names the model")
        version = request.version or response.version or "unknown"
        inputs = self.target.check(request.arrays, self.target.inputs, "input")
        outputs = self.target.check(response.arrays, self.target.outputs, "output")
        rows = {len(a) for a in (*inputs.values(), *outputs.values())}
        if len(rows) > 1 or not inputs:
            raise EventError(
                "the request's inputs and the response's outputs must share one batch size, got "
                f"{ {n: a.shape[0] for n, a in {**inputs, **outputs}.items()} }"
            )
        payload_log = self._log_of(model, version)
        payload_log.offer(inputs, outputs, request.v2_id or response.v2_id or request.id)
        self.paired.labels(model).inc()

    def _log_of(self, model: str, version: str) -> PayloadLog:
        key = (model, version)
        found = self.logs.get(key)
        if found is not None:
            self.logs.move_to_end(key)
            return found
        store = self.target.store_of(model)
        rows, rows_dropped = self.rows.labels(model), self.rows_dropped.labels(model)
        created = PayloadLog(
            store,
            model=model,
            version=version,
            sample_rate=self.target.sample_rate,
            max_bytes=self.target.max_bytes,
            flush_s=self.flush_s,
            on_written=rows.inc,
            on_dropped=rows_dropped.inc,
        )
        self.logs[key] = created
        while len(self.logs) > MAX_OPEN_LOGS:
            _, oldest = self.logs.popitem(last=False)
            # close() writes what it holds: on a thread, so no event waits on the store; the
            # collector's own close() joins it, so a shutdown right after a rollout loses nothing.
            closing = threading.Thread(target=oldest.close, name="payload-log-close", daemon=True)
            closing.start()
            self._closing = [thread for thread in self._closing if thread.is_alive()] + [closing]
        return created

    def sweep(self) -> None:
        """Drop (and count) the events whose partner did not come in time."""
        for lost in self.pending.expire(time.monotonic()):
            self.dropped.labels("expired").inc()
            log.info("payload collector: event %s (%s) expired without its partner", lost.id, lost.kind)
        self.waiting.set(len(self.pending.events))

    def close(self) -> None:
        """Write what every payload log holds, evicted ones included (the pending half-pairs are
        lost, and counted)."""
        for _ in self.pending.expire(math.inf):
            self.dropped.labels("expired").inc()
        for payload_log in [*self.logs.values(), *self.feedback_logs.values()]:
            payload_log.close()
        self.logs.clear()
        self.feedback_logs.clear()
        for thread in self._closing:
            thread.join()
        self._closing.clear()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.pending.ttl_s / 4))
            self.sweep()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._sweeper = asyncio.create_task(self._sweep_forever())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._sweeper is not None:
                    self._sweeper.cancel()
                await asyncio.to_thread(self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _feedback_model(path: str) -> str | None:
    """The model of a feedback path, ``/v2/models/<model>/feedback`` (the model server's route)."""
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "feedback":
        return parts[2]
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None past ``limit`` bytes (the rest is read and dropped)."""
    parts: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
        more = message.get("more_body", False)
    return b"".join(parts) if size <= limit else None


async def _answer(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- serving -------------------------------------------------------------------------------------


def serve(app: PayloadCollector, host: str, port: int) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; on the way out every payload log writes what it holds."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, lifespan="on", access_log=False, log_level="warning")
    log.info("payload collector on %s:%d writing %s", host, port, app.target.store)
    uvicorn.Server(config).run()


def serve_collector(
    project_dir: Path,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    *,
    pending_ttl_s: float = PENDING_TTL_S,
) -> None:
    """Collect the project's InferenceService payloads into handoff.yaml's ``monitoring.store``
    (HandoffError when it is not set), until SIGTERM."""
    serve(PayloadCollector(Target.of_project(project_dir), pending_ttl_s=pending_ttl_s), host, port)


def main(argv: list[str] | None = None) -> None:
    """``python -m handoff.payload_collector``: a project's collector (``--project``) or a
    namespace's (``--store``, one store per model under it)."""
    parser = argparse.ArgumentParser(prog="python -m handoff.payload_collector", description=main.__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--project", type=Path, help="a project folder: its handoff.yaml monitoring settings")
    which.add_argument("--store", help="the root store of a namespace's collector: <store>/<model name>")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="with --store: share of pairs kept")
    parser.add_argument("--max-mib", type=float, default=256, help="with --store: each model's store size")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--pending-ttl-s", type=float, default=PENDING_TTL_S)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.project is not None:
        try:
            serve_collector(args.project, args.host, args.port, pending_ttl_s=args.pending_ttl_s)
        except HandoffError as exc:
            raise SystemExit(f"error: {exc}") from None
        return
    if not 0 <= args.sample_rate <= 1 or args.max_mib <= 0:
        parser.error("--sample-rate must be within [0, 1] and --max-mib above 0")
    target = Target(store=args.store, sample_rate=args.sample_rate, max_bytes=int(args.max_mib * MIB))
    serve(PayloadCollector(target, pending_ttl_s=args.pending_ttl_s), args.host, args.port)


if __name__ == "__main__":
    main()
