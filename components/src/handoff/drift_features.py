"""The columns drift is measured on: one table per side (reference, logged traffic), built alike.

Drift tests compare one column at a time, so every tensor becomes a few numeric columns per row.
A flat feature vector (``[-1, n]``, ``n`` up to ``PER_FEATURE_MAX``) gets a column per feature,
named ``name[i]``. Anything else (images, sequences, wide vectors) gets its per-row summary:
``name.mean``, ``.std``, ``.min``, ``.p25``, ``.p50``, ``.p75``, ``.max``, and ``.size`` where an
axis is dynamic. That is what moves when inputs are inverted, noised, rescaled or truncated; the
quartiles catch a flipped background, which leaves the extremes and the spread alone.

A classifier's scored output becomes ``prediction`` (the class, categorical) and ``confidence``
(its probability); every other output is summarised like an input. The reference profile
(``handoff.reference_profile``) and `handoff monitor` both build their tables here, so the two
sides can never disagree on a column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from handoff.contract import Contract, TensorSpec
from handoff.eval_suite import as_probabilities

# Widest flat vector whose features each get a column; wider ones are summarised.
PER_FEATURE_MAX = 64
PREDICTION = "prediction"
CONFIDENCE = "confidence"
# Per-row statistics of a summarised tensor, by column suffix.
SUMMARIES: dict[str, Callable[[np.ndarray], float]] = {
    "mean": np.mean,
    "std": np.std,
    "min": np.min,
    "p25": lambda row: np.percentile(row, 25),
    "p50": np.median,
    "p75": lambda row: np.percentile(row, 75),
    "max": np.max,
}

Rows = np.ndarray | Sequence[np.ndarray]  # a batch array, or per-row arrays (shapes may differ)


def _per_feature(spec: TensorSpec) -> bool:
    return len(spec.shape) == 2 and 0 < spec.shape[1] <= PER_FEATURE_MAX


def _flat_rows(rows: Rows) -> list[np.ndarray]:
    return [np.asarray(row).reshape(-1) for row in rows]


def _numeric(row: np.ndarray) -> np.ndarray:
    """A row as float64; raw bytes inputs count as their lengths (what drifts in free text first)."""
    if row.dtype == object or row.dtype.kind in "SU":
        return np.array([len(item) for item in row], dtype=np.float64)
    return row.astype(np.float64)


def tensor_columns(spec: TensorSpec, rows: Rows) -> dict[str, np.ndarray]:
    """``spec``'s columns for ``rows`` (its batch, or its rows one by one)."""
    name = spec.name
    if _per_feature(spec):
        flat_rows = [_numeric(row) for row in _flat_rows(rows)]
        matrix = np.stack(flat_rows) if flat_rows else np.empty((0, spec.shape[1]))
        if matrix.shape[1] == 1:
            return {name: matrix[:, 0]}
        return {f"{name}[{i}]": matrix[:, i] for i in range(matrix.shape[1])}
    flat = [_numeric(row) for row in _flat_rows(rows)]
    columns = {
        f"{name}.{stat}": np.array([float(summary(row)) if row.size else np.nan for row in flat])
        for stat, summary in SUMMARIES.items()
    }
    if any(dim == -1 for dim in spec.shape[1:]):
        columns[f"{name}.size"] = np.array([row.size for row in flat], dtype=np.float64)
    return columns


def prediction_columns(contract: Contract, outputs: Mapping[str, Rows]) -> dict[str, np.ndarray]:
    """The outputs' columns: a classifier's class and confidence for its scored output, every other
    output summarised as ``tensor_columns`` does."""
    columns: dict[str, np.ndarray] = {}
    classifier = contract.task_type == "classification"
    scored = contract.output_names[contract.scored_output] if classifier else None
    for spec in contract.outputs:
        rows = outputs[spec.name]
        if spec.name == scored:
            flat = [row.astype(np.float64) for row in _flat_rows(rows)]
            scores = np.stack(flat) if flat else np.empty((0, 2))
            if scores.shape[1] == 1:  # one score: the positive class's logit or probability
                scores = _two_classes(scores[:, 0])
            probabilities = as_probabilities(scores)
            classes, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
            columns[PREDICTION] = np.array([str(c) for c in classes], dtype=object)
            columns[CONFIDENCE] = confidence.astype(np.float64)
        else:
            columns.update(tensor_columns(spec, rows))
    return columns


def _two_classes(positive: np.ndarray) -> np.ndarray:
    """A single score as two classes' probabilities (a logit through the sigmoid first)."""
    if positive.size and (positive.min() < 0 or positive.max() > 1):
        positive = 1 / (1 + np.exp(-positive))
    return np.stack([1 - positive, positive], axis=1)


def input_columns(specs: Sequence[TensorSpec], inputs: Mapping[str, Rows]) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for spec in specs:
        columns.update(tensor_columns(spec, inputs[spec.name]))
    return columns


def feature_table(columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(dict(columns))
