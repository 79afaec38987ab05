"""contract.yaml and handoff.yaml: valid files load, each kind of mistake names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from handoff.contract import load_contract
from handoff.errors import HandoffError
from handoff.settings import load_settings

from .conftest import edit_yaml

pytestmark = pytest.mark.unit


def test_default_contract_loads_and_is_hashed(project: Path) -> None:
    contract = load_contract(project)
    assert contract.input_names == ["image"]
    assert contract.outputs[0].v2_datatype == "FP32"
    assert contract.slo.min_metrics == {"accuracy": 0.95}
    assert len(contract.sha256) == 64


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["inputs"][0].update(dtype="float"), "inputs[0].dtype: Input should be 'float32'"),
        (
            lambda c: c["inputs"][0].update(shape=[1, 1, 8, 8]),
            "inputs[0].shape: Value error, the first (batch)",
        ),
        (lambda c: c["outputs"][0].update(shape=[-1, 0]), "outputs[0].shape: Value error, each dimension"),
        (lambda c: c["slo"].update(latency_p99_ms=-1), "slo.latency_p99_ms: Input should be greater than 0"),
        (lambda c: c.pop("owners"), "owners: Field required"),
        (lambda c: c["slo"].update(latency_p99=5), "slo.latency_p99: Extra inputs are not permitted"),
        (lambda c: c.update(task="ranking"), "task: Input should be 'classification' or 'regression'"),
    ],
    ids=["dtype", "static-batch", "zero-dim", "negative-slo", "missing-owners", "typo", "task"],
)
def test_malformed_contract_names_file_line_and_field(project: Path, change, expected: str) -> None:
    edit_yaml(project / "contract.yaml", change)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    message = str(raised.value)
    assert message.startswith(f"{project / 'contract.yaml'}: line ")
    assert expected in message


def test_contract_that_is_not_yaml(project: Path) -> None:
    (project / "contract.yaml").write_text("name: [unclosed\n")
    with pytest.raises(HandoffError, match=r"contract.yaml: line 2: not valid YAML"):
        load_contract(project)


def test_missing_contract_says_which_file(project: Path) -> None:
    (project / "contract.yaml").unlink()
    with pytest.raises(HandoffError, match=r"contract.yaml: file not found"):
        load_contract(project)


def test_settings_reject_a_bad_port_and_resolve_sqlite_under_the_project(project: Path) -> None:
    settings = load_settings(project)
    assert settings.tracking_uri(project) == f"sqlite:///{project.resolve()}/mlflow.db"
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"].update(port=70000))
    with pytest.raises(HandoffError, match=r"handoff.yaml: line \d+: serving.port: Input should be less"):
        load_settings(project)
