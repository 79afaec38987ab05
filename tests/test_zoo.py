"""The model zoo: architectures researchers really write (tests/zoo/), each taken the whole way on
real parts: ``handoff check`` -> a tiny train -> ONNX export -> evaluation -> the KServe model server
answering a V2 request.

Every ``tests/zoo/<arch>.py`` is a complete model.py and ``<arch>.yaml`` its contract.yaml; each
goes into a copy of one generated project (the real cookiecutter, once per session), with every
copy training into one shared MLflow store. What is asserted is what the researcher and the
on-call engineer see: check passes its named checks, the exported graph agrees with torch, the
evaluation scored the output (and target) the contract names, and the served answer has the
contract's names and shapes and equals ONNX Runtime's and torch's on the same input, also at a
second length of every dynamic non-batch axis.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
import torch
import yaml
from torch.utils.data import DataLoader

from handoff.check import check
from handoff.checkpoints import load_checkpoint
from handoff.files import read_json
from handoff.project import Project
from handoff.serving import local_server
from handoff.steps.evaluate import evaluate
from handoff.steps.export import export
from handoff.steps.train import train

from .conftest import edit_yaml, mlflow_state_restored
from .model_server import start_server

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

ZOO = Path(__file__).parent / "zoo"
ARCHITECTURES = sorted(p.stem for p in ZOO.glob("*.py"))
# The checks every model.py must pass, in this order (check may add more between them).
CHECKS = [
    "contract.yaml and handoff.yaml",
    "model.py hooks",
    "datasets",
    "forward pass",
    "metrics",
    "two-step overfit",
    "ONNX export round trip",
]
V2_DATATYPES = {"float32": "FP32", "int64": "INT64", "int32": "INT32"}
# The served answer is ONNX Runtime's own (same graph, same engine): only float noise may differ.
SERVED_TOLERANCE = 1e-5


def test_every_zoo_model_has_its_contract() -> None:
    assert len(ARCHITECTURES) >= 9, ARCHITECTURES
    assert sorted(p.stem for p in ZOO.glob("*.yaml")) == ARCHITECTURES


def load_zoo_module(arch: str) -> ModuleType:
    """The zoo model.py as a module of its own, so the test can rebuild its data and Config."""
    spec = importlib.util.spec_from_file_location(f"zoo_{arch}", ZOO / f"{arch}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zoo_base(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated default project, its MLflow store shared by every architecture's copy (the
    store is created once: a fresh sqlite store costs seconds of migrations)."""
    root = tmp_path_factory.mktemp("zoo")
    base = Path(shutil.copytree(default_project, root / "base"))
    store = f"sqlite:///{root / 'mlflow.db'}"
    edit_yaml(base / "handoff.yaml", lambda s: s["mlflow"].update(tracking_uri=store))
    return base


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """These models are tiny and CI runs two test workers on two cores: a second intra-op thread
    only contends with the other worker (a ResNet step took 10x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _own_mlflow_state() -> Iterator[None]:
    with mlflow_state_restored():
        yield


def zoo_project(base: Path, arch: str, module: ModuleType, folder: Path) -> Path:
    """A copy of the project with the zoo's model.py and contract.yaml, trained at Config.tiny()."""
    project = Path(shutil.copytree(base, folder / arch))
    shutil.copyfile(ZOO / f"{arch}.py", project / "model.py")
    shutil.copyfile(ZOO / f"{arch}.yaml", project / "contract.yaml")
    tiny, default = dataclasses.asdict(module.Config.tiny()), dataclasses.asdict(module.Config())
    overrides = {name: value for name, value in tiny.items() if value != default[name]}
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(overrides=overrides))
    return project


@dataclasses.dataclass(frozen=True)
class Task:
    """contract.yaml's ``task``, read here from the YAML so the test does not trust the parser."""

    type: str
    output: str
    target: str | int | None

    @classmethod
    def of(cls, contract: dict[str, Any]) -> Task:
        task = contract["task"] if isinstance(contract["task"], dict) else {"type": contract["task"]}
        outputs = [o["name"] for o in contract["outputs"]]
        return cls(task["type"], task.get("output") or outputs[0], task.get("target"))

    def pick(self, target: Any) -> torch.Tensor:
        """The target the suite compares with: a dict key (default: the scored output's name),
        a tuple index, or the only target."""
        if isinstance(target, dict):
            return target[self.target if self.target is not None else self.output]
        if isinstance(target, (tuple, list)):
            return target[self.target if self.target is not None else 0]
        return target


def as_arrays(inputs: Any) -> list[np.ndarray]:
    tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [t.detach().numpy() for t in tensors]


