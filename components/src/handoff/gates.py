"""The promotion gates: every SLO in the contract (absolute), the registry's champion (relative),
and the contract itself (the contract checks that ran on the model evaluated).

Each gate is one named check with the measured value, the bound and the margin, so a failure
says which gate failed and by how much, and the readiness report and the registry tags show the
same verdicts the pipeline acted on.

The relative gate compares only like with like: the champion is scored on the challenger's
held-out split, which is the champion's own only when both were evaluated on the same items
(the sha256 each evaluation records). A split that moved with a seed in Config would score the
champion on what it was trained on, so that comparison is refused, not made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from handoff.contract import Slo, Tolerance
from handoff.lineage import HELDOUT_TAG

LATENCY_CHECK = "latency_p99_ms"
CONTRACT_CHECK = "contract"


@dataclass(frozen=True)
class GateCheck:
    """One gate: ``value`` against ``bound``; ``detail`` is the sentence a person reads."""

    name: str
    kind: str  # "absolute" (contract SLO), "relative" (vs the champion) or "contract" (conformance)
    passed: bool
    detail: str


@dataclass(frozen=True)
class Gate:
    """The promotion verdict: passed only when every check passed; one reason per failed check."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[GateCheck] = field(default_factory=list)


# Metrics are rounded to 6 decimals: a shortfall equal to the allowance must not fail on float noise.
ROUNDING = 1e-9


@dataclass(frozen=True)
class Champion:
    """The registry's current champion, scored on the same held-out data as the challenger.

    ``heldout_sha256`` is the split the champion was evaluated on (its registry tag; None for a
    version registered before splits were recorded). ``metrics`` is empty when that split is not
    the challenger's: the champion was not scored.
    """

    name: str
    version: str
    metrics: dict[str, float]
    heldout_sha256: str | None = None


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


def relative_checks(
    slo: Slo, metrics: dict[str, float], champion: Champion | None, heldout_sha256: str
) -> list[GateCheck]:
    """Challenger vs champion on each gated metric, within ``slo.champion_tolerance``.

    Without a champion (the first model, or one whose metrics are missing) there is nothing to
    compare and the absolute gates decide alone. A champion evaluated on another held-out split
    than ``heldout_sha256`` is not compared: one failed check says why and what to do.
    """
    if champion is None:
        first = "no champion in the registry yet: the absolute gates decide"
        return [GateCheck("champion", "relative", True, first)]
    if champion.heldout_sha256 is not None and champion.heldout_sha256 != heldout_sha256:
        return [GateCheck("champion.heldout", "relative", False, _other_split(champion, heldout_sha256))]
    note = ""
    if champion.heldout_sha256 is None:
        note = (
            f"; champion v{champion.version} has no {HELDOUT_TAG} tag (registered before handoff "
            "recorded held-out splits), so it is assumed to be scored on the same split"
        )
    checks = []
    gated = [(n, True) for n in sorted(slo.min_metrics)] + [(n, False) for n in sorted(slo.max_metrics)]
    for name, higher_is_better in gated:
        ours, theirs = metrics.get(name), champion.metrics.get(name)
        if ours is None or theirs is None:
            continue  # the absolute check already reports a missing metric
        ok, verdict = _versus(ours, theirs, higher_is_better, slo.tolerance(name))
        detail = f"{name} {ours:.4f} vs champion v{champion.version} {theirs:.4f}: {verdict}{note}"
        checks.append(GateCheck(f"champion.{name}", "relative", ok, detail))
    return checks


def _versus(ours: float, theirs: float, higher_is_better: bool, tolerance: Tolerance) -> tuple[bool, str]:
    """Whether ``ours`` trails ``theirs`` by no more than the tolerance allows, and the sentence
    that says by how much, the allowance, and whether it was absolute or relative and set where."""
    allowance = tolerance.allowance(theirs)
    worse_by = (theirs - ours) if higher_is_better else (ours - theirs)
    ok = worse_by <= allowance + ROUNDING
    if worse_by > 0:
        moved = f"worse by {worse_by:.4f}"
    else:
        moved = f"better by {-worse_by:.4f}" if worse_by < 0 else "equal"
    how = (
        f"relative tolerance {tolerance.amount:g}% of {theirs:.4f}"
        if tolerance.relative
        else "absolute tolerance"
    )
    within = "within" if ok else "more than"
    return ok, f"{moved}, {within} the allowance {allowance:.4f} ({how}, {tolerance.source})"


def _other_split(champion: Champion, heldout_sha256: str) -> str:
    """Why a champion evaluated on other held-out items is not compared, and the two ways out."""
    from handoff.tracking import CHAMPION

    return (
        f"not comparable: this model was evaluated on held-out data {heldout_sha256[:12]}, champion "
        f"v{champion.version} on {(champion.heldout_sha256 or '')[:12]} (its {HELDOUT_TAG} tag), so "
        "the champion would be scored on other items, perhaps its own training data. Usually "
        "the seed of the split (the starters' Config.split_seed), the validation share "
        "(val_fraction) or the data changed: keep the held-out split fixed, or, to make this "
        "model's split the new baseline, remove the champion alias first: "
        f"MlflowClient().delete_registered_model_alias({champion.name!r}, {CHAMPION!r})"
    )


def contract_check(failures: list[str], passed: str) -> GateCheck:
    """Whether the model evaluated conforms to contract.yaml: ``failures`` says, one sentence per
    check, what failed or did not run (``handoff.readiness.contract_gate`` gathers them); ``passed``
    is the sentence when nothing did. The model server and deploy's smoke test refuse what breaks
    the contract, so promoting such a model would only move the failure to the rollout."""
    if failures:
        return GateCheck(CONTRACT_CHECK, "contract", False, f"{CONTRACT_CHECK}: {'; '.join(failures)}")
    return GateCheck(CONTRACT_CHECK, "contract", True, f"{CONTRACT_CHECK}: {passed}")


def decide(checks: list[GateCheck]) -> Gate:
    reasons = [c.detail for c in checks if not c.passed]
    return Gate(passed=not reasons, reasons=reasons, checks=checks)
