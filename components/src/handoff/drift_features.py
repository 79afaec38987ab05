"""The columns drift is measured on: one table per side (reference, logged traffic), built alike.

Drift tests compare one column at a time, so every tensor becomes a few numeric columns per row.
A flat feature vector (``[-1, n]``, ``n`` up to ``PER_FEATURE_MAX``) gets a column per feature,
named ``name[i]``. Anything else (images, sequences, wide vectors) gets its per-row summary:
``name.mean``, ``.std``, ``.min``, ``.p25``, ``.p50``, ``.p75``, ``.max``, and ``.size`` where an
axis is dynamic. That is what moves when inputs are inverted, noised, rescaled or truncated; the
quartiles catch a flipped background, which leaves the extremes and the spread alone.

A classifier's scored output becomes ``<output>.class`` (the predicted class, as text: the one
categorical column) and ``<output>.confidence`` (its probability); every other output is
summarised like an input. A value the contract's ``slo.drift.pad`` names for an input is left out
of that input's rows first. The reference profile (``handoff.reference_profile``) and `handoff
monitor` both build their tables here, with the same contract, so the two sides can never
disagree on a column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from handoff.contract import Contract, TensorSpec
from handoff.eval_suite import as_probabilities

# Widest flat vector whose features each get a column; wider ones are summarised.
PER_FEATURE_MAX = 64
CLASS = ".class"  # suffixes of a classifier's columns
CONFIDENCE = ".confidence"
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


def tensor_columns(spec: TensorSpec, rows: Rows, pad: float | None = None) -> dict[str, np.ndarray]:
    """``spec``'s columns for ``rows`` (its batch, or its rows one by one), ``pad`` values left out
    of each row (summaries then describe the rest; ``.size`` counts it)."""
    name = spec.name
    if pad is not None:
        rows = [row[row != pad] for row in _flat_rows(rows)]
        return _summaries(spec, rows, dynamic=True)
    if _per_feature(spec):
        matrix = _matrix(rows, spec.shape[1])
        if matrix.shape[1] == 1:
            return {name: matrix[:, 0]}
        return {f"{name}[{i}]": matrix[:, i] for i in range(matrix.shape[1])}
    return _summaries(spec, rows, dynamic=any(dim == -1 for dim in spec.shape[1:]))


def _matrix(rows: Rows, width: int) -> np.ndarray:
    """Rows as a float matrix; a row of another size (a response that left this output out: the
    payload log keeps it empty) is all NaN, which the drift tests leave out."""
    if isinstance(rows, np.ndarray):
        return rows.reshape(len(rows), -1).astype(np.float64)
    matrix = np.full((len(rows), width), np.nan)
    for i, row in enumerate(_flat_rows(rows)):
        if row.size == width:
            matrix[i] = _numeric(row)
    return matrix


def _summaries(spec: TensorSpec, rows: Rows, dynamic: bool) -> dict[str, np.ndarray]:
    flat = [_numeric(row) for row in _flat_rows(rows)]
    if flat and len({row.size for row in flat}) == 1 and flat[0].size:
        # Rows of one size (fixed shapes, the usual case): every row at once, along axis 1.
        matrix = np.stack(flat)
        quartiles = np.percentile(matrix, [25, 50, 75], axis=1)
        by_stat = {
            "mean": matrix.mean(axis=1),
            "std": matrix.std(axis=1),
            "min": matrix.min(axis=1),
            "p25": quartiles[0],
            "p50": quartiles[1],
            "p75": quartiles[2],
            "max": matrix.max(axis=1),
        }
        columns = {f"{spec.name}.{stat}": by_stat[stat] for stat in SUMMARIES}
    else:
        columns = {
            f"{spec.name}.{stat}": np.array([float(summary(row)) if row.size else np.nan for row in flat])
            for stat, summary in SUMMARIES.items()
        }
    if dynamic:
        columns[f"{spec.name}.size"] = np.array([row.size for row in flat], dtype=np.float64)
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
            width = spec.shape[1] if len(spec.shape) == 2 and spec.shape[1] > 0 else _widest(rows)
            scores = _matrix(rows, width)
            if scores.shape[1] == 1:  # one score: the positive class's logit or probability
                scores = _two_classes(scores[:, 0])
            answered = ~np.isnan(scores).any(axis=1)
            probabilities = np.full(scores.shape, np.nan)
            probabilities[answered] = as_probabilities(scores[answered])
            classes = [
                str(c) if ok else None for c, ok in zip(probabilities.argmax(axis=1), answered, strict=True)
            ]
            columns[spec.name + CLASS] = np.array(classes, dtype=object)
            columns[spec.name + CONFIDENCE] = probabilities.max(axis=1)
        else:
            columns.update(tensor_columns(spec, rows))
    return columns


def _widest(rows: Rows) -> int:
    return max((np.asarray(row).size for row in rows), default=1)


def _two_classes(positive: np.ndarray) -> np.ndarray:
    """A single score as two classes' probabilities (a logit through the sigmoid first)."""
    if positive.size and (positive.min() < 0 or positive.max() > 1):
        positive = 1 / (1 + np.exp(-positive))
    return np.stack([1 - positive, positive], axis=1)


def input_columns(contract: Contract, inputs: Mapping[str, Rows]) -> dict[str, np.ndarray]:
    """The contract's inputs' columns, ``slo.drift.pad`` applied."""
    pads = contract.slo.drifting.pad
    columns: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        columns.update(tensor_columns(spec, inputs[spec.name], pads.get(spec.name)))
    return columns


def tensor_of(column: str, names: Sequence[str]) -> str:
    """The tensor a column was made from (names may hold dots and brackets themselves)."""
    owners = [n for n in names if column == n or column.startswith((f"{n}[", f"{n}."))]
    return max(owners, key=len) if owners else column


def categorical(table: pd.DataFrame) -> list[str]:
    """The columns of labels (a classifier's classes), which drift tests compare as categories."""
    return [c for c in table.columns if table[c].dtype == object]


def feature_table(columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(dict(columns))
