"""contract.yaml and handoff.yaml: valid files load, each kind of mistake names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from handoff.contract import load_contract
from handoff.errors import HandoffError
from handoff.settings import load_settings

from .conftest import edit_yaml, replace_in

pytestmark = pytest.mark.unit


def line_of(path: Path, text: str, occurrence: int = 1) -> int:
    """1-based line of the ``occurrence``-th line of ``path`` that contains ``text`` (so these
    tests hold when the template's comments move its lines)."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return lines[occurrence - 1]


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
        (lambda c: c.update(task="ranking"), "task.type: Input should be 'classification' or 'regression'"),
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
    ("old", "new", "key", "expected"),
    [
        (
            "task: classification\n",
            "task: classification\ntask: regression\n",
            "task: ",
            "task: duplicate key (first given on line {first}); "
            "YAML would silently keep only the last one, so remove one of them",
        ),
        (
            "  latency_batch_size: 1\n",
            "  latency_batch_size: 1\n  latency_batch_size: 8\n",
            "  latency_batch_size: ",
            "slo.latency_batch_size: duplicate key (first given on line {first})",
        ),
    ],
    ids=["top-level", "nested"],
)
def test_duplicate_yaml_key_names_file_line_and_key(
    project: Path, old: str, new: str, key: str, expected: str
) -> None:
    path = project / "contract.yaml"
    replace_in(path, old, new)
    first, repeat = line_of(path, key), line_of(path, key, 2)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert str(raised.value).startswith(f"{path}: line {repeat}: {expected.format(first=first)}")


def test_yaml_merge_key_may_be_overridden_without_a_duplicate_error(project: Path) -> None:
    replace_in(
        project / "contract.yaml", "slo:\n", "slo:\n  <<: {latency_p99_ms: 50, latency_batch_size: 2}\n"
    )
    slo = load_contract(project).slo
    assert (slo.latency_p99_ms, slo.latency_batch_size) == (25, 1)


@pytest.mark.parametrize(
    ("old", "new", "at", "expected"),
    [
        (
            "outputs:\n",
            "  - name: image\n    dtype: float32\n    shape: [-1, 64]\noutputs:\n",
            ("- name: image", 2),
            "inputs[1].name: 'image' is used twice",
        ),
        (
            "  - name: logits\n",
            "  - name: image\n",
            ("- name: image", 2),
            "outputs[0].name: 'image' is also an input name",
        ),
        (
            "slo:\n",
            "  - name: logits\n    dtype: float32\n    shape: [-1, 10]\nslo:\n",
            ("- name: logits", 2),
            "outputs[1].name: 'logits' is used twice",
        ),
        (
            "    shape: [-1, 10]\n",
            "    shape: [-1, 10]\n    allow_non_finite: true\n",
            ("allow_non_finite", 1),
            "outputs[0].allow_non_finite: applies to inputs only (what requests may carry)",
        ),
    ],
    ids=["input-twice", "output-is-input", "output-twice", "non-finite-output"],
)
def test_tensor_names_must_be_unique(
    project: Path, old: str, new: str, at: tuple[str, int], expected: str
) -> None:
    path = project / "contract.yaml"
    replace_in(path, old, new)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert str(raised.value) == f"{path}: line {line_of(path, *at)}: {expected}"


def test_contract_that_is_not_utf8(project: Path) -> None:
    path = project / "contract.yaml"
    path.write_bytes(path.read_bytes().replace(b"platform-team", "plateforme-équipe".encode("latin-1")))
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    data = path.read_bytes()
    line = data[: data.index(b"\xe9")].count(b"\n") + 1
    assert str(raised.value) == (
        f"{path}: line {line}: not UTF-8 text (byte 0xe9); save the file with UTF-8 encoding"
    )


def test_settings_reject_a_namespace_that_is_not_a_dns_label(project: Path) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s.update(namespace="ML_Team"))
    with pytest.raises(HandoffError, match=r"handoff.yaml: line 5: namespace: String should match pattern"):
        load_settings(project)


def test_settings_reject_a_project_slug_kserve_would_refuse(project: Path) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s.update(project="3d-digits"))
    with pytest.raises(HandoffError) as raised:
        load_settings(project)
    assert str(raised.value).endswith(
        "handoff.yaml: line 1: project: '3d-digits' must start with a letter: the InferenceService is "
        "named after it and KServe accepts only names matching [a-z]([-a-z0-9]*[a-z0-9])?"
    )


def test_settings_reject_a_run_deadline_shorter_than_one_training_attempt(project: Path) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update(timeout_s=3600))
    with pytest.raises(HandoffError) as raised:
        load_settings(project)
    assert str(raised.value).endswith(
        "cluster.timeout_s: the whole run's deadline (3600 s) must be longer than one training attempt "
        "(training.job.timeout_s, 86400 s): raise cluster.timeout_s or lower training.job.timeout_s"
    )


def test_task_may_be_a_bare_kind_or_name_the_scored_output_and_target(project: Path) -> None:
    contract = load_contract(project)
    assert (contract.task_type, contract.task.output, contract.task.target) == ("classification", None, None)
    assert contract.scored_output == 0

    def two_outputs(c: dict) -> None:
        c["outputs"].insert(0, {"name": "embedding", "dtype": "float32", "shape": [-1, 16]})
        c["task"] = {"type": "classification", "output": "logits", "target": "label"}

    edit_yaml(project / "contract.yaml", two_outputs)
    contract = load_contract(project)
    assert (contract.task_type, contract.task.target, contract.scored_output) == (
        "classification",
        "label",
        1,
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c: c["outputs"].append({"name": "embedding", "dtype": "float32", "shape": [-1, 16]}),
            "task.output: the model has 2 outputs (logits, embedding): say which one the evaluation "
            "suite scores",
        ),
        (
            lambda c: c.update(task={"type": "classification", "output": "probs"}),
            "task.output: 'probs' is not an output; the outputs are ['logits']",
        ),
        (
            lambda c: c.update(task={"type": "classification", "scores": "logits"}),
            "task.scores: Extra inputs are not permitted",
        ),
        (
            lambda c: c["inputs"][0].update(range=[0, 1]),
            "inputs[0].range: applies to integer dtypes (int8, int16, int32, int64, uint8), not float32",
        ),
    ],
    ids=["several-outputs-unnamed", "unknown-output", "task-typo", "range-on-float"],
)
def test_task_and_range_mistakes_name_the_field(project: Path, change, expected: str) -> None:
    edit_yaml(project / "contract.yaml", change)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert expected in str(raised.value)
