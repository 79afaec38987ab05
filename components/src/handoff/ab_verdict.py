"""The verdict of an A/B test: which arm is better on the contract's metric, with its statistics,
or "not enough data" until both arms have the sample the contract's tolerance asks for.

The metric is the contract's first gated metric the evaluation suite computes from a prediction
and its label (``slo.min_metrics``, then ``slo.max_metrics``), else the suite's headline
(accuracy, or rmse for regression). Each arm is scored on its logged predictions that have
feedback (``handoff.feedback.joined``), with the shared suite.

Methods, stated in every verdict:

- accuracy: a two-sided z-test of the difference of the arms' proportions of correct answers,
  with the unpooled (Wald) standard error, which also gives its interval (so the test and the
  interval never disagree), and a Wald interval for each arm;
- any other metric: a percentile bootstrap (``BOOTSTRAP`` resamples of each arm's rows) of the
  difference, its two-sided p-value the share of resampled differences on the other side of 0.

The sample each arm needs is what detects a difference as large as the metric's champion
tolerance (``slo.champion_tolerance``: the smallest difference worth acting on) with a two-sided
test at ``ALPHA`` and power ``POWER``: ``n = (z_{1-α/2} + z_{power})² · (σ₁² + σ₂²) / δ²``, with
σ² = p(1-p) of the champion's accuracy on its first ``PILOT_ROWS`` labelled rows (0.5 before there
are ``MIN_ROWS``), or, for other metrics, the per-row variance a bootstrap of those rows implies.
Never fewer than ``MIN_ROWS``. The test has that fixed size: it is decided on the first
``required`` rows of each arm, so reading the status as data arrives (and stopping when it looks
good) does not raise the false-positive rate above ``ALPHA``.

A challenger that is better but breaks an SLO (the router's p99 against ``slo.latency_p99_ms``,
or more server errors than the champion) is not called better.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats

from handoff.contract import Contract
from handoff.eval_suite import as_probabilities, evaluate_outputs
from handoff.form_choice import LOWER_IS_BETTER

ALPHA = 0.05
POWER = 0.8
MIN_ROWS = 100  # below this no variance estimate (nor normal approximation) is trusted
PILOT_ROWS = 1000  # the champion's rows its variance (so the test's size) is estimated on
BOOTSTRAP = 400
# The smallest difference a test is sized for when the tolerance is 0 (a sample size must be finite).
MIN_DETECTABLE = 1e-3
# More server errors (5xx) than the champion by this share of requests breaks the challenger.
ERROR_MARGIN = 0.01

Outcome = Literal[
    "challenger better",
    "champion better",
    "no significant difference",
    "not enough data",
    "challenger breaks an SLO",
]


@dataclass(frozen=True)
class Arm:
    """One arm as measured: the router's counts and latencies, and its labelled predictions."""

    name: str
    version: str
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    predictions: np.ndarray
    labels: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.labels)


@dataclass
class ArmReport:
    name: str
    version: str
    requests: int
    errors: int
    error_ratio: float
    p50_ms: float | None
    p99_ms: float | None
    labelled_rows: int
    metrics: dict[str, float]
    interval: tuple[float, float] | None  # the verdict's metric, 1-ALPHA confidence


@dataclass
class Verdict:
    outcome: Outcome
    metric: str
    higher_is_better: bool
    method: str
    required_rows: int  # per arm
    difference: float | None = None  # challenger - champion
    interval: tuple[float, float] | None = None
    p_value: float | None = None
    reasons: list[str] = field(default_factory=list)
    arms: dict[str, ArmReport] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict_metric(contract: Contract) -> tuple[str, bool]:
    """The metric the verdict is on, and whether higher is better (module docstring)."""
    suite = (
        ("accuracy", "macro_f1", "ece") if contract.task.type == "classification" else ("mae", "rmse", "r2")
    )
    for name in contract.slo.min_metrics:
        if name in suite:
            return name, True
    for name in contract.slo.max_metrics:
        if name in suite:
            return name, False
    headline = suite[0] if contract.task.type == "classification" else "rmse"
    return headline, headline not in LOWER_IS_BETTER


