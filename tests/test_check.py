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
        "evaluation suite",
        "two-step overfit",
        "ONNX export round trip",
    ]


def test_cli_check_reports_each_check(project: Path) -> None:
    result = handoff("check", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "ok  forward pass: logits [4, 10] float32" in result.stdout
    assert "model.py satisfies the contract (8 checks" in result.stdout


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


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "    return F.cross_entropy(outputs, target)",
            "    return F.cross_entropy(outputs.detach(), target)",
            r"model.py: loss.backward\(\) raised RuntimeError: element 0 of tensors does not require grad.*"
            r"; loss\(\) must be computed from the model outputs",
        ),
        (
            '    return {"accuracy": ',
            '    return {"acc@1": ',
            r"model.py: metrics: metric name\(s\) \['acc@1'\] are not accepted by MLflow",
        ),
        (
            "    seed: int = 0  # seeds",
            "    seed: int = 0\n    data_dir: Path = Path('data')  # seeds",
            r"model.py: Config: Config values must be JSON values",
        ),
        (
            "    epochs: int = 12",
            "    epochs: int",
            r"model.py: Config: field\(s\) epochs need a default",
        ),
        (
            "from torch import nn\n",
            "from torch import nn\n\nraise SystemExit('run me as a script')\n",
            r"model.py: line \d+: importing it raised SystemExit: run me as a script",
        ),
        (
            "        nn.Linear(64, 10),\n    )",
            "        nn.Linear(64, 10),\n        Dictify(),\n    )\n\n\nclass Dictify(nn.Module):\n"
            "    def forward(self, x):\n        return {'scores': x}",
            r"model.py: build_model: the model returned a dict without contract output\(s\) \['logits'\]; "
            r"its keys are \['scores'\]",
        ),
    ],
    ids=[
        "loss-without-grad",
        "metric-name",
        "config-not-json",
        "config-no-default",
        "exit-at-import",
        "dict-output-without-the-contract-name",
    ],
)
def test_researcher_mistakes_are_named_not_tracebacks(
    project: Path, old: str, new: str, expected: str
) -> None:
    replace_in(project / "model.py", old, new)
    if "Path(" in new:
        replace_in(
            project / "model.py",
            "from dataclasses import dataclass\n",
            "from dataclasses import dataclass\nfrom pathlib import Path\n",
        )
    with pytest.raises(HandoffError, match=expected):
        check(project)


def test_gated_metric_that_model_py_never_produces(project: Path) -> None:
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].update(min_metrics={"f1": 0.9}))
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert str(raised.value).endswith(
        "contract.yaml: slo.min_metrics.f1: no metric is called 'f1'; the gate can read the "
        "evaluation suite's classification metrics (accuracy, macro_f1, ece), val_loss and what "
        "model.py metrics() returns (accuracy): gate on one of these, or return 'f1' from "
        "metrics() in model.py"
    )


def test_the_evaluation_suite_stage_says_what_it_scores(project: Path) -> None:
    detail = dict(check(project).passed)["evaluation suite"]
    assert detail.startswith("classification: output 'logits' against the target (accuracy ")


STREAMED_VAL = '''

class _Stream(torch.utils.data.IterableDataset):
    """The val split as a stream with no length, as shards in object storage are read."""

    def __init__(self, items):
        self.items = items
        self.tensors = items.tensors  # example_inputs() takes its example from the val tensors

    def __iter__(self):
        return iter(self.items)


_build_datasets = build_datasets


def build_datasets(cfg):
    train, val = _build_datasets(cfg)
    return TRAIN, _Stream(val)
'''


def test_a_streamed_val_split_passes_and_a_streamed_train_split_is_named(project: Path) -> None:
    """Evaluation streams the held-out split, so an IterableDataset is accepted there; training
    shuffles and resumes by item index, so its split must have a length, and check says so."""
    model = project / "model.py"
    original = model.read_text()
    model.write_text(original + STREAMED_VAL.replace("TRAIN", "train"))
    report = check(project)
    assert dict(report.passed)["datasets"].endswith("val streamed (no length)")

    model.write_text(original + STREAMED_VAL.replace("TRAIN", "_Stream(train)"))
    result = handoff("check", cwd=project)
    assert result.returncode == 1
    assert "model.py: build_datasets: the train dataset must define __len__" in result.stderr
