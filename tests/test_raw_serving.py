"""Raw requests on real parts: a text model whose model.py ``preprocess`` tokenizes the strings of
a V2 ``BYTES`` input and whose ``postprocess`` turns logits into a ``BYTES`` label.

``handoff check`` runs the hooks, export writes the raw request and response into example.json and
the hooks' code into the Triton layout's model folder, and the real KServe model server, started
on that folder as the handoff-onnx runtime would (contract.yaml and model.py beside the ONNX
model), answers strings with labels equal to running the hooks and ONNX Runtime by hand; bad
requests get a 400 naming the input or hook; a cluster deploy on Triton is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
import torch

from handoff.check import check
from handoff.checkpoints import save_checkpoint
from handoff.errors import HandoffError
from handoff.files import read_json, write_json
from handoff.project import Project
from handoff.raw_io import check_cluster_runtime
from handoff.serving import local_server
from handoff.serving.smoke import smoke_test
from handoff.steps.export import export
from handoff.tracking import use_tracking
from handoff_pipelines.compiled import compile_project

from .conftest import edit_yaml, mlflow_state_restored

pytestmark = pytest.mark.local

RAW = Path(__file__).parent / "raw_model"
NAME = "raw-text"
TEXTS = ["I love this film", "bad and awful", "great plot, good film", "the"]
# The line of model.py where preprocess refuses an empty text: the 400 names it.
REFUSES = next(
    i for i, line in enumerate((RAW / "model.py").read_text().splitlines(), 1) if "raise ValueError" in line
)


def raw_project(base: Path, folder: Path) -> Path:
    project = Path(shutil.copytree(base, folder / "raw-text"))
    for name in ("model.py", "vocab.py", "contract.yaml"):
        shutil.copyfile(RAW / name, project / name)
    return project


@pytest.fixture(scope="module")
def project_dir(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return raw_project(default_project, tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def exported(project_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained text model exported (the weights do not matter, the path through them does)."""
    with mlflow_state_restored():
        project = Project.load(project_dir)
        cfg = project.config()
        torch.manual_seed(0)
        model = project.hooks.build_model(cfg)
        out = tmp_path_factory.mktemp("export")
        checkpoint = out / "final.pt"
        save_checkpoint(checkpoint, {"model": model.state_dict(), "config": dataclasses.asdict(cfg)})
        export(project_dir, checkpoint, out / "model")
    return out / "model"


@pytest.fixture(scope="module")
def server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real model server on the Triton layout's model folder, as the handoff-onnx runtime
    serves /mnt/models: the contract, model.py and its helper beside 1/model.onnx."""
    folder = exported / "triton" / NAME
    state = tmp_path_factory.mktemp("server")
    sock = local_server.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    spec = {
        "model_name": NAME,
        "onnx_path": str(folder / "1" / "model.onnx"),
        "contract_dir": str(folder),
        "host": "127.0.0.1",
        "port": port,
    }
    write_json(state / "spec.json", spec)
    handle = local_server.start(
        state / "spec.json", sock, model_name=NAME, version="1", state_dir=state, ready_timeout_s=60
    )
    yield f"http://127.0.0.1:{port}"
    local_server.terminate(handle)


def by_hand(project_dir: Path, onnx_path: Path, texts: list[str]) -> list[str]:
    """What the server must answer: model.py's hooks and ONNX Runtime, called directly."""
    hooks = Project.load(project_dir).hooks
    raw = {"text": np.array([t.encode() for t in texts], dtype=object)}
    feeds = hooks.preprocess(raw)  # type: ignore[attr-defined]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], feeds)
    labels = hooks.postprocess({"logits": logits})["label"]  # type: ignore[attr-defined]
    return [label.decode() for label in labels]