def decide(contract: Contract, champion: Arm, challenger: Arm, *, seed: int = 0) -> Verdict:
    """The verdict on ``challenger`` against ``champion`` (module docstring)."""
    metric, higher = verdict_metric(contract)
    task = contract.task.type
    rng = np.random.default_rng(seed)
    accuracy = metric == "accuracy"
    method = (
        f"z-test of the accuracy difference (unpooled standard error, two-sided, alpha {ALPHA:g}) on a "
        f"fixed sample sized for power {POWER:g}"
        if accuracy
        else f"percentile bootstrap of the {metric} difference ({BOOTSTRAP} resamples, two-sided, alpha "
        f"{ALPHA:g}) on a fixed sample sized for power {POWER:g}"
    )
    budget = contract.slo.latency_p99_ms
    method += f"; latency: the router's p99 of each arm against slo.latency_p99_ms ({budget:g} ms)"
    reports = {arm.name: _report(task, arm, metric) for arm in (champion, challenger)}
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    # The sample size is fixed by the champion's first PILOT_ROWS rows (its variance there, and the
    # tolerance at its value there): later rows never move it, so the test's size stays fixed.
    pilot = _first(champion, PILOT_ROWS)
    pilot_value = _report(task, pilot, metric).metrics.get(metric) if pilot.rows else None
    tolerance = contract.slo.tolerance(metric)
    delta = max(tolerance.allowance(pilot_value if pilot_value is not None else 0.0), MIN_DETECTABLE)
    if accuracy:
        p = pilot_value if pilot_value is not None and pilot.rows >= MIN_ROWS else 0.5
        variance = 2 * p * (1 - p)
    else:
        known = pilot.rows >= MIN_ROWS
        variance = 2 * pilot.rows * float(np.var(_bootstrap(task, pilot, metric, rng))) if known else math.inf
    required = MIN_ROWS if math.isinf(variance) else max(MIN_ROWS, math.ceil(z**2 * variance / delta**2))
    verdict = Verdict("not enough data", metric, higher, method, required, arms=reports)
    verdict.reasons.append(
        f"each arm needs {required} labelled rows to detect a difference of {delta:.4g} in {metric} "
        f"({tolerance.source})"
        + ("" if not math.isinf(variance) else f" (at least {MIN_ROWS} to estimate it)")
    )
    if min(champion.rows, challenger.rows) < required or math.isinf(variance):
        verdict.reasons.append(
            f"not enough data: champion has {champion.rows}, challenger {challenger.rows} labelled rows"
        )
        return verdict
    # A fixed-size test: decided on the first `required` rows of each arm, so reading the status
    # again as data arrives never raises the chance of a false "better" (no stopping on a peek).
    champion, challenger = _first(champion, required), _first(challenger, required)
    decided = {arm.name: _report(task, arm, metric) for arm in (champion, challenger)}
    values = (decided[champion.name].metrics[metric], decided[challenger.name].metrics[metric])
    if accuracy:
        difference, interval, p_value = _two_proportions(champion, challenger)
    else:
        boots = [_bootstrap(task, arm, metric, rng) for arm in (champion, challenger)]
        difference, interval, p_value = _bootstrap_difference(*values, *boots)
    verdict.difference, verdict.interval, verdict.p_value = difference, interval, p_value
    gain = (lambda x: x) if higher else (lambda x: -x)
    low, high = sorted((gain(interval[0]), gain(interval[1])))
    if low > 0:
        verdict.outcome = "challenger better"
    elif high < 0:
        verdict.outcome = "champion better"
    else:
        verdict.outcome = "no significant difference"
    verdict.reasons.append(
        f"{metric} on the first {required} labelled rows of each arm: challenger {values[1]:.4f} vs "
        f"champion {values[0]:.4f}, difference {difference:+.4f} "
        f"({1 - ALPHA:.0%} CI {interval[0]:+.4f} to {interval[1]:+.4f}, {_p(p_value)})"
    )
    broken = _slo_breaks(contract, reports[champion.name], reports[challenger.name])
    if broken and verdict.outcome == "challenger better":
        verdict.outcome = "challenger breaks an SLO"
    verdict.reasons += broken
    return verdict


