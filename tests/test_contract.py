"""contract.yaml and handoff.yaml: valid files load, each kind of mistake names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from handoff.contract import load_contract
from handoff.errors import HandoffError
from handoff.settings import load_settings

from .conftest import edit_yaml, replace_in

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
        (
            lambda c: c["slo"].update(max_metrics={"accuracy": 0.5}),
            "slo.max_metrics.accuracy: 0.5 is below min_metrics.accuracy = 0.95: no model can pass",
        ),
        (
            lambda c: c["slo"].update(max_metrics={"ece": "low"}),
            "slo.max_metrics.ece: Input should be a valid number",
        ),
        (
            lambda c: c["slo"].update(max_model_size_mb=0),
            "slo.max_model_size_mb: Input should be greater than 0",
        ),
        (
            lambda c: c["slo"].update(champion_tolerance=-0.1),
            "slo.champion_tolerance: Input should be greater than or equal to 0",
        ),
        (
            lambda c: c["owners"].update(research=""),
            "owners.research: String should have at least 1 character",
        ),
    ],
    ids=[
        "dtype",
        "static-batch",
        "zero-dim",
        "negative-slo",
        "missing-owners",
        "typo",
        "task",
        "max-below-min",
        "max-not-number",
        "zero-size",
        "negative-tolerance",
        "empty-owner",
    ],
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


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "task: classification\n",
            "task: classification\ntask: regression\n",
            "line 5: task: duplicate key (first given on line 4); "
            "YAML would silently keep only the last one, so remove one of them",
        ),
        (
            "  latency_batch_size: 1\n",
            "  latency_batch_size: 1\n  latency_batch_size: 8\n",
            "line 16: slo.latency_batch_size: duplicate key (first given on line 15)",
        ),
    ],
    ids=["top-level", "nested"],
)
def test_duplicate_yaml_key_names_file_line_and_key(project: Path, old: str, new: str, expected: str) -> None:
    replace_in(project / "contract.yaml", old, new)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert str(raised.value).startswith(f"{project / 'contract.yaml'}: {expected}")


def test_yaml_merge_key_may_be_overridden_without_a_duplicate_error(project: Path) -> None:
    replace_in(
        project / "contract.yaml", "slo:\n", "slo:\n  <<: {latency_p99_ms: 50, latency_batch_size: 2}\n"
    )
    slo = load_contract(project).slo
    assert (slo.latency_p99_ms, slo.latency_batch_size) == (25, 1)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "outputs:\n",
            "  - name: image\n    dtype: float32\n    shape: [-1, 64]\noutputs:\n",
            "line 9: inputs[1].name: 'image' is used twice",
        ),
        (
            "  - name: logits\n",
            "  - name: image\n",
            "line 10: outputs[0].name: 'image' is also an input name",
        ),
        (
            "slo:\n",
            "  - name: logits\n    dtype: float32\n    shape: [-1, 10]\nslo:\n",
            "line 13: outputs[1].name: 'logits' is used twice",
        ),
        (
            "    shape: [-1, 10]\n",
            "    shape: [-1, 10]\n    allow_non_finite: true\n",
            "line 13: outputs[0].allow_non_finite: applies to inputs only (what requests may carry)",
        ),
    ],
    ids=["input-twice", "output-is-input", "output-twice", "non-finite-output"],
)
def test_tensor_names_must_be_unique(project: Path, old: str, new: str, expected: str) -> None:
    replace_in(project / "contract.yaml", old, new)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert str(raised.value) == f"{project / 'contract.yaml'}: {expected}"


def test_contract_that_is_not_utf8(project: Path) -> None:
    path = project / "contract.yaml"
    path.write_bytes(path.read_bytes().replace(b"platform-team", "plateforme-équipe".encode("latin-1")))
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert str(raised.value) == (
        f"{path}: line 24: not UTF-8 text (byte 0xe9); save the file with UTF-8 encoding"
    )


def test_settings_reject_a_namespace_that_is_not_a_dns_label(project: Path) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s.update(namespace="ML_Team"))
    with pytest.raises(HandoffError, match=r"handoff.yaml: line 5: namespace: String should match pattern"):
        load_settings(project)
