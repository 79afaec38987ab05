"""Any PyTorch model a researcher brings, through check -> train -> export -> evaluate -> serve.

Each test starts from a user's finding: several targets, several outputs (and which one the gate
scores), a dynamic sequence axis, integer inputs with a value range, dict outputs (a HuggingFace
``ModelOutput`` is one: tests/zoo/hf_bert.py serves one).
Everything is real: the model.py is written to a project and loaded by the platform, exported with
torch.onnx (dynamo), run in ONNX Runtime and, for the range guard, served over HTTP.
"""

from __future__ import annotations

import http.client
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from handoff import __version__
from handoff.check import check
from handoff.contract import load_contract
from handoff.contract_examples import example_arrays
from handoff.errors import HandoffError
from handoff.files import write_json
from handoff.onnx_export import export_onnx
from handoff.onnx_io import open_session
from handoff.project import Project
from handoff.serving import local_server
from handoff.steps.evaluate import evaluate
from handoff.steps.export import export
from handoff.steps.train import train

from .conftest import mlflow_state_restored, replace_in

pytestmark = pytest.mark.local

SETTINGS = f"""\
project: any-model
template_version: {__version__}
orchestrator: kfp
image: registry.example.com/ml/any-model:{__version__}
namespace: ml-models
mlflow:
  tracking_uri: sqlite:///mlflow.db
  experiment: any-model
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder of its own (not the template's): handoff.yaml here, the test writes the
    rest, so these tests hold whatever the template's starter model is."""
    root = tmp_path / "any-model"
    root.mkdir()
    (root / "handoff.yaml").write_text(SETTINGS)
    return root