def infer(url: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{url}/v2/models/{NAME}/infer", json=body, timeout=30)


def text_request(texts: list[Any], datatype: str = "BYTES") -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": datatype, "shape": [len(texts)], "data": texts}]}


def test_check_runs_the_raw_hooks(project_dir: Path) -> None:
    report = check(project_dir)
    names = [name for name, _ in report.passed]
    assert "raw request hooks" in names
    detail = dict(report.passed)["raw request hooks"]
    assert detail.startswith("preprocess: text [3] -> ids [3, 5] int64")
    assert "postprocess: -> label [3]" in detail
    assert "preprocess, postprocess, raw_example" in dict(report.passed)["model.py hooks"]


def test_export_writes_the_raw_example_and_the_code(exported: Path) -> None:
    example = read_json(exported / "example.json")
    assert example["inputs"] == [
        {
            "name": "text",
            "datatype": "BYTES",
            "shape": [3],
            "data": ["a great film, love it", "awful plot", "the film"],
        }
    ]
    (label,) = example["expected_outputs"]
    assert (label["name"], label["datatype"], label["shape"]) == ("label", "BYTES", [3])
    assert set(label["data"]) <= {"negative", "positive"}
    folder = exported / "triton" / NAME
    assert sorted(p.name for p in folder.iterdir()) == [
        "1",
        "config.pbtxt",
        "contract.yaml",
        "model.py",
        "vocab.py",
    ]


def test_strings_in_labels_out_as_the_hooks_and_onnx_runtime_give_them(
    server: str, project_dir: Path, exported: Path
) -> None:
    response = infer(server, {"id": "r1", **text_request(TEXTS)})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("label", "BYTES", [4])
    assert output["data"] == by_hand(project_dir, exported / "model.onnx", TEXTS)

    # The same over the binary extension: length-prefixed bytes in, JSON labels out.
    payload = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [4],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    binary = requests.post(
        f"{server}/v2/models/{NAME}/infer",
        data=header + payload,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
        timeout=30,
    )
    assert binary.status_code == 200, binary.text
    assert binary.json()["outputs"][0]["data"] == output["data"]


def test_metadata_and_smoke_test_speak_the_raw_tensors(
    server: str, project_dir: Path, exported: Path
) -> None:
    metadata = requests.get(f"{server}/v2/models/{NAME}", timeout=10).json()
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [-1]}]
    result = smoke_test(
        server, NAME, Project.load(project_dir).contract, read_json(exported / "example.json")
    )
    assert result.passed, result.detail


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (text_request([1.0], "FP32"), "input 'text': expected datatype BYTES, got FP32"),
        (text_request([1, 2]), "input 'text': data must be strings for datatype BYTES"),
        (
            {"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [2, 3]}]},
            "unknown input(s) ['ids']; expected inputs ['text']",
        ),
        (
            text_request(["good", "  "]),
            f"model.py preprocess() rejected the request: line {REFUSES}: preprocess() raised ValueError: "
            "text [1] is empty: send at least one word",
        ),
    ],
    ids=["datatype", "not-strings", "model-input", "preprocess-raises"],
)
def test_bad_requests_are_400_naming_the_input_or_hook(
    server: str, body: dict[str, Any], message: str
) -> None:
    response = infer(server, body)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": message}


def test_hooks_and_raw_fields_must_agree(default_project: Path, tmp_path: Path) -> None:
    project = raw_project(default_project, tmp_path)
    edit_yaml(project / "contract.yaml", lambda c: c["raw"].pop("outputs"))
    with pytest.raises(HandoffError) as raised:
        check(project)
    assert raised.value.field == "raw.outputs"
    lines = (project / "contract.yaml").read_text().splitlines()
    raw_line = lines.index("raw:") + 2  # raw.outputs is missing: the message points into raw
    assert str(raised.value) == (
        f"{project / 'contract.yaml'}: raw.outputs: line {raw_line}: model.py defines postprocess(), "
        "which turns the model's outputs into the response in the model server: declare those "
        "tensors under raw.outputs (name, dtype, shape; dtype bytes for strings or encoded images)"
    )
    edit_yaml(project / "contract.yaml", lambda c: c.pop("raw"))
    with pytest.raises(HandoffError, match=r"model\.py defines preprocess"):
        check(project)


