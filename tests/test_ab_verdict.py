"""The A/B verdict's statistics, the router's arm choice and feedback's join, on known data: a
verdict a person could check by hand (sample sizes from the textbook formula, a clear winner, a
tie, a winner that breaks its latency SLO) and the messages a caller sees."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from handoff.ab_verdict import MIN_ROWS, Arm, decide
from handoff.contract import load_contract
from handoff.errors import HandoffError
from handoff.feedback import BadFeedback, joined, parse
from handoff.payload_log import Window
from handoff.serving.ab_router import Router, arm_for

from .conftest import replace_in

pytestmark = pytest.mark.unit

MODEL = "digits-classifier"


@pytest.fixture
def contract(project: Path):  # type: ignore[no-untyped-def]
    replace_in(project / "contract.yaml", "champion_tolerance: 0.01", "champion_tolerance: 0.05")
    return load_contract(project)


def classifier_arm(name: str, accuracy: float, rows: int, seed: int, p99_ms: float = 5.0) -> Arm:
    """Rows of 10-class scores that are right for ``accuracy`` of them (exactly)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, rows)
    predicted = labels.copy()
    wrong = rng.permutation(rows)[: round(rows * (1 - accuracy))]
    predicted[wrong] = (labels[wrong] + 1) % 10
    scores = np.eye(10, dtype=np.float32)[predicted] * 5
    return Arm(name, "1" if name == "champion" else "2", rows, 0, 2.0, p99_ms, scores, labels)


def longer(arm: Arm, extra: Arm) -> Arm:
    """``arm`` with ``extra``'s rows logged after its own."""
    predictions = np.concatenate([arm.predictions, extra.predictions])
    return dataclasses.replace(
        arm, predictions=predictions, labels=np.concatenate([arm.labels, extra.labels])
    )


def test_too_little_data_is_not_enough_data_with_the_sample_it_needs(contract) -> None:  # type: ignore[no-untyped-def]
    verdict = decide(
        contract, classifier_arm("champion", 0.8, 150, 1), classifier_arm("challenger", 0.9, 150, 2)
    )
    # n = (z_.975 + z_.8)^2 * 2 p (1 - p) / delta^2 with p = 0.8 (champion), delta = 0.05
    expected = math.ceil((1.959964 + 0.841621) ** 2 * 2 * 0.8 * 0.2 / 0.05**2)
    assert verdict.outcome == "not enough data"
    assert verdict.required_rows == expected
    assert f"each arm needs {expected} labelled rows" in verdict.reasons[0]
    assert "slo.champion_tolerance" in verdict.reasons[0]
    assert "champion has 150, challenger 150 labelled rows" in verdict.reasons[1]


def test_a_clearly_better_challenger_wins_and_a_tie_is_no_difference(contract) -> None:  # type: ignore[no-untyped-def]
    champion = classifier_arm("champion", 0.80, 1500, 1)
    better = decide(contract, champion, classifier_arm("challenger", 0.90, 1500, 2))
    assert better.outcome == "challenger better"
    assert better.difference == pytest.approx(0.10, abs=0.04)
    assert f"accuracy on the first {better.required_rows} labelled rows of each arm" in better.reasons[1]
    assert better.interval is not None and better.interval[0] > 0 and better.p_value is not None
    assert better.p_value < 1e-6
    assert better.arms["challenger"].metrics["accuracy"] == pytest.approx(0.9, abs=1e-3)
    assert "z-test of the accuracy difference (unpooled standard error" in better.method
    assert better.p_value < 0.05 and better.interval[0] > 0  # one standard error: they agree
    # A fixed-size test: more data after the required sample does not move the verdict.
    challenger = classifier_arm("challenger", 0.90, 1500, 2)
    later = [longer(arm, classifier_arm(arm.name, 0.5, 1500, 9)) for arm in (champion, challenger)]
    more = decide(contract, *later)
    assert (more.difference, more.p_value) == (better.difference, better.p_value)
    tie = decide(contract, champion, classifier_arm("challenger", 0.80, 1500, 3))
    assert tie.outcome == "no significant difference"
    worse = decide(contract, champion, classifier_arm("challenger", 0.70, 1500, 4))
    assert worse.outcome == "champion better"


