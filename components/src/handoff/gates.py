"""The promotion gates: every SLO in the contract (absolute) and the registry's champion (relative).

Each gate is one named check with the measured value, the bound and the margin, so a failure
says which gate failed and by how much, and the readiness report and the registry tags show the
same verdicts the pipeline acted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from handoff.contract import Slo

LATENCY_CHECK = "latency_p99_ms"


@dataclass(frozen=True)
class GateCheck:
    """One gate: ``value`` against ``bound``; ``detail`` is the sentence a person reads."""

    name: str
    kind: str  # "absolute" (contract SLO) or "relative" (vs the champion)
    passed: bool
    detail: str


@dataclass(frozen=True)
class Gate:
    """The promotion verdict: passed only when every check passed; one reason per failed check."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[GateCheck] = field(default_factory=list)


@dataclass(frozen=True)
class Champion:
    """The registry's current champion, scored on the same held-out data as the challenger."""

    version: str
    metrics: dict[str, float]


def _bound(name: str, value: float | None, bound: float, at_least: bool, where: str) -> GateCheck:
    if value is None:
        return GateCheck(name, "absolute", False, f"{name} was not produced ({where} asks for it)")
    ok = value >= bound if at_least else value <= bound
    sign = ">=" if at_least else "<="
    if ok:
        return GateCheck(name, "absolute", True, f"{name} {value:.4f} {sign} {bound:g}")
    margin = bound - value if at_least else value - bound
    word = "below the minimum" if at_least else "above the maximum"
    detail = f"{name} {value:.4f} {word} {bound:g} by {margin:.4f} ({where})"
    return GateCheck(name, "absolute", False, detail)


def absolute_checks(
    slo: Slo, metrics: dict[str, float], latency_p99_ms: float, model_size_mb: float
) -> list[GateCheck]:
    """Every objective in the contract's ``slo``."""
    checks = [
        _bound(name, metrics.get(name), bound, True, f"slo.min_metrics.{name}")
        for name, bound in sorted(slo.min_metrics.items())
    ]
    checks += [
        _bound(name, metrics.get(name), bound, False, f"slo.max_metrics.{name}")
        for name, bound in sorted(slo.max_metrics.items())
    ]
    latency = latency_p99_ms <= slo.latency_p99_ms
    checks.append(
        GateCheck(
            LATENCY_CHECK,
            "absolute",
            latency,
            f"latency p99 {latency_p99_ms:.2f} ms {'<=' if latency else '>'} slo.latency_p99_ms "
            f"{slo.latency_p99_ms:g} ms at batch {slo.latency_batch_size}"
            + ("" if latency else f" (over by {latency_p99_ms - slo.latency_p99_ms:.2f} ms)"),
        )
    )
    if slo.max_model_size_mb is not None:
        size = model_size_mb <= slo.max_model_size_mb
        checks.append(
            GateCheck(
                "model_size_mb",
                "absolute",
                size,
                f"model.onnx {model_size_mb:.3f} MB {'<=' if size else '>'} slo.max_model_size_mb "
                f"{slo.max_model_size_mb:g} MB",
            )
        )
    return checks


def relative_checks(slo: Slo, metrics: dict[str, float], champion: Champion | None) -> list[GateCheck]:
    """Challenger vs champion on each gated metric, allowing ``slo.champion_tolerance``.

    Without a champion (the first model, or one whose metrics are missing) there is nothing to
    compare and the absolute gates decide alone.
    """
    if champion is None:
        first = "no champion in the registry yet: the absolute gates decide"
        return [GateCheck("champion", "relative", True, first)]
    checks = []
    tolerance = slo.champion_tolerance
    gated = [(n, True) for n in sorted(slo.min_metrics)] + [(n, False) for n in sorted(slo.max_metrics)]
    for name, higher_is_better in gated:
        ours, theirs = metrics.get(name), champion.metrics.get(name)
        if ours is None or theirs is None:
            continue  # the absolute check already reports a missing metric
        worse_by = (theirs - ours) if higher_is_better else (ours - theirs)
        ok = worse_by <= tolerance
        verdict = f"within the tolerance {tolerance:g}" if ok else f"worse by {worse_by:.4f} > {tolerance:g}"
        detail = f"{name} {ours:.4f} vs champion v{champion.version} {theirs:.4f}: {verdict}"
        detail += " (slo.champion_tolerance)"
        checks.append(GateCheck(f"champion.{name}", "relative", ok, detail))
    return checks


def decide(checks: list[GateCheck]) -> Gate:
    reasons = [c.detail for c in checks if not c.passed]
    return Gate(passed=not reasons, reasons=reasons, checks=checks)
