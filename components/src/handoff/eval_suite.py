"""The shared evaluation suite: the same task-aware metrics for every project, computed from raw
model outputs so that no researcher has to write (or can get subtly wrong) accuracy, F1 or RMSE.

A single headline number hides the failures that matter after handoff: a rare class the model
never predicts, an overconfident model, one segment of traffic that regressed. So besides the
headline metrics the suite reports per-class scores, the confusion matrix, calibration (ECE) and
metrics per slice. Every value is a plain float rounded to 6 decimals, so results are JSON-able
and identical from run to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from handoff.contract import CONTRACT_FILE
from handoff.errors import HandoffError

TASKS = ("classification", "regression")
# The headline metrics the suite reports per task: with val_loss and model.py's own metrics(),
# the names a contract's slo may gate on. `handoff check` reads this so that it accepts exactly
# what evaluation will measure (a test holds the two together).
SUITE_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "ece"),
    "regression": ("mae", "rmse", "r2"),
}
ECE_BINS = 15
PROBABILITY_TOLERANCE = 1e-3
DECIMALS = 6
NUMERIC = "biuf"  # numpy dtype kinds: bool, int, unsigned, float


@dataclass(frozen=True)
class SuiteResult:
    """Everything the suite measured; each field is JSON-able as it stands.

    ``per_class`` and ``confusion`` are empty for regression. ``slices`` maps a slice name to that
    slice's headline metrics plus ``support`` (its number of items).
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    slices: dict[str, dict[str, float]]


def _r(value: float) -> float:
    return round(float(value), DECIMALS)


def _shape_error(task: str, message: str) -> HandoffError:
    """Shape problems trace back to the task the contract declares, so the error points there."""
    return HandoffError(f"'{task}': {message}", file=CONTRACT_FILE, field="task")


def _slice_groups(task: str, slice_keys: Sequence[str] | None, n: int) -> dict[str, np.ndarray] | None:
    """Item indices per slice key, keys sorted so the result does not depend on item order."""
    if slice_keys is None:
        return None
    keys = [str(key) for key in slice_keys]
    if len(keys) != n:
        raise _shape_error(task, f"slice_keys has {len(keys)} entries but there are {n} items")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return {key: np.asarray(groups[key]) for key in sorted(groups)}


# --- classification ---------------------------------------------------------------------------


def _as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that already are probabilities are kept; anything else (logits) goes through softmax.

    Calibration is only meaningful on probabilities, and models export either, so we decide per
    array rather than asking the researcher.
    """
    scores = scores.astype(np.float64)
    in_range = bool(np.all((scores >= 0) & (scores <= 1)))
    sums_to_one = bool(np.all(np.abs(scores.sum(axis=1) - 1) <= PROBABILITY_TOLERANCE))
    if in_range and sums_to_one:
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))  # shift: no overflow for big logits
    return shifted / shifted.sum(axis=1, keepdims=True)


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Top-label ECE over equal-width confidence bins: how far confidence is from accuracy.

    Bin ``b`` holds confidences in ``(b/15, (b+1)/15]``; the gap of each bin is weighted by its
    share of items. sklearn has no multiclass ECE, hence this one hand-written metric.
    """
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    # Interior edges with right=True give (lower, upper] bins, as in Guo et al. (2017).
    bins = np.digitize(confidence, np.linspace(0, 1, ECE_BINS + 1)[1:-1], right=True)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


def _check_classification(predictions: np.ndarray, targets: np.ndarray) -> None:
    task = "classification"
    found = f"found predictions {predictions.shape} and targets {targets.shape}"
    if predictions.ndim != 2 or predictions.shape[1] < 2:
        raise _shape_error(task, f"predictions must be (N, C) scores with C >= 2 classes; {found}")
    if targets.ndim != 1:
        raise _shape_error(task, f"targets must be (N,) integer class ids; {found}")
    if predictions.shape[0] != targets.shape[0]:
        raise _shape_error(task, f"predictions and targets must have the same N; {found}")
    if targets.shape[0] == 0:
        raise _shape_error(task, f"there are no items to evaluate; {found}")
    if targets.dtype.kind not in "iu":
        raise _shape_error(task, f"targets must be integer class ids, found dtype {targets.dtype}")
    if predictions.dtype.kind not in NUMERIC:
        raise _shape_error(task, f"predictions must be numeric scores, found dtype {predictions.dtype}")
    if not np.all(np.isfinite(predictions)):
        raise _shape_error(task, "predictions contain NaN or infinite scores")
    classes = predictions.shape[1]
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        raise _shape_error(
            task, f"targets must be class ids in 0..{classes - 1} (C={classes}); found {low}..{high}"
        )


