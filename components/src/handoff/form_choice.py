"""Which form of the model to serve: the fastest candidate that keeps every SLO and every allowed
metric drop (``slo.optimize``), fp32 when none does. Pure, so each rule is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from handoff.contract import Slo
from handoff.gates import absolute_checks

# The suite's metrics where less is better (errors and losses): the direction of a drop in one that
# max_metric_drop names without gating it.
LOWER_IS_BETTER = frozenset({"ece", "val_loss", "mae", "rmse"})


@dataclass(frozen=True)
class Candidate:
    """One form, as measured: made or not (and why), then its size, parity with fp32, latency at
    the contract's batch size and held-out metrics."""

    form: str
    made: bool
    reason: str = ""  # why it was not made, or why it may not be served ("" when it may)
    size_bytes: int = 0
    sha256: str = ""
    parity_max_abs_diff: float | None = None  # max |fp32 ONNX - this form| on the contract example
    parity_tolerance: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    # p50 of each interleaved round of timings: a speedup counts only if it holds in every round.
    round_p50_ms: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Judged:
    candidate: Candidate
    kept: bool  # keeps every SLO and every allowed drop: it may be served
    why_not: list[str]  # the broken rules, one sentence each ([] when kept)


def judge(slo: Slo, fp32: Candidate, candidate: Candidate) -> Judged:
    """Every rule ``candidate`` breaks: not made, a gated metric falling further below fp32's than
    ``max_metric_drop`` allows, an SLO of the contract, or parity beyond its form's tolerance."""
    if not candidate.made:
        return Judged(candidate, False, [candidate.reason])
    why: list[str] = []
    if candidate.form != "fp32":  # what a form costs in quality first: the rule a reader looks for
        why += _drops(slo, fp32.metrics, candidate.metrics)
    assert candidate.latency_p99_ms is not None
    checks = absolute_checks(slo, candidate.metrics, candidate.latency_p99_ms, candidate.size_bytes / 1e6)
    why += [c.detail for c in checks if not c.passed]
    diff, tolerance = candidate.parity_max_abs_diff, candidate.parity_tolerance
    if diff is not None and tolerance is not None and not diff <= tolerance:
        why.append(
            f"differs from fp32 by {diff:.3g} on the contract example, above "
            f"slo.optimize.parity_tolerance.{candidate.form} {tolerance:g}"
        )
    return Judged(candidate, not why, why)


def _drops(slo: Slo, reference: dict[str, float], metrics: dict[str, float]) -> list[str]:
    """Each gated metric, and each other one ``max_metric_drop`` names, that fell further below
    fp32's value than it allows (0 for a gated metric it does not name)."""
    allowed = slo.optimizing.max_metric_drop
    broken = []
    gated = [(n, True) for n in sorted(slo.min_metrics)] + [(n, False) for n in sorted(slo.max_metrics)]
    named = {n for n, _ in gated}
    gated += [(n, n not in LOWER_IS_BETTER) for n in sorted(allowed) if n not in named]
    for name, higher_is_better in gated:
        ours, theirs = metrics.get(name), reference.get(name)
        if ours is None or theirs is None:
            continue  # the absolute check reports a missing metric
        drop = theirs - ours if higher_is_better else ours - theirs
        limit = allowed.get(name, 0.0)
        if drop > limit + 1e-12:
            where = (
                f"slo.optimize.max_metric_drop.{name} {limit:g}"
                if name in allowed
                else (f"slo.optimize.max_metric_drop has no {name} entry, so it may not get worse")
            )
            broken.append(f"{name} {ours:.4f} is {drop:.4f} worse than fp32's {theirs:.4f} ({where})")
    return broken


@dataclass(frozen=True)
class Choice:
    form: str
    reason: str  # one sentence: why this form (and, for fp32, why no other)
    judged: list[Judged]


def choose(slo: Slo, candidates: list[Candidate]) -> Choice:
    """The fastest kept form (p50 at the contract's batch size) that beats fp32 by
    ``slo.optimize.min_speedup`` (in every round timed); any kept form when fp32 itself breaks an
    SLO it keeps; else fp32."""
    (fp32,) = [c for c in candidates if c.form == "fp32"]
    judged = [judge(slo, fp32, c) for c in candidates]
    base = next(j for j in judged if j.candidate.form == "fp32")
    assert fp32.latency_p50_ms is not None
    speedup = slo.optimizing.min_speedup
    others = sorted(
        (j for j in judged if j.kept and j.candidate.form != "fp32"),
        key=lambda j: j.candidate.latency_p50_ms or 0.0,
    )
    if not base.kept and others:
        best = others[0].candidate
        why = f"fp32 breaks {'; '.join(base.why_not)}, {best.form} keeps every SLO"
        return Choice(best.form, f"{best.form}: {why}", judged)
    fast = [j for j in others if _faster(j.candidate, fp32, speedup)]
    if fast:
        best = fast[0].candidate
        why = f"{_versus(best, fp32)}, keeping every SLO and allowed drop"
        return Choice(best.form, f"{best.form}: {why}", judged)
    if others:
        best = others[0].candidate
        ratio = fp32.latency_p50_ms / (best.latency_p50_ms or fp32.latency_p50_ms)
        why = (
            f"the fastest form that keeps every SLO, {best.form}, is {ratio:.2f}x fp32's p50, "
            f"short of slo.optimize.min_speedup {speedup:g}"
        )
        if ratio >= speedup:
            why = (
                f"the fastest form that keeps every SLO, {best.form}, is {ratio:.2f}x fp32's p50 but "
                f"not slo.optimize.min_speedup {speedup:g} faster in every round timed"
            )
    else:
        tried = [j for j in judged if j.candidate.form != "fp32"]
        why = (
            "; ".join(f"{j.candidate.form}: {', '.join(j.why_not)}" for j in tried)
            or "no other form is allowed"
        )
    return Choice("fp32", f"fp32: {why}", judged)


def _faster(candidate: Candidate, fp32: Candidate, speedup: float) -> bool:
    """``speedup`` times faster than fp32 at p50, overall and in every interleaved round timed:
    at tens of microseconds a run, one burst of other work during one form's runs looks like a
    speedup that the served model would never show."""
    assert candidate.latency_p50_ms is not None and fp32.latency_p50_ms is not None
    rounds = zip(candidate.round_p50_ms, fp32.round_p50_ms, strict=False)
    return candidate.latency_p50_ms * speedup <= fp32.latency_p50_ms and all(
        ours * speedup <= theirs for ours, theirs in rounds
    )


def _versus(best: Candidate, fp32: Candidate) -> str:
    assert best.latency_p50_ms and fp32.latency_p50_ms
    faster = fp32.latency_p50_ms / best.latency_p50_ms
    smaller = fp32.size_bytes / best.size_bytes if best.size_bytes else 1.0
    return (
        f"{faster:.2f}x fp32's speed (p50 {best.latency_p50_ms:.3f} vs {fp32.latency_p50_ms:.3f} ms), "
        f"{smaller:.2f}x smaller"
    )