def test_triton_cannot_serve_raw_hooks(project_dir: Path, tmp_path: Path) -> None:
    """`handoff compile` (and deploy --cluster, through the same check) refuses the default Triton
    runtime for a model with preprocess/postprocess, naming the setting that fixes it."""
    project = Project.load(project_dir)
    assert project.settings.serving.kserve.runtime == "triton"  # the template's default
    with pytest.raises(HandoffError) as raised:
        compile_project(project_dir, tmp_path / "compiled")
    assert not (tmp_path / "compiled").exists()
    assert str(raised.value) == (
        f"{project.root / 'handoff.yaml'}: serving.kserve.runtime: is triton, which serves the ONNX "
        "model alone and cannot run model.py's preprocess() and postprocess(); set "
        "serving.kserve.runtime: kserve (the project's handoff-onnx runtime, the same model server "
        "as local serving, which runs them) (contract.yaml declares raw.inputs/raw.outputs)"
    )
    kserve = project.settings.serving.model_copy(
        update={"kserve": project.settings.serving.kserve.model_copy(update={"runtime": "kserve"})}
    )
    check_cluster_runtime(
        project.contract, project.settings.model_copy(update={"serving": kserve}), project.root
    )


def test_registered_raw_model_serves_locally_and_its_code_is_part_of_the_version(
    project_dir: Path, tmp_path: Path
) -> None:
    """register carries model.py and its helper; a local deploy serves strings from them; the same
    weights and contract with other serving code are another version, which serves the new code."""
    from typer.testing import CliRunner

    from handoff.cli import app
    from handoff.registry import CODE_TAG
    from handoff.steps.register import register

    project = Path(shutil.copytree(project_dir, tmp_path / NAME))
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"].update(port=0))
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].update(latency_p99_ms=250))
    card = project / "model_card.md"
    card.write_text(re.sub(r"<!-- handoff: this card describes.*?-->\n", "", card.read_text(), flags=re.S))
    evaluation = {
        "gate": {"passed": True, "reasons": [], "checks": []},
        "metrics": {"accuracy": 0.9},
        "latency_p50_ms": 1.0,
        "latency_p99_ms": 2.0,
        "champion": None,
    }

    def released(out: Path) -> tuple[str, list[str]]:
        loaded = Project.load(project)
        cfg = loaded.config()
        torch.manual_seed(0)  # the same weights every time
        checkpoint = tmp_path / "final.pt"
        model = loaded.hooks.build_model(cfg)
        save_checkpoint(checkpoint, {"model": model.state_dict(), "config": dataclasses.asdict(cfg)})
        export(project, checkpoint, out)
        version = register(project, out, evaluation).version
        result = CliRunner().invoke(
            app, ["deploy", "--local", "--version", version, "--project", str(project)]
        )
        assert result.exit_code == 0, f"{result.exception}\n{result.output[-2000:]}"
        url = json.loads(result.stdout)["url"]
        labels = infer(url, text_request(TEXTS[:2])).json()["outputs"][0]["data"]
        return version, labels

    with mlflow_state_restored():
        try:
            first, labels = released(tmp_path / "export-1")
            assert first == "1" and set(labels) <= {"negative", "positive"}
            model_py = project / "model.py"
            model_py.write_text(
                model_py.read_text().replace('[b"negative", b"positive"]', '[b"NEG", b"POS"]')
            )
            second, relabelled = released(tmp_path / "export-2")
            assert second == "2"
            assert relabelled == [{"negative": "NEG", "positive": "POS"}[label] for label in labels]
            client = use_tracking(Project.load(project))
            tags = [client.get_model_version(NAME, v).tags for v in ("1", "2")]
            assert tags[0]["handoff.onnx_sha256"] == tags[1]["handoff.onnx_sha256"]
            assert tags[0][CODE_TAG] != tags[1][CODE_TAG]
        finally:
            local_server.stop(Project.load(project).state_dir)
