"""The Triton model-repository layout export writes for serving on a cluster.

KServe's Triton runtime (``kserve-tritonserver``) points ``tritonserver --model-store`` at the
folder its storage initializer downloads, so that folder must be a Triton model repository::

    triton/                         <- storageUri for the Triton runtime (the repository root)
      <model-name>/                 <- storageUri for the project's own KServe runtime
        config.pbtxt                how Triton loads and batches the model (from contract.yaml)
        contract.yaml               the contract, for the KServe runtime (Triton ignores it)
        1/model.onnx                byte-identical to the exported, parity-checked model.onnx
        model.py, *.py              only with preprocess/postprocess (contract ``raw:``): the code
                                    the KServe runtime runs around the model (Triton cannot)

``<model-name>`` is the contract's name: Triton serves a model under its folder's name, and that
is the V2 model name in ``/v2/models/<name>/infer``, the same as local serving and the registry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from handoff.artifacts import ONNX_FILE
from handoff.contract import CONTRACT_FILE, Contract, TensorSpec
from handoff.errors import HandoffError
from handoff.files import atomic_write_bytes, sha256_of

TRITON_DIR = "triton"  # inside export's output folder
CONFIG_FILE = "config.pbtxt"
MODEL_VERSION = "1"  # Triton's version folder: one model per repository, the registry versions it
PLATFORM = "onnxruntime_onnx"

# The largest batch Triton forms (the contract's -1 batch axis needs a bound in config.pbtxt).
MAX_BATCH_SIZE = 64
# Batch sizes the dynamic batcher aims for before the queue delay runs out: powers of two, where
# ONNX Runtime's kernels (and GPU tensor cores) are most efficient.
PREFERRED_BATCH_SIZES = (16, 32, 64)
# How long a request may wait for others to batch with: at most a tenth of the contract's p99
# latency budget, and never more than 1 ms (batching must not be what breaks the SLO).
MAX_QUEUE_DELAY_US = 1000

# numpy dtype name (contract.yaml) -> Triton's DataType enum
TRITON_DTYPES: dict[str, str] = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


def queue_delay_us(contract: Contract) -> int:
    return max(1, min(MAX_QUEUE_DELAY_US, int(contract.slo.latency_p99_ms * 100)))


def _tensor(spec: TensorSpec) -> str:
    # Triton's dims leave out the batch axis when max_batch_size > 0; -1 stays a variable axis.
    dims = ", ".join(str(d) for d in spec.shape[1:])
    return (
        "  {\n"
        f'    name: "{spec.name}"\n'
        f"    data_type: {TRITON_DTYPES[spec.dtype]}\n"
        f"    dims: [ {dims} ]\n"
        "  }"
    )


def config_pbtxt(contract: Contract, precision: str | None = None) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for the contract's tensors.

    ``precision`` (``FP32``, ``FP16``, ``INT8``; for a GPU predictor) turns on ONNX Runtime's
    TensorRT execution provider at the precision of the form optimize chose: fp16 weights run as
    FP16 engines, a QDQ int8 model as INT8 (explicit quantization, no calibration table)."""
    preferred = ", ".join(str(size) for size in PREFERRED_BATCH_SIZES)
    return (
        "# Written by `handoff export` from contract.yaml: edit the contract and export again.\n"
        f'name: "{contract.name}"\n'
        f'platform: "{PLATFORM}"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        "input [\n" + ",\n".join(_tensor(s) for s in contract.inputs) + "\n]\n"
        "output [\n" + ",\n".join(_tensor(s) for s in contract.outputs) + "\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {queue_delay_us(contract)}\n"
        "}\n" + (_tensorrt(precision) if precision else "")
    )


def _tensorrt(precision: str) -> str:
    return (
        "optimization {\n"
        "  execution_accelerators {\n"
        "    gpu_execution_accelerator: [\n"
        "      {\n"
        '        name: "tensorrt"\n'
        f'        parameters {{ key: "precision_mode" value: "{precision}" }}\n'
        "      }\n"
        "    ]\n"
        "  }\n"
        "}\n"
    )


def _check_graph(contract: Contract, onnx_path: Path) -> None:
    """The ONNX graph must have the contract's tensors, or Triton refuses to load config.pbtxt."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    for kind, found, specs in (
        ("inputs", [v for v in graph.input if v.name not in initializers], contract.inputs),
        ("outputs", list(graph.output), contract.outputs),
    ):
        got = [
            (v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, _rank(v))
            for v in found
        ]
        want = [(s.name, s.dtype, len(s.shape)) for s in specs]
        if got != want:
            raise HandoffError(
                f"{onnx_path.name} has {kind} {got} (name, dtype, rank), the contract declares {want}; "
                "config.pbtxt would not match the model",
                file="contract.yaml",
                field=kind,
            )


def _rank(value: onnx.ValueInfoProto) -> int:
    return len(value.type.tensor_type.shape.dim)


def write_layout(
    contract: Contract,
    contract_file: Path,
    onnx_path: Path,
    out: Path,
    code: Sequence[Path] = (),
    precision: str | None = None,
) -> Path:
    """Write ``out/triton/<name>/...`` for ``onnx_path``; returns the repository root.

    ``code``: Python files copied beside the contract (model.py and its helpers, for a model
    whose preprocess/postprocess the handoff-onnx runtime runs). ``precision``: see ``config_pbtxt``.

    Built beside and moved into place, so a failed export never leaves half a repository that a
    later register could upload.
    """
    _check_graph(contract, onnx_path)
    root = out / TRITON_DIR
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=".triton-"))
    try:
        model_dir = scratch / contract.name
        (model_dir / MODEL_VERSION).mkdir(parents=True)
        shutil.copyfile(onnx_path, model_dir / MODEL_VERSION / ONNX_FILE)
        shutil.copyfile(contract_file, model_dir / CONTRACT_FILE)
        for source in code:
            shutil.copyfile(source, model_dir / source.name)
        atomic_write_bytes(model_dir / CONFIG_FILE, config_pbtxt(contract, precision).encode())
        shutil.rmtree(root, ignore_errors=True)
        os.replace(scratch, root)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root


def layout_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def layout_digest(root: Path) -> str:
    """One hash of every file's path and content: names a layout in the artifact store."""
    digest = hashlib.sha256()
    for path in layout_files(root):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


def check_layout(root: Path, contract: Contract, onnx_sha256: str) -> None:
    """What register relies on: the contract's model folder, with the very model being registered."""
    model = root / contract.name / MODEL_VERSION / ONNX_FILE
    config = root / contract.name / CONFIG_FILE
    if not model.is_file() or not config.is_file():
        raise HandoffError(
            f"no Triton model repository for {contract.name!r} (expected {model.relative_to(root.parent)} "
            f"and {config.relative_to(root.parent)}); export the model again with `handoff export`",
            file=root.parent,
        )
    if sha256_of(model) != onnx_sha256:
        raise HandoffError(
            f"{model.relative_to(root.parent)} is not the exported {ONNX_FILE} (sha256 differs); "
            "export the model again with `handoff export`",
            file=root.parent,
        )