def _first(arm: Arm, rows: int) -> Arm:
    return dataclasses.replace(arm, predictions=arm.predictions[:rows], labels=arm.labels[:rows])


def _p(p_value: float) -> str:
    return f"p = {p_value:.3g}" if p_value >= 1e-4 else "p < 0.0001"


def _report(task: str, arm: Arm, metric: str) -> ArmReport:
    metrics: dict[str, float] = {}
    interval = None
    if arm.rows:
        metrics = dict(evaluate_outputs(task, arm.predictions, arm.labels).metrics)
        if metric == "accuracy" and metric in metrics:
            p = _correct(arm).mean()
            half = stats.norm.ppf(1 - ALPHA / 2) * math.sqrt(p * (1 - p) / arm.rows)
            interval = (float(p - half), float(p + half))
    requests = arm.requests
    return ArmReport(
        name=arm.name,
        version=arm.version,
        requests=requests,
        errors=arm.errors,
        error_ratio=round(arm.errors / requests, 6) if requests else 0.0,
        p50_ms=arm.p50_ms,
        p99_ms=arm.p99_ms,
        labelled_rows=arm.rows,
        metrics={name: round(float(value), 6) for name, value in metrics.items()},
        interval=interval,
    )


def _correct(arm: Arm) -> np.ndarray:
    predicted = np.argmax(as_probabilities(np.asarray(arm.predictions, dtype=np.float64)), axis=1)
    return (predicted == np.asarray(arm.labels).astype(np.int64).reshape(-1)).astype(np.float64)


def _two_proportions(champion: Arm, challenger: Arm) -> tuple[float, tuple[float, float], float]:
    hits = [_correct(arm) for arm in (champion, challenger)]
    p1, p2 = (h.mean() for h in hits)
    n1, n2 = (len(h) for h in hits)
    # One standard error (unpooled) for the test and the interval: they never disagree.
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    difference = float(p2 - p1)
    if se == 0:
        return difference, (difference, difference), 0.0 if difference else 1.0
    p_value = float(2 * stats.norm.sf(abs(difference) / se))
    half = stats.norm.ppf(1 - ALPHA / 2) * se
    return difference, (difference - half, difference + half), p_value


def _bootstrap(task: str, arm: Arm, metric: str, rng: np.random.Generator) -> np.ndarray:
    values = np.empty(BOOTSTRAP)
    for i in range(BOOTSTRAP):
        pick = rng.integers(0, arm.rows, arm.rows)
        values[i] = evaluate_outputs(task, arm.predictions[pick], arm.labels[pick]).metrics[metric]
    return values


def _bootstrap_difference(
    champion_value: float, challenger_value: float, champion_boot: np.ndarray, challenger_boot: np.ndarray
) -> tuple[float, tuple[float, float], float]:
    """The difference, its percentile interval, and the two-sided p-value: twice the share of
    resampled differences on the other side of 0."""
    differences = challenger_boot - champion_boot
    low, high = np.quantile(differences, [ALPHA / 2, 1 - ALPHA / 2])
    other = differences <= 0 if challenger_value >= champion_value else differences >= 0
    p_value = min(1.0, 2 * float(np.mean(other)))
    return float(challenger_value - champion_value), (float(low), float(high)), p_value


def _slo_breaks(contract: Contract, champion: ArmReport, challenger: ArmReport) -> list[str]:
    broken = []
    budget = contract.slo.latency_p99_ms
    if challenger.p99_ms is not None and challenger.p99_ms > budget:
        broken.append(
            f"challenger p99 {challenger.p99_ms:.1f} ms breaks slo.latency_p99_ms {budget:g} ms "
            f"(champion {champion.p99_ms if champion.p99_ms is not None else 'n/a'} ms)"
        )
    if challenger.error_ratio > champion.error_ratio + ERROR_MARGIN:
        broken.append(
            f"challenger answered {challenger.error_ratio:.2%} of its requests with a server error, "
            f"champion {champion.error_ratio:.2%}"
        )
    return broken
