"""The Triton model repository export writes, and register's upload of it to the MLflow artifact store.

``config.pbtxt`` is parsed with protobuf's own text-format parser against the fields of Triton's
``ModelConfig`` it uses (declared below with Triton's names and types: tritonclient, which ships
the full message, is not among this repository's dependencies), so a misspelt field or a wrong
type fails to parse as it would in ``tritonserver``. The content is also compared exactly.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import mlflow
import onnx
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory, text_format

from handoff.checkpoints import save_checkpoint
from handoff.contract import Contract
from handoff.errors import HandoffError
from handoff.files import sha256_of
from handoff.project import Project
from handoff.registry import TRITON_TAG
from handoff.steps.export import export
from handoff.steps.register import register
from handoff.tracking import use_tracking
from handoff.triton import config_pbtxt, layout_digest

MODEL = "digits-classifier"
EVALUATION: dict[str, Any] = {
    "gate": {"passed": True, "reasons": [], "checks": []},
    "metrics": {"accuracy": 0.99},
    "latency_p50_ms": 1.0,
    "latency_p99_ms": 2.0,
    "champion": None,
}


@dataclass(frozen=True)
class Registered:
    """A project whose registry holds two versions of different weights, and their exports."""

    project: Path
    exports: dict[str, Path]  # version -> export folder


def _export(project: Project, seed: int, out: Path) -> Path:
    """Export untrained weights of seed ``seed``: distinct models in seconds, no training needed."""
    cfg = project.config()
    torch.manual_seed(seed)
    model = project.hooks.build_model(cfg)
    checkpoint = out.parent / f"seed-{seed}.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": dataclasses.asdict(cfg)})
    export(project.root, checkpoint, out)
    return out


@cache
def _registered(default_project: Path, root: Path) -> Registered:
    root.mkdir()
    project_dir = Path(shutil.copytree(default_project, root / MODEL))
    exports = {}
    project = Project.load(project_dir)
    for seed in (0, 1):
        out = _export(project, seed, root / f"export-{seed}")
        exports[register(project_dir, out, EVALUATION).version] = out
    assert sorted(exports) == ["1", "2"]
    return Registered(project_dir, exports)


def registered_versions(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """The same registry for every module that asks (test_inference_service too), made once."""
    return _registered(default_project, tmp_path_factory.getbasetemp() / "registered")


@pytest.fixture(scope="session")
def registered(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    return registered_versions(default_project, tmp_path_factory)


# --- Triton's ModelConfig, the fields handoff writes -------------------------------------------

# Triton's DataType enum, in its numbering.
DATA_TYPES = [
    "TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
    "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
    "TYPE_BF16",
]  # fmt: skip
F = descriptor_pb2.FieldDescriptorProto


@cache
def model_config_class() -> type[message.Message]:
    proto = descriptor_pb2.FileDescriptorProto(name="triton_model_config_subset.proto", package="inference")
    proto.syntax = "proto3"
    proto.enum_type.add(name="DataType").value.extend(
        descriptor_pb2.EnumValueDescriptorProto(name=n, number=i) for i, n in enumerate(DATA_TYPES)
    )

    def message_type(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        declared = proto.message_type.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            added = declared.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                added.type_name = type_name

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    for tensor, dims_number in (("ModelInput", 4), ("ModelOutput", 3)):
        message_type(
            tensor,
            ("name", 1, one, F.TYPE_STRING, ""),
            ("data_type", 2, one, F.TYPE_ENUM, ".inference.DataType"),
            ("dims", dims_number, many, F.TYPE_INT64, ""),
        )
    message_type(
        "ModelDynamicBatching",
        ("preferred_batch_size", 1, many, F.TYPE_INT32, ""),
        ("max_queue_delay_microseconds", 2, one, F.TYPE_UINT64, ""),
    )
    message_type(
        "ModelConfig",
        ("name", 1, one, F.TYPE_STRING, ""),
        ("platform", 2, one, F.TYPE_STRING, ""),
        ("max_batch_size", 4, one, F.TYPE_INT32, ""),
        ("input", 5, many, F.TYPE_MESSAGE, ".inference.ModelInput"),
        ("output", 6, many, F.TYPE_MESSAGE, ".inference.ModelOutput"),
        ("dynamic_batching", 11, one, F.TYPE_MESSAGE, ".inference.ModelDynamicBatching"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_config(text: str) -> Any:
    return text_format.Parse(text, model_config_class()())


def data_type(value: int) -> str:
    return DATA_TYPES[value]


EXPECTED_CONFIG = """\
# Written by `handoff export` from contract.yaml: edit the contract and export again.
name: "digits-classifier"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {
    name: "image"
    data_type: TYPE_FP32
    dims: [ 1, 8, 8 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 16, 32, 64 ]
  max_queue_delay_microseconds: 1000
}
"""


@pytest.mark.local
def test_export_writes_a_triton_repository_of_the_exported_model(registered: Registered) -> None:
    out = registered.exports["1"]
    root = out / "triton"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == [f"{MODEL}/1/model.onnx", f"{MODEL}/config.pbtxt", f"{MODEL}/contract.yaml"]
    # The very bytes export checked against torch, and the contract they were checked against.
    assert (root / MODEL / "1/model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert (root / MODEL / "contract.yaml").read_bytes() == (
        registered.project / "contract.yaml"
    ).read_bytes()
    text = (root / MODEL / "config.pbtxt").read_text()
    assert text == EXPECTED_CONFIG
    config = parse_config(text)
    assert (config.name, config.platform, config.max_batch_size) == (MODEL, "onnxruntime_onnx", 64)
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    # Names, types and shapes agree with the ONNX graph Triton will load (batch axis left out).
    graph = onnx.load(str(root / MODEL / "1/model.onnx")).graph
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values, strict=True):
            numpy_name = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
            assert data_type(tensor.data_type) == "TYPE_" + {"float32": "FP32"}[numpy_name]
            dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
            assert dims[0] == -1 and list(tensor.dims) == dims[1:]


@pytest.mark.unit
def test_config_follows_the_contract_for_other_dtypes_shapes_and_latency_budgets(
    default_project: Path,
) -> None:
    contract = Project.load(default_project).contract
    changed = contract.model_copy(
        update={
            "name": "ranker",
            "inputs": [
                contract.inputs[0].model_copy(update={"name": "tokens", "dtype": "int64", "shape": [-1, -1]}),
                contract.inputs[0].model_copy(update={"name": "mask", "dtype": "bool", "shape": [-1, -1]}),
            ],
            "outputs": [
                contract.outputs[0].model_copy(
                    update={"name": "score", "dtype": "float16", "shape": [-1, 1]}
                ),
                contract.outputs[0].model_copy(
                    update={"name": "rank", "dtype": "int32", "shape": [-1, 3, 4]}
                ),
            ],
            "slo": contract.slo.model_copy(update={"latency_p99_ms": 4.0}),
            "task": {"type": "regression", "output": "score"},  # two outputs: the suite scores one
        }
    )
    config = parse_config(config_pbtxt(Contract.model_validate(changed.model_dump())))
    assert config.name == "ranker"
    assert [(t.name, data_type(t.data_type), list(t.dims)) for t in config.input] == [
        ("tokens", "TYPE_INT64", [-1]),  # -1 past the batch axis stays a variable dimension
        ("mask", "TYPE_BOOL", [-1]),
    ]
    assert [(t.name, data_type(t.data_type), list(t.dims)) for t in config.output] == [
        ("score", "TYPE_FP16", [1]),
        ("rank", "TYPE_INT32", [3, 4]),
    ]
    # A tenth of a 4 ms p99 budget: batching waits at most 400 µs.
    assert config.dynamic_batching.max_queue_delay_microseconds == 400


@pytest.mark.unit
def test_the_parser_is_strict_about_triton_field_names_and_types() -> None:
    """What makes the parse above worth something: tritonserver would refuse these too."""
    with pytest.raises(text_format.ParseError, match="max_batch"):
        parse_config(EXPECTED_CONFIG.replace("max_batch_size", "max_batch"))
    with pytest.raises(text_format.ParseError, match="TYPE_FLOAT32"):
        parse_config(EXPECTED_CONFIG.replace("TYPE_FP32", "TYPE_FLOAT32", 1))
    with pytest.raises(text_format.ParseError):
        parse_config(EXPECTED_CONFIG.replace("dims: [ 10 ]", 'dims: [ "10" ]'))


@pytest.mark.local
def test_register_uploads_the_repository_and_tags_the_version_with_its_uri(
    registered: Registered, tmp_path: Path
) -> None:
    client = use_tracking(Project.load(registered.project))
    uris = {v: client.get_model_version(MODEL, v).tags[TRITON_TAG] for v in ("1", "2")}
    for version, uri in uris.items():
        out = registered.exports[version]
        # Named after its content: what a version points at is never overwritten by another.
        assert uri.endswith(f"/triton/{layout_digest(out / 'triton')[:16]}")
        fetched = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / version))
        )
        assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == [
            f"{MODEL}/1/model.onnx",
            f"{MODEL}/config.pbtxt",
            f"{MODEL}/contract.yaml",
        ]
        for path in (out / "triton").rglob("*"):
            if path.is_file():
                assert sha256_of(fetched / path.relative_to(out / "triton")) == sha256_of(path)
    assert uris["1"] != uris["2"]


@pytest.mark.local
def test_register_refuses_an_export_without_a_matching_repository(
    registered: Registered, tmp_path: Path
) -> None:
    client = use_tracking(Project.load(registered.project))
    versions = len(client.search_model_versions(f"name='{MODEL}'"))
    stale = Path(shutil.copytree(registered.exports["1"], tmp_path / "stale"))
    shutil.copyfile(registered.exports["2"] / "model.onnx", stale / "model.onnx")  # replaced by hand
    with pytest.raises(
        HandoffError, match=r"triton/digits-classifier/1/model.onnx is not the exported model"
    ):
        register(registered.project, stale, EVALUATION)
    shutil.rmtree(stale / "triton")  # exported before export wrote the repository
    with pytest.raises(
        HandoffError, match=r"no Triton model repository for 'digits-classifier'.*handoff export"
    ):
        register(registered.project, stale, EVALUATION)
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions  # refused before writing
