"""The shared evaluation suite and report plots: hand-checked numbers on small examples, the
failures a headline metric hides, clear errors for outputs that do not fit the task, and PNGs
that decode and are byte-for-byte reproducible."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from matplotlib.image import imread

from handoff.errors import HandoffError
from handoff.eval_suite import SUITE_METRICS, TASKS, SuiteResult, evaluate_outputs
from handoff.plots import confusion_png, curves_figure, curves_png, latency_histogram_png

pytestmark = pytest.mark.unit


def one_hot(predicted: list[int], classes: int) -> np.ndarray:
    """Probability rows that put all mass on the predicted class (no softmax applied to these)."""
    return np.eye(classes)[predicted]


def binary_probs(confidences: list[float], predicted: list[int]) -> np.ndarray:
    """Two-class probability rows whose top class is ``predicted`` with the given confidence."""
    rows = [[c, 1 - c] if p == 0 else [1 - c, c] for c, p in zip(confidences, predicted, strict=True)]
    return np.asarray(rows)


# --- classification ---------------------------------------------------------------------------


def test_per_class_scores_and_confusion_orientation() -> None:
    targets = np.array([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 2, 0]
    result = evaluate_outputs("classification", one_hot(predicted, 3), targets)

    assert result.metrics["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    # rows are the true class, columns the predicted class: item 5 is a true 2 predicted as 0
    assert result.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result.per_class["0"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2.0}
    assert result.per_class["1"] == {"precision": 0.666667, "recall": 1.0, "f1": 0.8, "support": 2.0}
    assert result.per_class["2"] == {"precision": 1.0, "recall": 0.5, "f1": 0.666667, "support": 2.0}
    assert result.metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-6)


def test_macro_f1_exposes_a_class_that_accuracy_hides() -> None:
    targets = np.array([0] * 8 + [1] * 2)
    result = evaluate_outputs("classification", one_hot([0] * 10, 2), targets)

    assert result.metrics["accuracy"] == 0.8
    # class 0: precision 0.8, recall 1 -> F1 0.888889; class 1 is never predicted -> F1 0
    assert result.per_class["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2.0}
    assert result.metrics["macro_f1"] == pytest.approx(0.444444, abs=1e-6)
    assert result.slices["class=1"] == {"accuracy": 0.0, "support": 2.0}
    assert result.slices["class=0"] == {"accuracy": 1.0, "support": 8.0}


def test_class_absent_from_the_data_still_appears_with_zeros() -> None:
    targets = np.array([0, 1, 0, 1])
    result = evaluate_outputs("classification", one_hot([0, 1, 0, 1], 3), targets)

    assert result.per_class["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0.0}
    assert result.confusion == [[2, 0, 0], [0, 2, 0], [0, 0, 0]]
    # no items and no predictions: no evidence against class 2, so it does not drag macro-F1 down
    assert result.metrics["macro_f1"] == 1.0
    assert set(result.slices) == {"class=0", "class=1"}


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # 5 items at 0.8 confidence with 4 right, 5 at 0.6 with 3 right
    confidences = [0.8] * 5 + [0.6] * 5
    predicted = [0] * 10
    targets = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 1])  # 4 of 5 right, then 3 of 5
    result = evaluate_outputs("classification", binary_probs(confidences, predicted), targets)
    assert result.metrics["ece"] == 0.0


def test_ece_measures_overconfidence() -> None:
    # 0.9 confident, half right: the gap is 0.4
    targets = np.array([0, 0, 1, 1])
    result = evaluate_outputs("classification", binary_probs([0.9] * 4, [0] * 4), targets)
    assert result.metrics["ece"] == pytest.approx(0.4, abs=1e-6)
    assert result.metrics["accuracy"] == 0.5


def test_softmax_is_applied_to_logits_but_not_to_probabilities() -> None:
    targets = np.array([0])
    logits = evaluate_outputs("classification", np.array([[2.0, 0.0]]), targets)
    assert logits.metrics["ece"] == pytest.approx(1 - math.exp(2) / (math.exp(2) + 1), abs=1e-6)

    probabilities = evaluate_outputs("classification", np.array([[0.7, 0.3]]), targets)
    assert probabilities.metrics["ece"] == pytest.approx(0.3, abs=1e-6)

    # in [0, 1] but not summing to 1 (independent sigmoids): treated as scores, softmaxed
    scores = evaluate_outputs("classification", np.array([[0.9, 0.3]]), targets)
    assert scores.metrics["ece"] == pytest.approx(1 - 1 / (1 + math.exp(-0.6)), abs=1e-6)


def test_custom_slices_show_a_regression_hidden_in_the_average() -> None:
    targets = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    predicted = [0, 1, 0, 1, 0, 1, 1, 0]
    keys = ["camera=a"] * 6 + ["camera=b"] * 2
    result = evaluate_outputs("classification", one_hot(predicted, 2), targets, keys)

    assert result.metrics["accuracy"] == 0.75
    assert list(result.slices) == ["camera=a", "camera=b"]
    assert result.slices["camera=a"] == {"accuracy": 1.0, "macro_f1": 1.0, "support": 6.0}
    assert result.slices["camera=b"] == {"accuracy": 0.0, "macro_f1": 0.0, "support": 2.0}


def test_result_is_json_able_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10)).astype(np.float32)
    targets = rng.integers(0, 10, size=200)
    first = evaluate_outputs("classification", logits, targets)
    second = evaluate_outputs("classification", logits.copy(), targets.copy())
    assert first == second
    assert isinstance(first, SuiteResult)
    assert set(first.metrics) == {"accuracy", "macro_f1", "ece"}
    assert len(first.confusion) == 10 and sum(map(sum, first.confusion)) == 200
    json.dumps([first.metrics, first.per_class, first.confusion, first.slices])
    assert all(v == round(v, 6) for v in first.metrics.values())


@pytest.mark.parametrize(
    ("task", "predictions", "targets"),
    [
        ("classification", np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 2])),
        ("regression", np.array([1.0, 2.0, 3.5]), np.array([1.0, 2.5, 3.0])),
    ],
)
def test_the_headline_metrics_are_the_names_check_lets_a_gate_use(
    task: str, predictions: np.ndarray, targets: np.ndarray
) -> None:
    """`handoff check` accepts SUITE_METRICS in slo.min_metrics/max_metrics: they must be what the
    suite reports, or check would pass a gate that evaluation then finds no value for."""
    assert set(SUITE_METRICS) == set(TASKS)
    assert tuple(evaluate_outputs(task, predictions, targets).metrics) == SUITE_METRICS[task]


# --- regression -------------------------------------------------------------------------------


def test_regression_metrics_match_hand_computation() -> None:
    targets = np.array([1.0, 2.0, 3.0, 4.0])
    predictions = np.array([[2.0], [2.0], [3.0], [5.0]])  # (N, 1) against (N,) targets is fine
    result = evaluate_outputs("regression", predictions, targets)

    # errors 1, 0, 0, 1: MAE 0.5, MSE 0.5; SS_tot about mean 2.5 is 5, so R² = 1 - 2/5
    assert result.metrics == {"mae": 0.5, "rmse": pytest.approx(0.707107, abs=1e-6), "r2": 0.6}
    assert result.per_class == {} and result.confusion == [] and result.slices == {}


def test_regression_multioutput_is_averaged_uniformly() -> None:
    targets = np.array([[0.0, 0.0], [2.0, 4.0]])
    predictions = np.array([[1.0, 0.0], [2.0, 2.0]])
    result = evaluate_outputs("regression", predictions, targets)
    # output 0: MAE 0.5, RMSE sqrt(0.5); output 1: MAE 1, RMSE sqrt(2)
    assert result.metrics["mae"] == 0.75
    assert result.metrics["rmse"] == pytest.approx((math.sqrt(0.5) + math.sqrt(2)) / 2, abs=1e-6)


def test_regression_slices_show_the_segment_that_got_worse() -> None:
    targets = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    predictions = np.array([1.0, 2.0, 3.0, 14.0, 20.0])
    keys = ["day", "day", "day", "night", "holiday"]
    result = evaluate_outputs("regression", predictions, targets, keys)

    assert result.slices["day"] == {"mae": 0.0, "rmse": 0.0, "r2": 1.0, "support": 3.0}
    assert result.slices["night"] == {"mae": 4.0, "rmse": 4.0, "support": 1.0}  # no R² for 1 item
    assert result.slices["holiday"]["mae"] == 0.0
    assert result.metrics["mae"] == 0.8


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "predictions", "targets", "keys", "expected"),
    [
        ("ranking", np.zeros((2, 2)), np.zeros(2, int), None, "must be 'classification' or 'regression'"),
        ("classification", np.zeros(3), np.zeros(3, int), None, "predictions must be (N, C) scores"),
        ("classification", np.zeros((3, 1)), np.zeros(3, int), None, "found predictions (3, 1)"),
        ("classification", np.zeros((3, 2)), np.zeros(3), None, "integer class ids, found dtype float64"),
        ("classification", np.zeros((3, 2)), np.array([0, 2, 1]), None, "in 0..1 (C=2); found 0..2"),
        ("classification", np.zeros((3, 2)), np.zeros(4, int), None, "same N; found predictions (3, 2)"),
        ("classification", np.zeros((0, 2)), np.zeros(0, int), None, "no items to evaluate"),
        ("classification", np.zeros((2, 2)), np.zeros(2, int), ["a"], "slice_keys has 1 entries but"),
        ("classification", np.full((1, 2), np.nan), np.zeros(1, int), None, "NaN or infinite"),
        ("regression", np.zeros((3, 2)), np.zeros(3), None, "same shape; found predictions (3, 2)"),
        ("regression", np.zeros(0), np.zeros(0), None, "no items to evaluate"),
        ("regression", np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), None, "must be (N,) or (N, k)"),
    ],
    ids=[
        "task",
        "1d-scores",
        "one-column",
        "float-targets",
        "out-of-range",
        "n-mismatch",
        "empty",
        "slice-keys",
        "nan",
        "reg-shape",
        "reg-empty",
        "reg-3d",
    ],
)
def test_outputs_that_do_not_fit_the_task_name_the_contract_field(
    task: str, predictions: np.ndarray, targets: np.ndarray, keys: list[str] | None, expected: str
) -> None:
    with pytest.raises(HandoffError) as caught:
        evaluate_outputs(task, predictions, targets, keys)
    assert str(caught.value).startswith("contract.yaml: task: ")
    assert caught.value.field == "task"
    assert expected in str(caught.value)


# --- plots ------------------------------------------------------------------------------------


def decoded(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG")
    return imread(io.BytesIO(png), format="png")


@pytest.mark.parametrize(
    "draw",
    [
        lambda: confusion_png([[5, 1, 0], [2, 7, 0], [0, 0, 3]], ["0", "1", "2"]),
        lambda: confusion_png([], []),
        lambda: curves_png(
            {
                "train_loss": [(1, 2.0), (2, 1.2), (3, 0.8)],
                "val_loss": [(1, 2.1), (3, 1.0)],
                "accuracy": [(1, 0.5), (2, 0.7), (3, 0.9)],
            }
        ),
        lambda: curves_png({"accuracy": [(0, 0.1), (1, 0.9)]}),
        lambda: curves_png({}),
        lambda: latency_histogram_png(list(np.random.default_rng(0).gamma(4.0, 0.5, 300)), slo_ms=5.0),
        lambda: latency_histogram_png([], slo_ms=5.0),
    ],
    ids=[
        "confusion",
        "confusion-empty",
        "curves",
        "curves-metrics-only",
        "curves-empty",
        "latency",
        "latency-empty",
    ],
)
def test_plots_are_small_decodable_and_reproducible(draw: Callable[[], bytes]) -> None:
    png = draw()
    assert decoded(png).shape == (400, 500, 4)  # 5 x 4 inches at 100 dpi, RGBA
    assert 2_000 < len(png) < 200_000
    assert draw() == png


def test_confusion_png_refuses_a_matrix_that_does_not_match_its_labels() -> None:
    with pytest.raises(ValueError, match=r"found shape \(2, 2\) and 3 labels"):
        confusion_png([[1, 0], [0, 1]], ["a", "b", "c"])


def test_the_training_curves_say_what_their_x_axis_counts() -> None:
    history = {"train_loss": [(1, 2.0), (2, 1.2)], "accuracy": [(1, 0.5), (2, 0.7)]}
    assert curves_figure(history).axes[-1].get_xlabel() == "epoch"  # the trainer logs step=epoch
    assert curves_figure(history, x_label="step").axes[-1].get_xlabel() == "step"
