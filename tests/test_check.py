"""`handoff check` and the model.py loader: a good project passes, each broken hook is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from handoff.check import check
from handoff.errors import HandoffError
from handoff.model_source import precheck_source

from .conftest import edit_yaml, handoff, replace_in

pytestmark = pytest.mark.unit


def test_default_project_passes_every_check(project: Path) -> None:
    report = check(project)
    assert [name for name, _ in report.passed] == [
        "contract.yaml and handoff.yaml",
        "model.py hooks",
        "datasets",
        "forward pass",
        "metrics",
        "two-step overfit",
        "ONNX export round trip",
    ]


def test_cli_check_reports_each_check(project: Path) -> None:
    result = handoff("check", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "ok  forward pass: logits [4, 10] float32" in result.stdout
    assert "model.py satisfies the contract (7 checks" in result.stdout


def test_syntax_error_names_file_and_line(project: Path) -> None:
    replace_in(project / "model.py", "def loss(outputs", "def loss(outputs,,")
    with pytest.raises(HandoffError, match=r"model.py: line \d+: syntax error"):
        precheck_source(project)
    result = handoff("check", cwd=project)
    assert result.returncode == 1
    assert "model.py: line" in result.stderr and "syntax error" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_hook_is_named(project: Path) -> None:
    replace_in(project / "model.py", "def example_inputs(", "def sample_inputs(")
    with pytest.raises(HandoffError, match="missing hook\\(s\\) example_inputs"):
        precheck_source(project)
    with pytest.raises(HandoffError, match="missing hook\\(s\\) example_inputs"):
        check(project)


def test_output_shape_that_breaks_the_contract(project: Path) -> None:
    replace_in(project / "model.py", "nn.Linear(64, 10)", "nn.Linear(64, 9)")
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert str(raised.value) == (
        "contract.yaml: outputs[0].shape: outputs[0] 'logits': expected shape [-1, 10] (-1 = any), "
        "the model produced [4, 9]"
    )


def test_hook_that_raises_points_at_its_line(project: Path) -> None:
    replace_in(
        project / "model.py",
        "    _, target = batch\n    return F.cross_entropy",
        "    _, target = batch\n    raise ValueError('labels missing')\n    return F.cross_entropy",
    )
    with pytest.raises(HandoffError, match=r"model.py: line \d+: loss\(\) raised ValueError: labels missing"):
        check(project)


def test_unknown_config_override_fails_before_training(project: Path) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(overrides={"epoch": 3}))
    with pytest.raises(
        HandoffError, match=r"handoff.yaml: training.overrides: Config has no field\(s\) epoch"
    ):
        check(project)
