"""Which form `handoff optimize` serves (``handoff.form_choice``), rule by rule on hand-built
candidates, and the contract's ``slo.optimize``: each mistake named with its file, line and field,
and a contract without the section hashed exactly as before the section existed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from handoff.contract import DEFAULT_FORM_PARITY, OPTIMIZE_FORMS, Optimize, Slo, load_contract
from handoff.errors import HandoffError
from handoff.form_choice import Candidate, choose, judge

from .test_contract import line_of

pytestmark = pytest.mark.unit

# A complete contract without slo.optimize, written out here (not the template's) so its hash
# below stays what it was when contracts had no such section.
CONTRACT = """\
name: digits-classifier
task: classification
inputs:
  - name: image
    dtype: float32
    shape: [-1, 1, 8, 8]
outputs:
  - name: logits
    dtype: float32
    shape: [-1, 10]
slo:
  latency_p99_ms: 25
  latency_batch_size: 1
  min_metrics:
    accuracy: 0.95
  max_metrics:
    ece: 0.2
  parity_tolerance: 0.0001
  max_model_size_mb: 50
  champion_tolerance: 0.01
owners:
  research: Research Team
  engineering: platform-team
"""
# Contract.sha256 of CONTRACT as the contract code before slo.optimize computed it.
SHA256_BEFORE_OPTIMIZE = "7fbe457186f364f476819324e04926bd255ecf351401368699e5591083d92333"


def _write(folder: Path, optimize: str = "") -> Path:
    """CONTRACT in ``folder``, with ``optimize`` (YAML lines, indented under slo) appended to slo."""
    folder.mkdir(exist_ok=True)
    text = CONTRACT.replace("owners:\n", f"  optimize:\n{optimize}owners:\n") if optimize else CONTRACT
    (folder / "contract.yaml").write_text(text)
    return folder / "contract.yaml"


# --- the contract's slo.optimize ------------------------------------------------------------------


def test_a_contract_without_slo_optimize_hashes_as_before_the_section_existed(tmp_path: Path) -> None:
    _write(tmp_path)
    contract = load_contract(tmp_path)
    assert "optimize" not in contract.model_dump()["slo"]
    assert "optimize" not in contract.model_dump(mode="json")["slo"]
    assert contract.sha256 == SHA256_BEFORE_OPTIMIZE
    # Without the section: the exported model and its graph-optimized form only, nothing quantized.
    assert contract.slo.optimize is None
    assert contract.slo.optimizing == Optimize()
    assert contract.slo.optimizing.forms == ["fp32"]
    others = ("fp32_optimized", "int8_static", "int8_dynamic", "fp16")
    assert not any(contract.slo.optimizing.allows(form) for form in others)


def test_an_empty_slo_optimize_is_the_defaults_and_hashes_as_none(tmp_path: Path) -> None:
    """``optimize:`` with nothing under it is YAML null: the same contract as no section."""
    (tmp_path / "contract.yaml").write_text(CONTRACT.replace("owners:\n", "  optimize:\nowners:\n"))
    assert load_contract(tmp_path).sha256 == SHA256_BEFORE_OPTIMIZE


def test_adding_slo_optimize_changes_the_hash(tmp_path: Path) -> None:
    _write(tmp_path / "a", "    forms: [fp32_optimized]\n")
    _write(tmp_path / "b", "    forms: [fp32_optimized, fp16]\n")
    with_section, other_forms = load_contract(tmp_path / "a"), load_contract(tmp_path / "b")
    assert with_section.model_dump()["slo"]["optimize"]["forms"] == ["fp32_optimized"]
    assert len({SHA256_BEFORE_OPTIMIZE, with_section.sha256, other_forms.sha256}) == 3


def test_a_valid_slo_optimize_loads(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "    forms: [int8_static, fp16]\n"
        "    max_metric_drop: {accuracy: 0.01, ece: 0.02}\n"
        "    parity_tolerance: {fp16: 0.05}\n"
        "    min_speedup: 1.5\n",
    )
    optimize = load_contract(tmp_path).slo.optimizing
    assert optimize.forms == ["int8_static", "fp16"]
    assert optimize.max_metric_drop == {"accuracy": 0.01, "ece": 0.02}
    assert optimize.min_speedup == 1.5
    assert optimize.parity("fp16") == 0.05
    assert optimize.parity("int8_static") == DEFAULT_FORM_PARITY["int8_static"]
    assert optimize.allows("fp32")  # always: every other form is measured against it
    assert not optimize.allows("int8_dynamic")


@pytest.mark.parametrize(
    ("optimize", "at", "expected"),
    [
        (
            "    forms: [fp32_optimized, int4]\n",
            "forms:",
            "slo.optimize.forms[1]: Input should be 'fp32', 'fp32_optimized', 'int8_static', "
            "'int8_dynamic' or 'fp16' (found 'int4')",
        ),
        (
            "    max_metric_drop:\n      accuracy: -0.01\n",
            "accuracy: -0.01",
            "slo.optimize.max_metric_drop.accuracy: must be >= 0, the most accuracy may fall (found -0.01)",
        ),
        (
            "    max_metric_drop:\n      accuracy: .nan\n",
            "accuracy: .nan",
            "slo.optimize.max_metric_drop.accuracy: must be >= 0, the most accuracy may fall (found nan)",
        ),
        (
            "    parity_tolerance:\n      fp16: 0\n",
            "fp16: 0",
            "slo.optimize.parity_tolerance.fp16: must be > 0 (found 0)",
        ),
        (
            "    parity_tolerance:\n      int8_static: -0.5\n",
            "int8_static: -0.5",
            "slo.optimize.parity_tolerance.int8_static: must be > 0 (found -0.5)",
        ),
        (
            "    min_speedup: 0.9\n",
            "min_speedup",
            "slo.optimize.min_speedup: Input should be greater than or equal to 1 (found 0.9)",
        ),
        (
            "    form: [fp16]\n",
            "form:",
            "slo.optimize.form: Extra inputs are not permitted",
        ),
    ],
    ids=[
        "unknown-form",
        "negative-drop",
        "nan-drop",
        "zero-parity",
        "negative-parity",
        "speedup-below-one",
        "typo",
    ],
)
def test_a_malformed_slo_optimize_names_file_line_and_field(
    tmp_path: Path, optimize: str, at: str, expected: str
) -> None:
    path = _write(tmp_path, optimize)
    with pytest.raises(HandoffError) as raised:
        load_contract(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{path}: line {line_of(path, at)}: {expected}"), message


def test_the_template_contracts_allow_every_form() -> None:
    """The starters' contracts (what a new project gets) ask optimize to try every form, with a
    drop allowed on the metric each gates."""
    starters = Path(__file__).resolve().parents[1] / "{{cookiecutter.project}}" / "starters"
    seen = 0
    for path in sorted(starters.glob("*/contract.yaml")):
        slo = yaml.safe_load(re.sub(r"\{\{.*?\}\}", '"x"', path.read_text()))["slo"]  # unrendered
        assert {"fp32", *slo["optimize"]["forms"]} == set(OPTIMIZE_FORMS), path
        assert set(slo["optimize"]["max_metric_drop"]) <= {*slo["min_metrics"], *slo["max_metrics"]}, path
        seen += 1
    assert seen == 3


# --- form_choice: which candidate is served ---------------------------------------------------


def slo(**optimize: Any) -> Slo:
    """Objectives like a classifier's (accuracy and macro_f1 >= 0.9, ece <= 0.1, p99 <= 25 ms, 50 MB)
    and ``optimize``."""
    return Slo.model_validate(
        {
            "latency_p99_ms": 25,
            "min_metrics": {"accuracy": 0.9, "macro_f1": 0.9},
            "max_metrics": {"ece": 0.1},
            "max_model_size_mb": 50,
            "optimize": optimize,
        }
    )


FP32_METRICS = {"accuracy": 0.95, "macro_f1": 0.94, "ece": 0.05, "val_loss": 0.2}


def made(
    form: str,
    p50: float,
    *,
    p99: float | None = None,
    size: int = 1_000_000,
    parity: float = 0.0,
    tolerance: float | None = None,
    metrics: dict[str, float] | None = None,
) -> Candidate:
    """A made form that keeps every SLO (p99 twice its p50 by default) and equals fp32 on every
    metric but those in ``metrics``."""
    return Candidate(
        form,
        made=True,
        size_bytes=size,
        sha256=form,
        parity_max_abs_diff=parity,
        parity_tolerance=DEFAULT_FORM_PARITY[form] if tolerance is None else tolerance,
        latency_p50_ms=p50,
        latency_p99_ms=p50 * 2 if p99 is None else p99,
        metrics={**FP32_METRICS, **(metrics or {})},
    )


def test_the_fastest_kept_form_wins() -> None:
    rules = slo(forms=["fp32_optimized", "int8_static", "int8_dynamic", "fp16"])
    candidates = [
        made("fp32", 1.0, size=4_000_000),
        made("fp32_optimized", 0.8, size=4_000_000),
        made("int8_static", 0.4, size=1_000_000),
        made("int8_dynamic", 0.6, size=1_000_000),
        made("fp16", 0.5, size=2_000_000),
    ]
    choice = choose(rules, candidates)
    assert choice.form == "int8_static"
    assert choice.reason == (
        "int8_static: 2.50x fp32's speed (p50 0.400 vs 1.000 ms), 4.00x smaller, "
        "keeping every SLO and allowed drop"
    )
    assert [j.candidate.form for j in choice.judged] == [c.form for c in candidates]
    assert all(j.kept and j.why_not == [] for j in choice.judged)


def test_the_fastest_form_that_breaks_a_rule_loses_to_the_next_fastest_kept_one() -> None:
    rules = slo(forms=["int8_static", "fp16"])
    choice = choose(
        rules,
        [
            made("fp32", 1.0),
            made("int8_static", 0.3, metrics={"accuracy": 0.93}),  # 0.02 below fp32, no drop allowed
            made("fp16", 0.5),
        ],
    )
    assert choice.form == "fp16"
    assert choice.reason.startswith("fp16: 2.00x fp32's speed")


def test_a_form_less_than_min_speedup_faster_loses_to_fp32() -> None:
    rules = slo(forms=["fp32_optimized", "fp16"], min_speedup=1.2)
    choice = choose(rules, [made("fp32", 1.0), made("fp32_optimized", 0.9), made("fp16", 0.95)])
    assert choice.form == "fp32"
    assert choice.reason == (
        "fp32: the fastest form that keeps every SLO, fp32_optimized, is 1.11x fp32's p50, "
        "short of slo.optimize.min_speedup 1.2"
    )
    # Every form was kept: only the speed-up was missing.
    assert all(j.kept for j in choice.judged)


def test_min_speedup_defaults_to_ten_percent() -> None:
    rules = slo(forms=["fp32_optimized"])
    assert rules.optimizing.min_speedup == 1.1
    assert choose(rules, [made("fp32", 1.0), made("fp32_optimized", 0.95)]).form == "fp32"
    assert choose(rules, [made("fp32", 1.0), made("fp32_optimized", 0.8)]).form == "fp32_optimized"


def test_when_fp32_breaks_the_latency_slo_a_form_that_keeps_it_wins_without_min_speedup() -> None:
    rules = slo(forms=["int8_static"], min_speedup=2.0)
    choice = choose(rules, [made("fp32", 20.0, p99=30.0), made("int8_static", 19.0, p99=24.0)])
    assert choice.form == "int8_static"  # 1.05x fp32's p50, short of min_speedup 2: still served
    assert choice.reason == (
        "int8_static: fp32 breaks latency p99 30.00 ms > slo.latency_p99_ms 25 ms at batch 1 "
        "(over by 5.00 ms), int8_static keeps every SLO"
    )
    fp32 = choice.judged[0]
    assert not fp32.kept and len(fp32.why_not) == 1


def test_when_no_form_keeps_the_slos_fp32_is_served_with_each_forms_reason() -> None:
    rules = slo(forms=["int8_static", "fp16"])
    choice = choose(
        rules,
        [
            made("fp32", 20.0, p99=30.0),
            made("int8_static", 19.0, p99=26.0),
            Candidate("fp16", made=False, reason="ONNX Runtime's tools failed: ValueError: no"),
        ],
    )
    assert choice.form == "fp32"
    assert choice.reason == (
        "fp32: int8_static: latency p99 26.00 ms > slo.latency_p99_ms 25 ms at batch 1 (over by 1.00 ms); "
        "fp16: ONNX Runtime's tools failed: ValueError: no"
    )


def test_a_form_that_was_not_made_is_never_served_and_says_why() -> None:
    rules = slo(forms=["int8_static"])
    reason = "ONNX Runtime's quantizer quantized no op of this graph (Einsum): none is an op it quantizes"
    not_made = Candidate("int8_static", made=False, reason=reason)
    assert judge(rules, made("fp32", 1.0), not_made).why_not == [reason]
    choice = choose(rules, [made("fp32", 1.0), not_made])
    assert (choice.form, choice.reason) == ("fp32", f"fp32: int8_static: {reason}")


def test_only_fp32_allowed_serves_fp32_and_says_so() -> None:
    choice = choose(slo(forms=[]), [made("fp32", 1.0)])
    assert (choice.form, choice.reason) == ("fp32", "fp32: no other form is allowed")


def test_a_metric_drop_within_max_metric_drop_is_kept_and_beyond_it_named() -> None:
    rules = slo(forms=["int8_static"], max_metric_drop={"accuracy": 0.01})
    fp32 = made("fp32", 1.0)
    within = judge(rules, fp32, made("int8_static", 0.5, metrics={"accuracy": 0.941}))
    assert within.kept, within.why_not
    beyond = judge(rules, fp32, made("int8_static", 0.5, metrics={"accuracy": 0.93}))
    assert beyond.why_not == [
        "accuracy 0.9300 is 0.0200 worse than fp32's 0.9500 (slo.optimize.max_metric_drop.accuracy 0.01)"
    ]


def test_a_gated_metric_without_a_max_metric_drop_entry_may_not_drop_at_all() -> None:
    rules = slo(forms=["int8_static"], max_metric_drop={"accuracy": 0.01})
    fp32 = made("fp32", 1.0)
    dropped = judge(rules, fp32, made("int8_static", 0.5, metrics={"macro_f1": 0.9399}))
    assert dropped.why_not == [
        "macro_f1 0.9399 is 0.0001 worse than fp32's 0.9400 (slo.optimize.max_metric_drop has no "
        "macro_f1 entry, so it may not get worse)"
    ]
    assert judge(rules, fp32, made("int8_static", 0.5, metrics={"macro_f1": 0.95})).kept  # better is fine
    # A metric the contract does not gate (val_loss) may move: it is no SLO.
    assert judge(rules, fp32, made("int8_static", 0.5, metrics={"val_loss": 0.9})).kept


def test_max_metrics_are_lower_is_better() -> None:
    rules = slo(forms=["int8_static"], max_metric_drop={"ece": 0.01})
    fp32 = made("fp32", 1.0)  # ece 0.05
    worse = judge(rules, fp32, made("int8_static", 0.5, metrics={"ece": 0.07}))
    assert worse.why_not == [
        "ece 0.0700 is 0.0200 worse than fp32's 0.0500 (slo.optimize.max_metric_drop.ece 0.01)"
    ]
    assert judge(rules, fp32, made("int8_static", 0.5, metrics={"ece": 0.055})).kept  # within 0.01
    assert judge(rules, fp32, made("int8_static", 0.5, metrics={"ece": 0.01})).kept  # lower: better


def test_an_absolute_slo_applies_to_every_form_as_to_fp32() -> None:
    """A drop that max_metric_drop allows still may not take a metric below its floor."""
    rules = slo(forms=["int8_static"], max_metric_drop={"accuracy": 0.1})
    below = judge(rules, made("fp32", 1.0), made("int8_static", 0.5, metrics={"accuracy": 0.89}))
    assert below.why_not == ["accuracy 0.8900 below the minimum 0.9 by 0.0100 (slo.min_metrics.accuracy)"]
    big = judge(rules, made("fp32", 1.0), made("int8_static", 0.5, size=60_000_000))
    assert big.why_not == ["model.onnx 60.000 MB > slo.max_model_size_mb 50 MB"]


def test_parity_beyond_the_forms_tolerance_rejects_it() -> None:
    rules = slo(forms=["fp16"])
    fp32 = made("fp32", 1.0)
    at_tolerance = judge(rules, fp32, made("fp16", 0.5, parity=0.01, tolerance=0.01))
    assert at_tolerance.kept
    beyond = judge(rules, fp32, made("fp16", 0.5, parity=0.02, tolerance=0.01))
    assert beyond.why_not == [
        "differs from fp32 by 0.02 on the contract example, above slo.optimize.parity_tolerance.fp16 0.01"
    ]
    choice = choose(rules, [fp32, made("fp16", 0.5, parity=0.02, tolerance=0.01)])
    assert choice.form == "fp32" and "parity_tolerance.fp16" in choice.reason


def test_every_broken_rule_is_listed() -> None:
    rules = slo(forms=["int8_static"], max_metric_drop={"accuracy": 0.01})
    judged = judge(
        rules, made("fp32", 1.0), made("int8_static", 0.5, p99=40.0, parity=1.0, metrics={"accuracy": 0.8})
    )
    assert not judged.kept
    # The metric drop first (what a reader of the fallback looks for), then the SLOs, then parity.
    assert [why.split(" ")[0] for why in judged.why_not] == ["accuracy", "accuracy", "latency", "differs"]


def test_a_drop_named_for_an_ungated_metric_is_held_in_its_direction() -> None:
    """max_metric_drop may name a metric the SLOs do not gate: it is held too, lower-is-better for
    the suite's errors (ece), higher-is-better otherwise."""
    rules = Slo.model_validate(
        {
            "latency_p99_ms": 25,
            "min_metrics": {"accuracy": 0.9},
            "optimize": {"forms": ["int8_static"], "max_metric_drop": {"ece": 0.01, "macro_f1": 0.01}},
        }
    )
    fp32 = made("fp32", 1.0, metrics={"accuracy": 0.97, "ece": 0.02, "macro_f1": 0.96})
    worse = made("int8_static", 0.5, metrics={"accuracy": 0.97, "ece": 0.05, "macro_f1": 0.90})
    assert judge(rules, fp32, worse).why_not == [
        "ece 0.0500 is 0.0300 worse than fp32's 0.0200 (slo.optimize.max_metric_drop.ece 0.01)",
        "macro_f1 0.9000 is 0.0600 worse than fp32's 0.9600 (slo.optimize.max_metric_drop.macro_f1 0.01)",
    ]
    better = made("int8_static", 0.5, metrics={"accuracy": 0.97, "ece": 0.01, "macro_f1": 0.97})
    assert judge(rules, fp32, better).kept


def test_a_speedup_must_hold_in_every_round_timed() -> None:
    """At tens of microseconds a run, one burst of other work in one round looks like a speedup:
    a form that is min_speedup faster overall but not in every round loses to fp32."""
    rules = slo(forms=["fp32_optimized"])
    fp32 = dataclasses.replace(made("fp32", 1.0), round_p50_ms=[1.0, 1.0, 1.0])
    lucky = dataclasses.replace(made("fp32_optimized", 0.5), round_p50_ms=[0.4, 0.5, 1.0])
    choice = choose(rules, [fp32, lucky])
    assert choice.form == "fp32"
    assert choice.reason == (
        "fp32: the fastest form that keeps every SLO, fp32_optimized, is 2.00x fp32's p50 but not "
        "slo.optimize.min_speedup 1.1 faster in every round timed"
    )
    steady = dataclasses.replace(lucky, round_p50_ms=[0.5, 0.5, 0.6])
    assert choose(rules, [fp32, steady]).form == "fp32_optimized"