def _accuracy_f1(targets: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    # macro-F1 averages over the classes seen in targets or predictions: a class with no items
    # and no predictions has no evidence either way, and counting it as 0 would sink small slices.
    return {
        "accuracy": _r(skm.accuracy_score(targets, predicted)),
        "macro_f1": _r(skm.f1_score(targets, predicted, average="macro", zero_division=0)),
    }


def _classification(
    predictions: np.ndarray, targets: np.ndarray, slice_keys: Sequence[str] | None
) -> SuiteResult:
    _check_classification(predictions, targets)
    groups = _slice_groups("classification", slice_keys, len(targets))
    labels = list(range(predictions.shape[1]))
    probabilities = _as_probabilities(predictions)
    predicted = probabilities.argmax(axis=1)

    headline = _accuracy_f1(targets, predicted)
    headline["ece"] = _r(expected_calibration_error(probabilities, targets))

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        targets, predicted, labels=labels, zero_division=0
    )
    per_class = {
        str(c): {
            "precision": _r(precision[c]),
            "recall": _r(recall[c]),
            "f1": _r(f1[c]),
            "support": _r(support[c]),
        }
        for c in labels
    }
    confusion = skm.confusion_matrix(targets, predicted, labels=labels).astype(int).tolist()

    slices: dict[str, dict[str, float]] = {}
    if groups is None:
        # Per-class accuracy is that class's recall; classes with no items have nothing to slice.
        for c in labels:
            if support[c] > 0:
                slices[f"class={c}"] = {"accuracy": _r(recall[c]), "support": _r(support[c])}
    else:
        for key, idx in groups.items():
            slices[key] = {**_accuracy_f1(targets[idx], predicted[idx]), "support": _r(len(idx))}
    return SuiteResult(metrics=headline, per_class=per_class, confusion=confusion, slices=slices)


# --- regression -------------------------------------------------------------------------------


def _regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    out = {
        "mae": _r(skm.mean_absolute_error(targets, predictions)),
        "rmse": _r(skm.root_mean_squared_error(targets, predictions)),
    }
    if len(targets) >= 2:  # R² is undefined for a single item (sklearn returns NaN and warns)
        out["r2"] = _r(skm.r2_score(targets, predictions))
    return out


def _regression(
    predictions: np.ndarray, targets: np.ndarray, slice_keys: Sequence[str] | None
) -> SuiteResult:
    task = "regression"
    found = f"found predictions {predictions.shape} and targets {targets.shape}"
    if predictions.ndim not in (1, 2) or targets.ndim not in (1, 2):
        raise _shape_error(task, f"predictions and targets must be (N,) or (N, k); {found}")
    if predictions.size == 0 or targets.size == 0:
        raise _shape_error(task, f"there are no items to evaluate; {found}")
    if predictions.dtype.kind not in NUMERIC or targets.dtype.kind not in NUMERIC:
        raise _shape_error(
            task, f"predictions and targets must be numeric, found {predictions.dtype} and {targets.dtype}"
        )
    # (N,) and (N, 1) are the same single output; compare the rest of the shape as (N, k).
    preds = predictions.reshape(len(predictions), -1).astype(np.float64)
    truth = targets.reshape(len(targets), -1).astype(np.float64)
    if preds.shape != truth.shape:
        raise _shape_error(task, f"predictions and targets must have the same shape; {found}")
    if not (np.all(np.isfinite(preds)) and np.all(np.isfinite(truth))):
        raise _shape_error(task, "predictions or targets contain NaN or infinite values")
    groups = _slice_groups(task, slice_keys, len(truth))

    slices: dict[str, dict[str, float]] = {}
    for key, idx in (groups or {}).items():
        slices[key] = {**_regression_metrics(preds[idx], truth[idx]), "support": _r(len(idx))}
    return SuiteResult(metrics=_regression_metrics(preds, truth), per_class={}, confusion=[], slices=slices)


def evaluate_outputs(
    task: str,
    predictions: np.ndarray,
    targets: np.ndarray,
    slice_keys: Sequence[str] | None = None,
) -> SuiteResult:
    """Score raw model outputs for the contract's ``task``.

    classification: ``predictions`` (N, C) logits or probabilities, ``targets`` (N,) class ids;
    headline ``accuracy``, ``macro_f1``, ``ece``. regression: ``predictions`` and ``targets``
    (N,) or (N, k); headline ``mae``, ``rmse``, ``r2``. ``slice_keys`` (one string per item)
    adds metrics per key; without it, classification is sliced by true class.
    """
    if task not in TASKS:
        raise HandoffError(
            f"must be 'classification' or 'regression', found {task!r}", file=CONTRACT_FILE, field="task"
        )
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if task == "classification":
        return _classification(predictions, targets, slice_keys)
    return _regression(predictions, targets, slice_keys)
