"""The shared evaluation suite: the same task-aware metrics for every project, computed from raw
model outputs so that no researcher has to write (or can get subtly wrong) accuracy, F1 or RMSE.

A single headline number hides the failures that matter after handoff: a rare class the model
never predicts, an overconfident model, one segment of traffic that regressed. So besides the
headline metrics the suite reports per-class scores, the confusion matrix, calibration (ECE) and
metrics per slice. Every value is a plain float rounded to 6 decimals, so results are JSON-able
and identical from run to run.

A held-out split need not fit in memory: ``SuiteAccumulator`` takes it batch by batch and keeps
only what the metrics are made of, a size that does not grow with the split: for classification
the confusion matrix (one per slice) and per-bin calibration sums, for regression per-output sums
of errors and the targets' running mean and spread (Chan et al.'s pairwise update). The metrics
themselves are still scikit-learn's, fed the confusion matrix's cells as weighted items, so the
definitions are the same as on whole arrays. ``evaluate_outputs`` is the same accumulator fed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
# Interior edges with right=True give (lower, upper] bins, as in Guo et al. (2017).
ECE_EDGES = np.linspace(0, 1, ECE_BINS + 1)[1:-1]
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


def _are_probabilities(scores: np.ndarray) -> bool:
    in_range = bool(np.all((scores >= 0) & (scores <= 1)))
    return in_range and bool(np.all(np.abs(scores.sum(axis=1) - 1) <= PROBABILITY_TOLERANCE))


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))  # shift: no overflow for big logits
    return shifted / shifted.sum(axis=1, keepdims=True)


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that already are probabilities are kept; anything else (logits) goes through softmax.

    Calibration is only meaningful on probabilities, and models export either, so we decide per
    array rather than asking the researcher. (Over a split fed in batches the decision is the
    whole split's: see ``SuiteAccumulator``.)
    """
    scores = scores.astype(np.float64)
    return scores if _are_probabilities(scores) else _softmax(scores)


