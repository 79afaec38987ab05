"""The readiness checklist's "Contract satisfied" and the gate's contract check: the result of the
contract checks that ran, and a model that breaks the contract is not promoted.

Unit tests drive ``ContractWatch`` with a stand-in session and ``contract_item``/``contract_gate``
with hand-made evidence; one local test trains and exports the default project once and evaluates
it with its export record gone and with a contract its outputs no longer meet, and registers the
latter (real torch, ONNX Runtime, MLflow).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handoff.gates import CONTRACT_CHECK, decide
from handoff.project import Project
from handoff.readiness import (
    ContractCheck,
    ContractWatch,
    Evidence,
    contract_gate,
    contract_item,
    heldout_inputs_check,
)

from .conftest import edit_yaml, handoff, mlflow_state_restored

SHA = "ab" * 32


class Session:
    """``InferenceSession.run`` answering what it is told to."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def run(self, names: Sequence[str], feed: dict[str, Any], options: Any = None) -> list[np.ndarray]:
        rows = len(next(iter(feed.values())))
        return self.answer(rows) if callable(self.answer) else self.answer


def images(rows: int) -> dict[str, np.ndarray]:
    return {"image": np.zeros((rows, 1, 8, 8), np.float32)}


@pytest.fixture(scope="module")
def contract(default_project: Path) -> Any:
    return Project.load(default_project).contract


def evidence(
    default_project: Path, export: dict[str, Any] | None, checks: Sequence[ContractCheck]
) -> Evidence:
    return Evidence(
        project=Project.load(default_project),
        metrics={},
        gate=decide([]),
        export=export,
        onnx_sha256=SHA,
        contract_checks=tuple(checks),
        training_run_id="",
        cfg=None,
    )


# --- ContractWatch ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_watched_session_passes_what_conforms_and_counts_it(contract: Any) -> None:
    watched = ContractWatch(Session(lambda rows: [np.zeros((rows, 10), np.float32)]), contract)
    for rows in (256, 100):
        assert watched.run(["logits"], images(rows))[0].shape == (rows, 10)
    (outputs,) = watched.checks()  # the inputs are checked as evaluate reads them, not here
    assert (outputs.name, outputs.outcome) == ("held-out outputs", "passed")
    assert outputs.detail.startswith("356 items in 2 batches:")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            lambda rows: [np.zeros((rows, 10), np.float64)],
            "outputs[0] 'logits': expected dtype float32, ONNX Runtime on the held-out split (outputs) "
            "produced float64 (2 of 2 batches fail)",
        ),
        (
            lambda rows: [np.zeros((rows, 9), np.float32)],
            "outputs[0] 'logits': expected shape [-1, 10] (-1 = any), ONNX Runtime on the held-out split "
            "(outputs) produced [4, 9] (2 of 2 batches fail)",
        ),
        (
            lambda rows: [np.zeros((1, 10), np.float32)],
            "outputs[0] 'logits' has 1 rows for a batch of 4; the first axis of every output must be "
            "the batch (2 of 2 batches fail)",
        ),
        (
            lambda rows: [],
            "contract.yaml declares 1 (logits), ONNX Runtime on the held-out split (outputs) produced 0 "
            "(2 of 2 batches fail)",
        ),
    ],
    ids=["dtype", "shape", "rows", "count"],
)
def test_a_watched_session_records_what_breaks_the_contract_without_raising(
    contract: Any, answer: Any, expected: str
) -> None:
    watched = ContractWatch(Session(answer), contract)
    for _ in range(2):
        watched.run(["logits"], images(4))
    (outputs,) = watched.checks()
    assert (outputs.outcome, outputs.detail) == ("failed", expected)


@pytest.mark.unit
def test_a_watched_session_that_never_ran_has_no_evidence_and_the_check_reads_not_run(
    default_project: Path, contract: Any
) -> None:
    checks = ContractWatch(Session([]), contract).checks()
    assert checks == ()
    item = contract_item(evidence(default_project, {"onnx_sha256": SHA}, [heldout_inputs_check(0), *checks]))
    assert not item.passed
    assert item.evidence.startswith("held-out outputs NOT RUN: no evidence of it reached evaluation ("), item


# --- contract_item ------------------------------------------------------------------------------


def held_out(outputs: str = "passed", detail: str = "10 items") -> list[ContractCheck]:
    return [
        heldout_inputs_check(10),
        ContractCheck("held-out outputs", outputs, detail),  # type: ignore[arg-type]
    ]


