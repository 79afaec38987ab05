"""One metric vocabulary for `check` and the gate, per-metric champion tolerances, and a relative
gate that only compares a challenger with the champion on the same held-out split.

`check` runs the real hooks and exports to ONNX; the relative gate is exercised end to end:
real ONNX Runtime, the real evaluation suite and a real MLflow registry on sqlite.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from handoff.check import check
from handoff.contract import load_contract
from handoff.data_hash import data_sha256
from handoff.errors import HandoffError
from handoff.gates import Champion, relative_checks
from handoff.lineage import HELDOUT_TAG
from handoff.project import Project
from handoff.step_entry import record_json
from handoff.steps.evaluate import evaluate
from handoff.steps.register import register

from .conftest import edit_yaml, mlflow_state_restored
from .test_triton_layout import MODEL, _export

# A small regression project: four features, one target, no metrics() of its own.
REGRESSION_MODEL = '''"""A linear regression on synthetic data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Config:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0


def build_model(cfg: Config) -> nn.Module:
    return nn.Linear(4, 1)


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(200, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(200, 1, generator=g)
    return TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(outputs, batch[1])


def example_inputs(cfg: Config) -> torch.Tensor:
    return build_datasets(cfg)[1].tensors[0][:4]
'''


def _regression(project: Path) -> Path:
    (project / "model.py").write_text(REGRESSION_MODEL)

    def change(contract: dict[str, Any]) -> None:
        contract["task"] = "regression"
        contract["inputs"] = [{"name": "features", "dtype": "float32", "shape": [-1, 4]}]
        contract["outputs"] = [{"name": "value", "dtype": "float32", "shape": [-1, 1]}]
        contract["slo"]["min_metrics"] = {}

    edit_yaml(project / "contract.yaml", change)
    return project


def _gate_on(project: Path, **bounds: dict[str, float]) -> None:
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].update(**bounds))


# --- one vocabulary: what check accepts is what the gate reads ---------------------------------


@pytest.mark.unit
def test_check_accepts_the_suite_metrics_a_classification_gate_reads(project: Path) -> None:
    _gate_on(project, min_metrics={"macro_f1": 0.0, "accuracy": 0.0}, max_metrics={"ece": 1.0})
    report = dict(check(project).passed)
    assert report["metrics"] == (
        "gated: accuracy, ece, macro_f1; available: evaluation suite (classification) accuracy, "
        "macro_f1, ece; val_loss; model.py metrics() accuracy"
    )


@pytest.mark.unit
def test_check_accepts_r2_for_a_regression_gate(project: Path) -> None:
    _gate_on(_regression(project), min_metrics={"r2": 0.0}, max_metrics={"rmse": 10.0, "mae": 10.0})
    report = dict(check(project).passed)
    assert report["metrics"].startswith("gated: mae, r2, rmse; available: evaluation suite (regression)")


@pytest.mark.unit
@pytest.mark.parametrize("field", ["min_metrics", "max_metrics"])
def test_check_refuses_a_gated_metric_nobody_produces_listing_the_valid_ones(
    project: Path, field: str
) -> None:
    _gate_on(project, **{field: {"no_such_metric": 1.0}})
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert str(raised.value) == (
        f"contract.yaml: slo.{field}.no_such_metric: no metric is called 'no_such_metric'; the gate "
        "can read the evaluation suite's classification metrics (accuracy, macro_f1, ece), val_loss "
        "and what model.py metrics() returns (accuracy): gate on one of these, or return "
        "'no_such_metric' from metrics() in model.py"
    )


@pytest.mark.unit
def test_check_refuses_a_classification_metric_in_a_regression_gate(project: Path) -> None:
    _gate_on(_regression(project), min_metrics={"accuracy": 0.9})
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert str(raised.value) == (
        "contract.yaml: slo.min_metrics.accuracy: no metric is called 'accuracy'; the gate can read "
        "the evaluation suite's regression metrics (mae, rmse, r2), val_loss and what model.py "
        "metrics() returns (model.py has no metrics()): gate on one of these, or return 'accuracy' "
        "from metrics() in model.py"
    )


# --- champion_tolerance: one number, or per metric, absolute or relative -----------------------

SPLIT = "a" * 64  # the held-out split both were evaluated on


def _slo(project: Path, **slo: Any) -> Any:
    _gate_on(project, **slo)
    return load_contract(project).slo


@pytest.mark.unit
def test_a_relative_tolerance_scales_with_the_champion_and_says_what_it_allowed(project: Path) -> None:
    slo = _slo(
        project,
        min_metrics={"accuracy": 0.5, "macro_f1": 0.5},
        max_metrics={"ece": 0.5},
        champion_tolerance={"accuracy": "5%", "ece": 0.02, "default": "1%"},
    )
    champion = Champion(MODEL, "3", {"accuracy": 0.6268, "macro_f1": 0.8, "ece": 0.1}, SPLIT)
    ours = {"accuracy": 0.6, "macro_f1": 0.79, "ece": 0.125}
    checks = {c.name: c for c in relative_checks(slo, ours, champion, SPLIT)}
    assert checks["champion.accuracy"].passed  # 0.0268 behind, 5% of 0.6268 = 0.0313 allowed
    assert checks["champion.accuracy"].detail == (
        "accuracy 0.6000 vs champion v3 0.6268: worse by 0.0268, within the allowance 0.0313 "
        "(relative tolerance 5% of 0.6268, slo.champion_tolerance.accuracy)"
    )
    assert not checks["champion.macro_f1"].passed  # 0.01 behind, 1% of 0.8 = 0.008 allowed
    assert checks["champion.macro_f1"].detail == (
        "macro_f1 0.7900 vs champion v3 0.8000: worse by 0.0100, more than the allowance 0.0080 "
        "(relative tolerance 1% of 0.8000, slo.champion_tolerance.default)"
    )
    assert not checks["champion.ece"].passed  # lower is better: 0.025 worse, 0.02 allowed
    assert checks["champion.ece"].detail == (
        "ece 0.1250 vs champion v3 0.1000: worse by 0.0250, more than the allowance 0.0200 "
        "(absolute tolerance, slo.champion_tolerance.ece)"
    )


@pytest.mark.unit
def test_one_number_is_still_an_absolute_tolerance_for_every_metric(project: Path) -> None:
    slo = _slo(project, min_metrics={"accuracy": 0.5}, champion_tolerance=0.05)
    champion = Champion(MODEL, "1", {"accuracy": 0.9}, SPLIT)
    (only,) = relative_checks(slo, {"accuracy": 0.86}, champion, SPLIT)
    assert only.passed and only.detail == (
        "accuracy 0.8600 vs champion v1 0.9000: worse by 0.0400, within the allowance 0.0500 "
        "(absolute tolerance, slo.champion_tolerance)"
    )
    (better,) = relative_checks(slo, {"accuracy": 0.95}, champion, SPLIT)
    assert better.passed and better.detail == (
        "accuracy 0.9500 vs champion v1 0.9000: better by 0.0500, within the allowance 0.0500 "
        "(absolute tolerance, slo.champion_tolerance)"
    )


@pytest.mark.unit
def test_a_metric_a_tolerance_mapping_leaves_out_gets_the_documented_default(project: Path) -> None:
    slo = _slo(project, min_metrics={"accuracy": 0.5, "macro_f1": 0.5}, champion_tolerance={"accuracy": "2%"})
    champion = Champion(MODEL, "1", {"accuracy": 0.9, "macro_f1": 0.9}, SPLIT)
    checks = relative_checks(slo, {"accuracy": 0.9, "macro_f1": 0.885}, champion, SPLIT)
    assert [c.detail for c in checks] == [
        "accuracy 0.9000 vs champion v1 0.9000: equal, within the allowance 0.0180 "
        "(relative tolerance 2% of 0.9000, slo.champion_tolerance.accuracy)",
        "macro_f1 0.8850 vs champion v1 0.9000: worse by 0.0150, more than the allowance 0.0100 "
        "(absolute tolerance, the default: slo.champion_tolerance has no macro_f1 or default entry)",
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("tolerance", "expected"),
    [
        ({"r2": 0.1}, "slo.champion_tolerance.r2: 'r2' is not gated (not in min_metrics or max_metrics)"),
        ({"accuracy": "five"}, "slo.champion_tolerance.accuracy: must be a number >= 0 or a percentage"),
        ({"accuracy": -0.1}, "slo.champion_tolerance.accuracy: must be a number >= 0 or a percentage"),
        ("1 %", "slo.champion_tolerance: Input should be a number >= 0, 'N%' or a mapping"),
    ],
    ids=["not-gated", "not-a-number", "negative", "malformed"],
)
def test_a_malformed_tolerance_names_the_metric(project: Path, tolerance: Any, expected: str) -> None:
    _gate_on(project, champion_tolerance=tolerance)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert expected in str(raised.value)


# --- the relative gate compares on the champion's held-out split only --------------------------


@pytest.fixture(autouse=True)
def _own_mlflow_state() -> Iterator[None]:
    with mlflow_state_restored():
        yield


def _evaluated(project: Path, model_dir: Path) -> dict[str, Any]:
    """`handoff evaluate`'s record, as the CLI writes it and register reads it."""
    return json.loads(record_json(evaluate(project, model_dir)))


def _with_seed(export: Path, seed: int, out: Path) -> Path:
    """The same weights, trained (as config.json says) with another Config.split_seed."""
    copy = Path(shutil.copytree(export, out))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "split_seed": seed}))
    return copy


@pytest.fixture(scope="module")
def champion_v1(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose registry's champion is v1 (seed-0 split), and two more exports beside it."""
    root = tmp_path_factory.mktemp("heldout")
    project = Path(shutil.copytree(default_project, root / MODEL))
    # Untrained weights: the absolute floor is lowered so that only the champion decides.
    edit_yaml(
        project / "contract.yaml",
        lambda c: c["slo"].update(min_metrics={"accuracy": 0.0}, champion_tolerance=1.0),
    )
    loaded = Project.load(project)
    for seed in (0, 1):
        _export(loaded, seed, root / f"export-{seed}")
    _with_seed(root / "export-1", 1, root / "export-1-seed-1")
    with mlflow_state_restored():
        first = _evaluated(project, root / "export-0")
        assert first["gate"]["passed"] and first["champion"] is None
        assert register(project, root / "export-0", first).aliases == ["challenger", "champion"]
        uri = f"sqlite:///{project / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        assert client.get_model_version(MODEL, "1").tags[HELDOUT_TAG] == first["heldout_sha256"]
        # Removed here, so that each test sets the champion's split it is about.
        client.delete_model_version_tag(MODEL, "1", HELDOUT_TAG)
    return root


@pytest.fixture
def registry(champion_v1: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(champion_v1, tmp_path / "r"))


def _tag_champion(project: Path, value: str) -> None:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_model_version_tag(MODEL, "1", HELDOUT_TAG, value)


def _relative(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in evaluation["gate"]["checks"] if c["kind"] == "relative"]


def _split_sha(project: Path, seed: int) -> str:
    """What evaluation should record: the sha256 of the held-out split a Config.split_seed makes."""
    loaded = Project.load(project)
    _, val = loaded.hooks.build_datasets(loaded.config_from_dict({"split_seed": seed}))
    return data_sha256(val)


@pytest.mark.local
def test_evaluation_records_the_sha256_of_its_heldout_split(registry: Path) -> None:
    project = registry / MODEL
    same_seed = _evaluated(project, registry / "export-1")
    other_seed = _evaluated(project, registry / "export-1-seed-1")
    assert same_seed["heldout_sha256"] == _split_sha(project, 0)
    assert other_seed["heldout_sha256"] == _split_sha(project, 1) != same_seed["heldout_sha256"]


@pytest.mark.local
def test_a_challenger_on_another_split_is_not_compared_with_the_champion(registry: Path) -> None:
    project = registry / MODEL
    champion_split = _split_sha(project, 0)
    _tag_champion(project, champion_split)
    other = _evaluated(project, registry / "export-1-seed-1")
    ours = other["heldout_sha256"]
    assert ours != champion_split
    assert other["gate"]["passed"] is False
    assert other["champion"] == {
        "name": MODEL,
        "version": "1",
        "metrics": {},
        "heldout_sha256": champion_split,
    }
    (failed,) = _relative(other)  # no metric was compared: the numbers would mean nothing
    assert failed["name"] == "champion.heldout" and not failed["passed"]
    assert failed["detail"] == (
        f"not comparable: this model was evaluated on held-out data {ours[:12]}, champion v1 on "
        f"{champion_split[:12]} (its {HELDOUT_TAG} tag), so the champion would be scored on other "
        "items, perhaps its own training data. Usually the seed of the split (the starters' "
        "Config.split_seed), the validation share (val_fraction) or the data changed: keep the "
        "held-out split fixed, or, to make this "
        "model's split the new baseline, remove the champion alias first: "
        f"MlflowClient().delete_registered_model_alias('{MODEL}', 'champion')"
    )
    assert other["gate"]["reasons"] == [failed["detail"]]
    verdicts = {item["name"]: item["passed"] for item in other["readiness"]}
    assert verdicts["Champion comparison"] is False

    same = _evaluated(project, registry / "export-1")  # the champion's split: compared as usual
    (compared,) = _relative(same)
    assert compared["name"] == "champion.accuracy" and compared["passed"]
    assert compared["detail"].startswith("accuracy ") and "vs champion v1" in compared["detail"]
    assert "tag" not in compared["detail"]


@pytest.mark.local
def test_a_champion_registered_before_splits_were_recorded_is_compared_with_a_note(
    registry: Path,
) -> None:
    evaluation = _evaluated(registry / MODEL, registry / "export-1-seed-1")
    assert evaluation["champion"]["heldout_sha256"] is None
    assert set(evaluation["champion"]["metrics"]) >= {"accuracy", "macro_f1", "ece"}
    (compared,) = _relative(evaluation)
    assert compared["name"] == "champion.accuracy" and compared["passed"]
    assert compared["detail"].endswith(
        f"; champion v1 has no {HELDOUT_TAG} tag (registered before handoff recorded held-out "
        "splits), so it is assumed to be scored on the same split"
    )