def write_project(
    project: Path,
    model_py: str,
    *,
    task: str | dict[str, Any],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    min_metrics: dict[str, float] | None = None,
) -> Path:
    """Replace the default project's model.py and contract.yaml with these."""
    (project / "model.py").write_text(textwrap.dedent(model_py).lstrip())
    contract = {
        "name": "any-model",
        "task": task,
        "inputs": inputs,
        "outputs": outputs,
        "slo": {"latency_p99_ms": 200, "min_metrics": min_metrics or {}, "parity_tolerance": 1e-4},
        "owners": {"research": "someone", "engineering": "platform-team"},
    }
    (project / "contract.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
    return project


# --- several outputs, several targets (findings 4 and 5) ----------------------------------------

TWO_HEADS = """
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import Dataset


    @dataclass
    class Config:
        seed: int = 0
        epochs: int = 4
        batch_size: int = 32
        lr: float = 0.02


    class Items(Dataset):
        \"\"\"Points in 8-d; the target is (quadrant class, sum of the coordinates).\"\"\"

        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 8, generator=g)
            self.label = (self.x[:, 0] > 0).long() + 2 * (self.x[:, 1] > 0).long()
            self.size = self.x.sum(1, keepdim=True)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], (self.label[i], self.size[i])


    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            embedding = self.body(x)
            return embedding, self.head(embedding)


    def build_model(cfg):
        return TwoHeads()


    def build_datasets(cfg):
        return Items(512, cfg.seed), Items(256, cfg.seed + 1)


    def loss(outputs, batch):
        embedding, logits = outputs
        _, (label, size) = batch
        return F.cross_entropy(logits, label) + 0.01 * F.mse_loss(embedding.mean(1, keepdim=True), size)


    def metrics(outputs, batch):
        _, (label, _) = batch
        return {"my_accuracy": (outputs[1].argmax(1) == label).float().mean().item()}


    def example_inputs(cfg):
        return torch.randn(2, 8)
"""

TWO_OUTPUTS = [
    {"name": "embedding", "dtype": "float32", "shape": [-1, 32]},
    {"name": "logits", "dtype": "float32", "shape": [-1, 4]},
]
POINTS = [{"name": "x", "dtype": "float32", "shape": [-1, 8]}]


def test_several_outputs_need_task_output_naming_one_of_them(project: Path) -> None:
    write_project(project, TWO_HEADS, task="classification", inputs=POINTS, outputs=TWO_OUTPUTS)
    with pytest.raises(HandoffError) as raised:
        load_contract(project)
    assert str(raised.value) == (
        f"{project / 'contract.yaml'}: line 2: task.output: the model has 2 outputs (embedding, "
        "logits): say which one the evaluation suite scores"
    )
    write_project(
        project,
        TWO_HEADS,
        task={"type": "classification", "output": "probs"},
        inputs=POINTS,
        outputs=TWO_OUTPUTS,
    )
    with pytest.raises(HandoffError, match=r"task.output: 'probs' is not an output; the outputs are"):
        load_contract(project)


def test_a_tuple_target_with_no_task_target_is_ambiguous_at_check(project: Path) -> None:
    write_project(
        project,
        TWO_HEADS,
        task={"type": "classification", "output": "logits"},
        inputs=POINTS,
        outputs=TWO_OUTPUTS,
    )
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert "task.target" in str(raised.value)
    assert "the targets are a list of 2" in str(raised.value)


def test_two_outputs_and_a_tuple_target_train_export_and_the_gate_scores_the_named_output(
    project: Path, tmp_path: Path
) -> None:
    """Finding 5: with outputs [embedding, logits] the suite scored the embedding (accuracy 0.16
    where training logged 0.92). Finding 4: a tuple target passed check, then failed training."""
    write_project(
        project,
        TWO_HEADS,
        task={"type": "classification", "output": "logits", "target": 0},
        inputs=POINTS,
        outputs=TWO_OUTPUTS,
        min_metrics={"accuracy": 0.8},
    )
    report = check(project)
    suite = dict(report.passed)["evaluation suite"]
    assert "output 'logits'" in suite and "target [0]" in suite
    with mlflow_state_restored():
        trained = train(project, tmp_path / "checkpoint.pt")
        export(project, tmp_path / "checkpoint.pt", tmp_path / "model")
        result = evaluate(project, tmp_path / "model")
    assert trained.val_metrics["my_accuracy"] > 0.8
    # The suite scored the logits against the class ids: the researcher's own number, measured
    # on ONNX Runtime's outputs, is the gate's.
    assert result.metrics["accuracy"] == pytest.approx(result.metrics["my_accuracy"], abs=1e-6)
    assert result.metrics["accuracy"] == pytest.approx(trained.val_metrics["my_accuracy"], abs=0.01)
    assert result.gate.passed


def test_dict_targets_are_joined_per_key_and_the_suite_takes_the_named_one(project: Path) -> None:
    write_project(
        project,
        TWO_HEADS.replace("(self.label[i], self.size[i])", '{"label": self.label[i], "size": self.size[i]}')
        .replace("_, (label, size) = batch", 'label, size = batch[1]["label"], batch[1]["size"]')
        .replace("_, (label, _) = batch", 'label = batch[1]["label"]')
        # Several outputs also answer to their contract names, as a dict or ModelOutput would.
        .replace("embedding, logits = outputs", 'embedding, logits = outputs["embedding"], outputs.logits'),
        task={"type": "classification", "output": "logits", "target": "label"},
        inputs=POINTS,
        outputs=TWO_OUTPUTS,
    )
    report = check(project)
    assert "target 'label'" in dict(report.passed)["evaluation suite"]


# --- a token model: dynamic sequence axis and a value range (findings 6 and 8) ------------------

TOKENS = """
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import Dataset

    VOCAB, LENGTH = 50, 12


    @dataclass
    class Config:
        seed: int = 0
        epochs: int = 1
        batch_size: int = 32
        lr: float = 0.01


    class Sentences(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
            self.label = (self.tokens < 10).sum(1).clamp(max=2)

        def __len__(self):
            return len(self.tokens)

        def __getitem__(self, i):
            return self.tokens[i], self.label[i]


    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, tokens):
            return self.head(self.embed(tokens).mean(1))


    def build_model(cfg):
        return Bag()


    def build_datasets(cfg):
        return Sentences(128, cfg.seed), Sentences(64, cfg.seed + 1)


    def loss(outputs, batch):
        return F.cross_entropy(outputs, batch[1])


    def example_inputs(cfg):
        return torch.randint(0, VOCAB, (2, LENGTH))
"""

TOKEN_INPUTS = [{"name": "tokens", "dtype": "int64", "shape": [-1, -1], "range": [0, 49]}]
LOGITS3 = [{"name": "logits", "dtype": "float32", "shape": [-1, 3]}]


def token_project(project: Path, model_py: str = TOKENS) -> Path:
    return write_project(project, model_py, task="classification", inputs=TOKEN_INPUTS, outputs=LOGITS3)


def test_every_minus_one_is_exported_dynamic_and_runs_at_other_lengths(project: Path, tmp_path: Path) -> None:
    """Finding 6: the sequence axis was exported static, so serving another length was a 500."""
    token_project(project)
    report = check(project)
    assert "tokens axis 1 at 12 and 6" in dict(report.passed)["ONNX export round trip"]
    loaded = Project.load(project)
    cfg = loaded.config()
    model = loaded.hooks.build_model(cfg).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, loaded.contract, example_arrays(loaded, cfg), path)
    session = open_session(path)
    batch, length = session.get_inputs()[0].shape
    assert batch == "batch" and isinstance(length, str)  # symbolic, not 12
    for length in (3, 12, 40):
        tokens = torch.randint(0, 50, (5, length))
        (got,) = session.run(["logits"], {"tokens": tokens.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(tokens).numpy(), atol=1e-5)


def test_a_model_that_pins_a_dynamic_axis_is_named_at_check(project: Path) -> None:
    token_project(
        project,
        TOKENS.replace(
            "self.head = nn.Linear(16, 3)",
            "self.head = nn.Linear(16, 3)\n            self.position = nn.Parameter(torch.zeros(LENGTH, 16))",
        ).replace("self.embed(tokens).mean(1)", "(self.embed(tokens) + self.position).mean(1)"),
    )
    with pytest.raises(HandoffError) as raised:
        check(project)
    message = str(raised.value)
    assert "inputs[0] 'tokens' axis 1" in message and "-1" in message, message


def test_range_is_for_integer_inputs_only(project: Path) -> None:
    token_project(project)
    for change, expected in (
        (lambda c: c["inputs"][0].update(dtype="float32"), "inputs[0].range: applies to integer"),
        (lambda c: c["inputs"][0].update(range=[5, 1]), "inputs[0].range: the low end 5 is above"),
        (lambda c: c["inputs"][0].update(range=[0, 300], dtype="uint8"), "does not fit uint8"),
        (
            lambda c: c["outputs"][0].update(range=[0, 1], dtype="int64"),
            "outputs[0].range: applies to inputs only",
        ),
    ):
        data = yaml.safe_load((project / "contract.yaml").read_text())
        change(data)
        (project / "contract.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        with pytest.raises(HandoffError, match=expected.replace("[", r"\[").replace("(", r"\(")):
            load_contract(project)
        token_project(project)
    assert load_contract(project).inputs[0].range == (0, 49)


def test_check_refuses_data_outside_the_range(project: Path) -> None:
    token_project(project)
    replace_in(
        project / "model.py",
        "        return self.tokens[i], self.label[i]",
        "        return self.tokens[i].index_fill(0, torch.tensor([0]), VOCAB * (i == 1)), self.label[i]",
    )
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert str(raised.value).endswith(
        "contract.yaml: inputs[0].range: inputs[0] 'tokens': the train dataset holds 50 at [1, 0], "
        "outside the range [0, 49]"
    )


@pytest.fixture
def token_server(project: Path, tmp_path: Path) -> Iterator[tuple[str, int]]:
    token_project(project)
    loaded = Project.load(project)
    cfg = loaded.config()
    path = tmp_path / "model.onnx"
    export_onnx(loaded.hooks.build_model(cfg).eval(), loaded.contract, example_arrays(loaded, cfg), path)
    sock = local_server.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    spec = {
        "model_name": "tokens",
        "onnx_path": str(path),
        "contract_dir": str(project),
        "host": "127.0.0.1",
        "port": port,
    }
    write_json(tmp_path / "spec.json", spec)
    handle = local_server.start(
        tmp_path / "spec.json", sock, model_name="tokens", version="1", state_dir=tmp_path, ready_timeout_s=60
    )
    yield "127.0.0.1", port
    local_server.terminate(handle)


def _infer(server: tuple[str, int], tokens: list[list[int]]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(*server, timeout=10)
    body = {
        "inputs": [
            {
                "name": "tokens",
                "datatype": "INT64",
                "shape": [len(tokens), len(tokens[0])],
                "data": [t for row in tokens for t in row],
            }
        ]
    }
    conn.request(
        "POST", "/v2/models/tokens/infer", body=json.dumps(body), headers={"content-type": "application/json"}
    )
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    return response.status, answer


def test_the_server_answers_out_of_range_ids_with_400_and_serves_any_length(
    token_server: tuple[str, int],
) -> None:
    """Finding 8: an out-of-vocabulary id was a 500 from Gather, a negative one silently wrapped."""
    assert _infer(token_server, [[1, 2, 3]])[0] == 200  # length 3: the example had 12
    status, answer = _infer(token_server, [[1, 2, 3] * 10])
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 3]
    for tokens, value, index in (([[1, 50, 2]], 50, [0, 1]), ([[4, 2], [-1, 3]], -1, [1, 0])):
        status, answer = _infer(token_server, tokens)
        assert status == 400, answer
        assert answer["error"] == (
            f"input 'tokens': {value} at {index} is outside the contract's range [0, 49]"
        )


# --- dict and HuggingFace outputs (finding 9) ----------------------------------------------------

DICT_OUT = TOKENS.replace(
    "return self.head(self.embed(tokens).mean(1))",
    "pooled = self.embed(tokens).mean(1)\n"
    '            return {"hidden": pooled, "logits": self.head(pooled), "aux": None}',
)


def test_a_dict_output_is_flattened_by_the_contract_names(project: Path, tmp_path: Path) -> None:
    token_project(project, DICT_OUT)
    report = check(project)
    assert "logits [2, 3] float32" in dict(report.passed)["forward pass"]
    loaded = Project.load(project)
    cfg = loaded.config()
    path = tmp_path / "model.onnx"
    export_onnx(loaded.hooks.build_model(cfg).eval(), loaded.contract, example_arrays(loaded, cfg), path)
    assert [o.name for o in open_session(path).get_outputs()] == ["logits"]


def test_a_dict_output_without_a_contract_name_says_which_keys_it_has(project: Path) -> None:
    token_project(project, DICT_OUT.replace('"logits": self.head', '"scores": self.head'))
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert (
        "the model returned a dict without contract output(s) ['logits']; "
        "its keys are ['hidden', 'scores', 'aux']"
    ) in str(raised.value)


# A HuggingFace BERT (from config, two int64 inputs, a ModelOutput) goes from check to a served
# answer at two lengths in the model zoo: tests/zoo/hf_bert.py.