@pytest.mark.unit
def test_the_contract_item_passes_only_when_every_check_ran_on_this_model_and_passed(
    default_project: Path,
) -> None:
    item = contract_item(evidence(default_project, {"onnx_sha256": SHA}, held_out()))
    assert item.name == "Contract satisfied" and item.passed, item.evidence
    assert item.evidence.startswith("export: the example at two batch sizes")
    assert (
        "held-out outputs: 10 items" in item.evidence and "(image → logits, contract sha256" in item.evidence
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("export", "checks", "expected"),
    [
        (None, held_out(), "export NOT RUN: export record missing (no export.json came with model.onnx) ("),
        (
            {"onnx_sha256": "cd" * 32},
            held_out(),
            "export NOT RUN: the export record is for model.onnx sha256 cdcdcdcdcdcd, not the one "
            "evaluated (abababababab) (",
        ),
        (
            {"onnx_sha256": SHA},
            held_out("failed", "outputs[0] 'logits': expected dtype float64"),
            "held-out outputs FAILED: outputs[0] 'logits': expected dtype float64 (",
        ),
        (
            {"onnx_sha256": SHA},
            [],
            "held-out inputs NOT RUN: no evidence of it reached evaluation; held-out outputs NOT RUN: no "
            "evidence of it reached evaluation (",
        ),
    ],
    ids=["no-export-record", "another-model", "outputs-failed", "no-held-out-checks"],
)
def test_the_contract_item_fails_naming_what_failed_or_did_not_run(
    default_project: Path, export: dict[str, Any] | None, checks: list[ContractCheck], expected: str
) -> None:
    item = contract_item(evidence(default_project, export, checks))
    assert not item.passed
    assert item.evidence.startswith(expected), item.evidence
    # The gate reads the same checks: it fails, its reason naming what failed or did not run.
    gate = decide([contract_gate(export, SHA, checks)])
    assert not gate.passed and gate.checks[0].name == CONTRACT_CHECK == "contract"
    said = item.evidence[: item.evidence.rindex(" (image → logits")]
    assert gate.reasons == [f"contract: {said}"], gate.reasons


@pytest.mark.unit
def test_the_gate_passes_the_contract_only_when_every_check_ran_and_passed() -> None:
    check = contract_gate({"onnx_sha256": SHA}, SHA, held_out())
    assert check.passed and check.kind == "contract"
    assert (
        check.detail
        == "contract: export, held-out inputs, held-out outputs checks ran on this model.onnx and passed"
    )
    failed = decide([contract_gate(None, SHA, held_out("failed", "outputs[0] 'logits': float64"))])
    assert failed.reasons == [
        "contract: export NOT RUN: export record missing (no export.json came with model.onnx); "
        "held-out outputs FAILED: outputs[0] 'logits': float64"
    ]


# --- Through the evaluate step ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default project trained for one epoch and exported (model.onnx with its export record)."""
    project = Path(shutil.copytree(default_project, tmp_path_factory.mktemp("readiness") / "p"))
    trained = handoff("train", "--set", "epochs=1", "--record", "train.json", cwd=project)
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = handoff("export", cwd=project)
    assert exported.returncode == 0, exported.stderr[-2000:]
    return project


def evaluated(project: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``handoff evaluate``'s "Contract satisfied" item and its gate."""
    with mlflow_state_restored():
        done = handoff("evaluate", "--out", "evaluation.json", cwd=project)
    assert done.returncode == 0, done.stderr[-2000:]
    evaluation = json.loads((project / "evaluation.json").read_text())
    (item,) = [i for i in evaluation["readiness"] if i["name"] == "Contract satisfied"]
    return item, evaluation["gate"]


@pytest.mark.local
def test_a_model_that_breaks_the_contract_fails_its_gate_and_is_not_promoted(
    exported: Path, tmp_path: Path
) -> None:
    # The contract changed after export: the outputs ONNX Runtime gives no longer meet it. Every
    # other gate is opened wide, so the contract alone decides.
    changed = Path(shutil.copytree(exported, tmp_path / "changed"))

    def change(contract: dict[str, Any]) -> None:
        contract["outputs"][0]["dtype"] = "float64"
        contract["slo"].update(latency_p99_ms=10_000, min_metrics={}, max_metrics={})

    edit_yaml(changed / "contract.yaml", change)
    item, gate = evaluated(changed)
    failure = (
        "held-out outputs FAILED: outputs[0] 'logits': expected dtype float64, ONNX Runtime on the "
        "held-out split (outputs) produced float32"
    )
    assert item["passed"] is False and item["evidence"].startswith(failure), item["evidence"]
    # The report still shows the item, and the gate fails on it alone, saying which check failed.
    assert gate["passed"] is False
    assert [c["name"] for c in gate["checks"] if not c["passed"]] == ["contract"], gate
    assert len(gate["reasons"]) == 1 and gate["reasons"][0].startswith(f"contract: {failure}"), gate
    # register promotes on the gate: the version is registered, never champion.
    with mlflow_state_restored():
        registered = handoff("register", "--record", "register.json", cwd=changed)
    assert registered.returncode == 0, registered.stderr[-2000:]
    assert f"not promoted: the gate failed: contract: {failure}" in registered.stderr, registered.stderr
    assert json.loads((changed / "register.json").read_text())["promoted"] is False


@pytest.mark.local
def test_evaluate_reports_the_contract_unsatisfied_when_a_check_fails_or_did_not_run(
    exported: Path, tmp_path: Path
) -> None:
    # No export record came with the model: export's checks are not evidenced for it, and a model
    # whose conformance nobody checked is not promoted either.
    bare = Path(shutil.copytree(exported, tmp_path / "bare"))
    (bare / "onnx" / "export.json").unlink()
    item, gate = evaluated(bare)
    missing = "export NOT RUN: export record missing (no export.json came with model.onnx)"
    assert item["passed"] is False and item["evidence"].startswith(missing), item
    assert gate["passed"] is False and f"contract: {missing}" in gate["reasons"], gate
    # Untouched, every check ran and passed, and so did the gate's contract check.
    item, gate = evaluated(Path(shutil.copytree(exported, tmp_path / "whole")))
    assert item["passed"] is True
    assert [c["passed"] for c in gate["checks"] if c["name"] == "contract"] == [True], gate