def expected_headline(
    module: ModuleType, cfg: Any, session: ort.InferenceSession, contract: dict[str, Any]
) -> tuple[str, float]:
    """The suite's headline metric recomputed from ONNX Runtime on the held-out split: accuracy of
    the scored output's argmax, or its mean absolute error, against the scored target."""
    task = Task.of(contract)
    _, val = module.build_datasets(cfg)
    inputs, target = next(iter(DataLoader(val, batch_size=len(val))))
    feeds = dict(zip([i["name"] for i in contract["inputs"]], as_arrays(inputs), strict=True))
    predictions = session.run([task.output], feeds)[0]
    truth = task.pick(target).numpy()
    if task.type == "classification":
        return "accuracy", float(np.mean(predictions.argmax(axis=1) == truth))
    n = len(truth)
    return "mae", float(np.mean(np.abs(predictions.reshape(n, -1) - truth.reshape(n, -1))))


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start the KServe model server (``python -m handoff.serving``) on a free 127.0.0.1 port, as
    deploy starts it, for an exported model folder; stopped when the test ends."""
    handles: list[local_server.ServerHandle] = []

    def start(project: Path, model_dir: Path, name: str) -> str:
        state = Project.load(project).state_dir
        handle, url = start_server(state, model_dir / "model.onnx", project, model_name=name)
        handles.append(handle)
        return url

    yield start
    for handle in handles:
        local_server.terminate(handle)


def v2_request(contract: dict[str, Any], arrays: list[np.ndarray]) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": spec["name"],
                "datatype": V2_DATATYPES[spec["dtype"]],
                "shape": list(array.shape),
                "data": array.reshape(-1).tolist(),
            }
            for spec, array in zip(contract["inputs"], arrays, strict=True)
        ]
    }


def shorter(contract: dict[str, Any], arrays: list[np.ndarray]) -> list[np.ndarray] | None:
    """The request cut to about half its length on every dynamic non-batch axis (None: none)."""
    cut, out = False, []
    for spec, array in zip(contract["inputs"], arrays, strict=True):
        for axis, dim in enumerate(spec["shape"][1:], start=1):
            if dim == -1:
                array = np.take(array, range(array.shape[axis] // 2 + 1), axis=axis)
                cut = True
        out.append(np.ascontiguousarray(array))
    return out if cut else None


def assert_served_answer(
    url: str,
    contract: dict[str, Any],
    arrays: list[np.ndarray],
    session: ort.InferenceSession,
    model: torch.nn.Module,
) -> None:
    """One V2 request: the contract's outputs, in order, with its datatypes and shapes, equal to
    ONNX Runtime's answer and, within the parity tolerance, to the trained torch model's."""
    name = contract["name"]
    response = requests.post(f"{url}/v2/models/{name}/infer", json=v2_request(contract, arrays), timeout=30)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [o["name"] for o in outputs] == [o["name"] for o in contract["outputs"]]
    batch = arrays[0].shape[0]
    feeds = dict(zip([i["name"] for i in contract["inputs"]], arrays, strict=True))
    expected = session.run([o["name"] for o in contract["outputs"]], feeds)
    with torch.no_grad():
        returned = model(*(torch.from_numpy(a) for a in arrays))
    in_torch = contract_order(returned, [o["name"] for o in contract["outputs"]])
    for spec, got, onnx_value, torch_value in zip(
        contract["outputs"], outputs, expected, in_torch, strict=True
    ):
        assert got["datatype"] == V2_DATATYPES[spec["dtype"]], got["datatype"]
        assert len(got["shape"]) == len(spec["shape"]) and got["shape"][0] == batch, got["shape"]
        assert all(want in (-1, dim) for want, dim in zip(spec["shape"], got["shape"], strict=True))
        value = np.asarray(got["data"], dtype=spec["dtype"]).reshape(got["shape"])
        np.testing.assert_allclose(value, onnx_value, rtol=SERVED_TOLERANCE, atol=SERVED_TOLERANCE)
        tolerance = contract["slo"].get("parity_tolerance", 1e-4)
        assert float(np.max(np.abs(value - torch_value.numpy()))) <= tolerance, spec["name"]


def contract_order(returned: Any, names: list[str]) -> list[torch.Tensor]:
    """What the model returned (tensor, tuple, dict or ModelOutput) in the contract's order."""
    if isinstance(returned, torch.Tensor):
        return [returned]
    if isinstance(returned, dict):
        return [returned[n] for n in names]
    return list(returned)


def assert_out_of_range_refused(url: str, contract: dict[str, Any], arrays: list[np.ndarray]) -> None:
    """An integer input outside its contract ``range`` is a 400 naming the input and the value."""
    for i, spec in enumerate(contract["inputs"]):
        if "range" not in spec:
            continue
        bad = [a.copy() for a in arrays]
        bad[i].reshape(-1)[0] = spec["range"][1] + 1
        response = requests.post(
            f"{url}/v2/models/{contract['name']}/infer", json=v2_request(contract, bad), timeout=30
        )
        assert response.status_code == 400, (spec["name"], response.status_code, response.text)
        error = response.json()["error"]
        assert spec["name"] in error and str(spec["range"][1] + 1) in error, error


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_zoo_model_goes_from_check_to_a_served_answer(
    arch: str, zoo_base: Path, tmp_path: Path, serve: Any
) -> None:
    module = load_zoo_module(arch)
    project = zoo_project(zoo_base, arch, module, tmp_path)
    contract = yaml.safe_load((project / "contract.yaml").read_text())

    report = check(project)
    passed = [name for name, _ in report.passed]
    assert [name for name in passed if name in CHECKS] == CHECKS, report.passed

    trained = train(project, tmp_path / "model.pt", fresh=True)
    assert trained.epochs == module.Config.tiny().epochs and trained.steps > 0

    model_dir = tmp_path / "export"
    exported = export(project, trained.checkpoint, model_dir)
    assert exported.parity_max_abs_diff <= exported.parity_tolerance

    evaluation = evaluate(project, model_dir)
    assert evaluation.gate.passed, evaluation.gate.reasons
    cfg = module.Config(**read_json(model_dir / "config.json"))
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    metric, value = expected_headline(module, cfg, session, contract)
    assert evaluation.metrics[metric] == pytest.approx(value, abs=2e-6), (metric, evaluation.metrics)

    model, _ = load_checkpoint(Project.load(project), trained.checkpoint)
    url = serve(project, model_dir, contract["name"])
    example = [
        np.asarray(i["data"], dtype=spec["dtype"]).reshape(i["shape"])
        for spec, i in zip(contract["inputs"], read_json(model_dir / "example.json")["inputs"], strict=True)
    ]
    assert_served_answer(url, contract, example, session, model)
    cut = shorter(contract, example)
    if cut is not None:  # another length of every dynamic non-batch axis
        assert_served_answer(url, contract, cut, session, model)
    assert_out_of_range_refused(url, contract, example)