def _confusion(targets: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Rows the true class, columns the predicted one (scikit-learn's orientation)."""
    cells = targets.astype(np.int64) * classes + predicted
    return np.bincount(cells, minlength=classes * classes).reshape(classes, classes)


def _as_weighted_items(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, predicted, weights): one item per non-empty cell of ``confusion``, weighted by its
    count. scikit-learn's classification metrics depend on the items only through these counts,
    so they give the same values as on the items themselves (the sums of whole-number weights are
    exact in float64)."""
    true, predicted = np.nonzero(confusion)
    return true, predicted, confusion[true, predicted].astype(np.float64)


def _accuracy_f1(confusion: np.ndarray) -> dict[str, float]:
    true, predicted, weights = _as_weighted_items(confusion)
    # macro-F1 averages over the classes seen in targets or predictions: a class with no items
    # and no predictions has no evidence either way, and counting it as 0 would sink small slices.
    return {
        "accuracy": _r(skm.accuracy_score(true, predicted, sample_weight=weights)),
        "macro_f1": _r(
            skm.f1_score(true, predicted, average="macro", zero_division=0, sample_weight=weights)
        ),
    }


@dataclass
class _Calibration:
    """Per confidence bin: items, items predicted right, and the sum of their confidences.

    Bin ``b`` holds top-label confidences in ``(b/15, (b+1)/15]``. sklearn has no multiclass ECE,
    hence this one hand-written metric.
    """

    items: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.float64))

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        bins = np.digitize(confidence, ECE_EDGES, right=True)
        for b in np.unique(bins):
            in_bin = bins == b
            self.items[b] += int(in_bin.sum())
            self.correct[b] += int(correct[in_bin].sum())
            self.confidence[b] += confidence[in_bin].sum()

    def error(self) -> float:
        """Top-label ECE: each bin's gap between accuracy and mean confidence, weighted by its
        share of items."""
        total = self.items.sum()
        ece = 0.0
        for b in np.flatnonzero(self.items):
            n = self.items[b]
            ece += (n / total) * abs(self.correct[b] / n - self.confidence[b] / n)
        return float(ece)


class _ClassCounts:
    """What classification metrics are made of, for one reading of the scores (as given, or
    softmaxed): the confusion matrix, its per-slice matrices and the calibration bins."""

    def __init__(self, classes: int):
        self.classes = classes
        self.confusion = np.zeros((classes, classes), np.int64)
        self.calibration = _Calibration()
        self.slices: dict[str, np.ndarray] = {}

    def add(
        self, probabilities: np.ndarray, targets: np.ndarray, groups: dict[str, np.ndarray] | None
    ) -> None:
        predicted = probabilities.argmax(axis=1)
        self.confusion += _confusion(targets, predicted, self.classes)
        self.calibration.add(probabilities.max(axis=1), predicted == targets)
        for key, idx in (groups or {}).items():
            matrix = self.slices.setdefault(key, np.zeros((self.classes, self.classes), np.int64))
            matrix += _confusion(targets[idx], predicted[idx], self.classes)

    def result(self, sliced: bool) -> SuiteResult:
        labels = list(range(self.classes))
        headline = _accuracy_f1(self.confusion)
        headline["ece"] = _r(self.calibration.error())
        true, predicted, weights = _as_weighted_items(self.confusion)
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            true, predicted, labels=labels, zero_division=0, sample_weight=weights
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
        slices: dict[str, dict[str, float]] = {}
        if not sliced:
            # Per-class accuracy is that class's recall; classes with no items have nothing to slice.
            for c in labels:
                if support[c] > 0:
                    slices[f"class={c}"] = {"accuracy": _r(recall[c]), "support": _r(support[c])}
        else:
            for key in sorted(self.slices):
                matrix = self.slices[key]
                slices[key] = {**_accuracy_f1(matrix), "support": _r(matrix.sum())}
        confusion = self.confusion.astype(int).tolist()
        return SuiteResult(metrics=headline, per_class=per_class, confusion=confusion, slices=slices)


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


# --- regression -------------------------------------------------------------------------------


class _ErrorSums:
    """Per output column: items, sums of absolute and squared errors, and the targets' mean and
    sum of squared deviations (merged batch by batch with Chan et al.'s update, which stays
    accurate where "sum of squares minus squared sum" would cancel)."""

    def __init__(self, columns: int):
        self.items = 0
        self.absolute = np.zeros(columns)
        self.squared = np.zeros(columns)
        self.mean = np.zeros(columns)
        self.deviation = np.zeros(columns)

    def add(self, preds: np.ndarray, truth: np.ndarray) -> None:
        n = len(truth)
        errors = truth - preds
        self.absolute += np.sum(np.abs(errors), axis=0)
        self.squared += np.sum(errors**2, axis=0)
        mean = np.mean(truth, axis=0)
        deviation = np.sum((truth - mean) ** 2, axis=0)
        if self.items == 0:
            self.mean, self.deviation = mean, deviation
        else:
            delta, total = mean - self.mean, self.items + n
            self.mean = self.mean + delta * (n / total)
            self.deviation = self.deviation + deviation + delta**2 * (self.items * n / total)
        self.items += n

    def metrics(self) -> dict[str, float]:
        """scikit-learn's definitions, from the sums: each output's value, averaged uniformly."""
        out = {
            "mae": _r(float(np.mean(self.absolute / self.items))),
            "rmse": _r(float(np.mean(np.sqrt(self.squared / self.items)))),
        }
        if self.items >= 2:  # R² is undefined for a single item (sklearn returns NaN and warns)
            # As sklearn's r2_score (force_finite): perfect predictions score 1, and a constant
            # target that the model misses scores 0 rather than -inf.
            scores = np.ones(len(self.squared))
            valid = (self.deviation != 0) & (self.squared != 0)
            scores[valid] = 1 - self.squared[valid] / self.deviation[valid]
            scores[(self.squared != 0) & (self.deviation == 0)] = 0.0
            out["r2"] = _r(float(np.mean(scores)))
        return out


def _regression_arrays(predictions: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    return preds, truth


# --- the suite --------------------------------------------------------------------------------


class SuiteAccumulator:
    """The suite over a split fed batch by batch: ``update`` per batch, ``result`` at the end.

    Memory is the size of the counts (a C x C confusion matrix per slice, or a few numbers per
    output column and slice), whatever the number of items. The result equals
    ``evaluate_outputs`` on the batches joined (counts exactly; sums up to the order of
    floating-point additions, and bit for bit when fed once).

    Whether classification scores are probabilities (kept) or logits (softmaxed) is decided for
    the whole split, as on joined arrays: counts are kept for both readings while every batch so
    far could be probabilities, and the as-given counts are dropped at the first batch that
    cannot.
    """

    def __init__(self, task: str):
        if task not in TASKS:
            raise HandoffError(
                f"must be 'classification' or 'regression', found {task!r}", file=CONTRACT_FILE, field="task"
            )
        self.task = task
        self.items = 0
        self._sliced: bool | None = None
        self._classes = 0
        self._given: _ClassCounts | None = None  # the scores read as probabilities
        self._softmaxed: _ClassCounts | None = None
        self._errors: _ErrorSums | None = None
        self._slice_errors: dict[str, _ErrorSums] = {}

    def update(
        self, predictions: np.ndarray, targets: np.ndarray, slice_keys: Sequence[str] | None = None
    ) -> None:
        """Add a batch: shapes and ``slice_keys`` as ``evaluate_outputs`` takes them."""
        predictions, targets = np.asarray(predictions), np.asarray(targets)
        sliced = slice_keys is not None
        if self._sliced is not None and sliced != self._sliced:
            raise _shape_error(
                self.task, "slice_keys must be given for every batch of a split or for none of them"
            )
        self._sliced = sliced
        if self.task == "classification":
            self._update_classification(predictions, targets, slice_keys)
        else:
            self._update_regression(predictions, targets, slice_keys)

    def _update_classification(
        self, predictions: np.ndarray, targets: np.ndarray, slice_keys: Sequence[str] | None
    ) -> None:
        _check_classification(predictions, targets)
        classes = predictions.shape[1]
        if self.items and classes != self._classes:
            raise _shape_error(
                self.task, f"every batch must score the same C classes; found {classes} after {self._classes}"
            )
        groups = _slice_groups(self.task, slice_keys, len(targets))
        scores = predictions.astype(np.float64)
        if self.items == 0:
            self._classes = classes
            self._given, self._softmaxed = _ClassCounts(classes), _ClassCounts(classes)
        assert self._softmaxed is not None
        if self._given is not None:
            if _are_probabilities(scores):
                self._given.add(scores, targets, groups)
            else:
                self._given = None
        self._softmaxed.add(_softmax(scores), targets, groups)
        self.items += len(targets)

    def _update_regression(
        self, predictions: np.ndarray, targets: np.ndarray, slice_keys: Sequence[str] | None
    ) -> None:
        preds, truth = _regression_arrays(predictions, targets)
        if self._errors is None:
            self._errors = _ErrorSums(preds.shape[1])
        elif preds.shape[1] != len(self._errors.mean):
            raise _shape_error(
                self.task,
                f"every batch must have the same outputs per item; found {preds.shape[1]} "
                f"after {len(self._errors.mean)}",
            )
        groups = _slice_groups(self.task, slice_keys, len(truth))
        self._errors.add(preds, truth)
        for key, idx in (groups or {}).items():
            self._slice_errors.setdefault(key, _ErrorSums(preds.shape[1])).add(preds[idx], truth[idx])
        self.items += len(truth)

    def result(self) -> SuiteResult:
        """The suite's metrics over every batch added so far."""
        if self.task == "classification":
            counts = self._given or self._softmaxed
            if counts is None:
                raise _shape_error(self.task, "there are no items to evaluate; no batch was scored")
            return counts.result(bool(self._sliced))
        if self._errors is None:
            raise _shape_error(self.task, "there are no items to evaluate; no batch was scored")
        slices = {
            key: {**self._slice_errors[key].metrics(), "support": _r(self._slice_errors[key].items)}
            for key in sorted(self._slice_errors)
        }
        return SuiteResult(metrics=self._errors.metrics(), per_class={}, confusion=[], slices=slices)


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
    suite = SuiteAccumulator(task)
    suite.update(predictions, targets, slice_keys)
    return suite.result()