def test_a_better_challenger_over_the_latency_slo_is_not_called_better(contract) -> None:  # type: ignore[no-untyped-def]
    slow = classifier_arm("challenger", 0.95, 1500, 2, p99_ms=contract.slo.latency_p99_ms * 2)
    verdict = decide(contract, classifier_arm("champion", 0.80, 1500, 1), slow)
    assert verdict.outcome == "challenger breaks an SLO"
    assert any("breaks slo.latency_p99_ms" in reason for reason in verdict.reasons)


def test_other_metrics_are_bootstrapped(contract) -> None:  # type: ignore[no-untyped-def]
    contract.slo.min_metrics.clear()
    contract.slo.max_metrics["ece"] = 0.5
    champion = classifier_arm("champion", 0.5, 2000, 1)
    verdict = decide(contract, champion, classifier_arm("challenger", 0.95, 2000, 2))
    assert verdict.metric == "ece" and not verdict.higher_is_better
    assert "percentile bootstrap" in verdict.method
    assert verdict.required_rows >= MIN_ROWS
    assert verdict.outcome == "challenger better", verdict.reasons


def test_arms_stick_to_a_key_and_split_by_share() -> None:
    router = Router(
        model_name="m",
        arms={"champion": {"version": "1", "url": ""}, "challenger": {"version": "2", "url": ""}},
        share=20,
        key_header="X-User",
        max_request_bytes=1 << 20,
    )
    users = [f"user-{i}" for i in range(4000)]
    arms = [router.choose({b"x-user": u.encode()}, b"{}", None) for u in users]
    assert arms == [router.choose({b"x-user": u.encode()}, b"{}", None) for u in users]  # sticky
    assert arms.count("challenger") / len(arms) == pytest.approx(0.2, abs=0.02)
    # Without the header, the V2 request id is the key; an explicit version goes to its arm.
    body = b'{"id": "req-7", "inputs": []}'
    assert router.choose({}, body, None) == arm_for("req-7", 20)
    assert router.choose({b"x-user": b"user-1"}, body, "2") == "challenger"


def test_feedback_joins_by_request_and_row_and_refuses_what_it_cannot_record() -> None:
    window = Window(
        ts=np.zeros(3, "datetime64[ms]"),
        request_ids=["a", "a", "b"],
        versions=["1", "1", "1"],
        outputs={"logits": [np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([1.0, 0.0])]},
    )
    found = joined(window, {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0])}, "logits")
    assert found.requests == 1 and found.mismatched == 1  # b has 1 row logged, 2 labels: left out
    assert found.labels.tolist() == [1.0, 0.0] and found.predictions.shape == (2, 2)
    assert parse(b'[{"id": "a", "labels": [1, 0]}]')[0][1].tolist() == [1.0, 0.0]
    with pytest.raises(BadFeedback, match=r"labels must hold numbers .* found \[\[1, 2\], \[3\]\]"):
        parse(b'{"id": "a", "labels": [[1, 2], [3]]}')
    with pytest.raises(BadFeedback, match=r"the feedback.id must be the inference response's id"):
        parse(b'{"id": 3, "labels": [1]}')


def test_a_cluster_ab_test_needs_the_collectors_store_and_a_real_share(project: Path) -> None:
    from handoff.ab import start

    with pytest.raises(HandoffError, match=r"--share is the challenger's percent .* 1 to 99; got 0"):
        start(project, "2", share=0, cluster=True)
    with pytest.raises(
        HandoffError, match=r"monitoring.store: on a cluster each arm is scored from the payload collector's"
    ):
        start(project, "2", cluster=True)


def test_a_verdict_needs_the_scored_output_in_the_logged_responses(project: Path) -> None:
    """A postprocess that answers with other outputs (raw.outputs) leaves nothing to score: said so."""
    from dataclasses import asdict

    from handoff.ab import status
    from handoff.ab_state import AB_FILE, AbTest
    from handoff.files import write_json
    from handoff.payload_log import PayloadLog, payload_store
    from handoff.project import Project

    loaded = Project.load(project)
    log = PayloadLog(payload_store(loaded), model=MODEL, version="2", sample_rate=1.0, max_bytes=1 << 20)
    answered = {"label": np.array([b"three", b"five"], object)}
    log.offer({"image": np.zeros((2, 1, 8, 8), np.float32)}, answered, "r1")
    log.close()
    ab = AbTest(MODEL, "1", "2", 50, None, 0.0, "cluster", "http://graph.example")
    write_json(loaded.state_dir / AB_FILE, asdict(ab))
    expected = r"raw.outputs: the payload log holds what v2 answered \(label\), not logits"
    with pytest.raises(HandoffError, match=expected):
        status(project)
