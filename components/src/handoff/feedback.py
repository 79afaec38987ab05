"""Ground truth for served predictions: how product code reports outcomes, and how they meet the
predictions they judge.

Product code keeps the ``id`` of each inference response (a V2 request may set it; the server
makes one otherwise) and, once it knows the truth, posts it to the model server::

    POST /v2/models/<model>/feedback
    {"id": "<the response's id>", "labels": [<one label per row of that request>]}

A list of such objects reports several requests at once. A label is what the evaluation suite
takes as a target: a class id for classification, a number (or a list of numbers, one per output
column) for regression. The server writes feedback with the same Parquet writer as its payload
log (``PayloadLog``, column ``input.label``), into ``<payload store>/feedback``; a later report for
the same id replaces the earlier one. ``joined`` pairs the payload log's logged outputs with the
labels by request id and row, which is what ``handoff ab status`` scores each arm on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from handoff.contract import Contract
from handoff.payload_log import PayloadLog, Window, read_window

FEEDBACK_DIR = "feedback"
LABEL = "label"
EXAMPLE = '{"id": "<the inference response\'s id>", "labels": [3]}'


class BadFeedback(ValueError):
    """A feedback body that cannot be recorded; the message says what was expected."""


def feedback_store(payload_store: str) -> str:
    """Where feedback is kept: beside the payload log, in its own folder (the payload log's rolling
    and reading list only the files directly in its store)."""
    return f"{str(payload_store).rstrip('/')}/{FEEDBACK_DIR}"


def feedback_log(payload_store: str, *, model: str, version: str, max_bytes: int) -> PayloadLog:
    """The writer a model server records feedback with: every report kept (no sampling)."""
    return PayloadLog(
        feedback_store(payload_store),
        model=model,
        version=version,
        sample_rate=1.0,
        max_bytes=max_bytes,
        flush_s=1.0,
    )


def parse(body: bytes, contract: Contract | None = None) -> list[tuple[str, np.ndarray]]:
    """The (request id, labels) pairs of a feedback body, its labels checked against
    ``contract``'s scored output when given; ``BadFeedback`` says what is wrong (nothing of a body
    with one bad report is recorded)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadFeedback(f"the feedback body is not JSON ({exc}); expected {EXAMPLE}") from None
    reports = data if isinstance(data, list) else [data]
    if not reports:
        raise BadFeedback(f"the feedback list is empty; expected a list of objects like {EXAMPLE}")
    parsed = [_report(i, report, many=isinstance(data, list)) for i, report in enumerate(reports)]
    for i, (request_id, labels) in enumerate(parsed):
        problem = None if contract is None else label_problem(contract, labels)
        if problem:
            where = f"feedback[{i}]" if isinstance(data, list) else "the feedback"
            raise BadFeedback(f"{where} (id {request_id!r}): {problem}")
    return parsed


def _report(index: int, report: Any, *, many: bool) -> tuple[str, np.ndarray]:
    where = f"feedback[{index}]" if many else "the feedback"
    if not isinstance(report, dict):
        raise BadFeedback(f"{where} must be an object like {EXAMPLE}; found {type(report).__name__}")
    unknown = sorted(set(report) - {"id", "labels"})
    if unknown:
        raise BadFeedback(f"{where} has unknown field(s) {', '.join(unknown)}; expected {EXAMPLE}")
    request_id, labels = report.get("id"), report.get("labels")
    if not isinstance(request_id, str) or not request_id:
        message = f"{where}.id must be the inference response's id (a non-empty string); expected {EXAMPLE}"
        raise BadFeedback(message)
    if not isinstance(labels, list) or not labels:
        message = f"{where}.labels must be a non-empty list, one label per row of request {request_id!r}"
        raise BadFeedback(message)
    try:
        array = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadFeedback(
            f"{where}.labels must hold numbers (a class id, or a regression target, per row); "
            f"found {labels!r}"
        ) from None
    return request_id, array


def label_problem(contract: Contract, labels: np.ndarray) -> str | None:
    """Why ``labels`` (one report's, a row each) cannot be targets of the contract's scored
    output, or None: a class id in 0..C-1 per row for classification, a value of the output's row
    shape for regression. Checked as feedback arrives, so one bad report never stops a verdict."""
    output = contract.outputs[contract.scored_output]
    if contract.task.type == "classification":
        classes = output.shape[-1]
        if labels.ndim != 1:
            return f"labels must be one class id per row; found rows of shape {list(labels.shape[1:])}"
        if not np.all(labels == np.round(labels)):
            return f"labels must be whole class ids (0..{classes - 1}); found {labels.tolist()}"
        if classes > 0 and (labels.min() < 0 or labels.max() >= classes):
            scores = f"{output.name} scores {classes} classes"
            return f"labels must be class ids 0..{classes - 1} ({scores}); found {labels.tolist()}"
        return None
    row = output.shape[1:]
    found = list(labels.shape[1:])
    fits = (found == [] and (row == [] or row == [1])) or (
        len(found) == len(row) and all(r in (-1, f) for r, f in zip(row, found, strict=True))
    )
    if not fits:
        return f"each row's label must have {output.name}'s row shape {row}; found {found}"
    return None


def read_labels(payload_store: str, since: datetime | None = None) -> dict[str, np.ndarray]:
    """The labels reported since ``since``, by request id (the latest report for an id wins)."""
    window = read_window(feedback_store(payload_store), since=since)
    rows = window.inputs.get(LABEL, [])
    labels: dict[str, list[np.ndarray]] = {}
    current: dict[str, int] = {}
    # Rows of one report are consecutive and share a timestamp; a new report for an id restarts it.
    for i, (request_id, row) in enumerate(zip(window.request_ids, rows, strict=True)):
        ts = int(window.ts[i].astype("int64"))
        if current.get(request_id) != ts:
            current[request_id] = ts
            labels[request_id] = []
        labels[request_id].append(row)
    return {request_id: np.stack(found) for request_id, found in labels.items()}


@dataclass(frozen=True)
class Joined:
    """One version's logged predictions that have a label, in the suite's shapes."""

    predictions: np.ndarray  # (N, C) scores, or (N,) / (N, k) regression outputs
    labels: np.ndarray  # (N,) class ids, or the regression targets
    requests: int  # requests with feedback
    mismatched: int  # requests (or rows) whose labels do not fit their logged rows (left out)


def joined(window: Window, labels: dict[str, np.ndarray], output: str) -> Joined:
    """Pair the window's ``output`` rows with their labels, request by request."""
    by_request: dict[str, list[int]] = {}
    for i, request_id in enumerate(window.request_ids):
        by_request.setdefault(request_id, []).append(i)
    rows = window.outputs.get(output, [])
    predictions: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    requests = mismatched = 0
    for request_id, indexes in by_request.items():
        found = labels.get(request_id)
        if found is None:
            continue
        if len(found) != len(indexes):
            mismatched += 1
            continue
        requests += 1
        predictions.extend(rows[i] for i in indexes)
        truth.extend(found)
    if not predictions:
        return Joined(np.empty((0,)), np.empty((0,)), requests, mismatched)
    # Rows of another shape than the first (feedback recorded before labels were checked, or an
    # output whose shape changed) are left out and counted, rather than failing the whole join.
    shapes = (predictions[0].shape, truth[0].shape)
    kept = [(p, t) for p, t in zip(predictions, truth, strict=True) if (p.shape, t.shape) == shapes]
    mismatched += len(predictions) - len(kept)
    return Joined(np.stack([p for p, _ in kept]), np.stack([t for _, t in kept]), requests, mismatched)
