"""ONNX Runtime sessions and contract checks shared by export, evaluate, check and serving."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from handoff.contract import Contract, TensorSpec
from handoff.errors import HandoffError


def open_session(
    path: Path, provider: str = "CPUExecutionProvider", threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session (the engine the model will be served with), on the CPU unless
    ``provider`` names another execution provider (the CPU stays the fallback for its ops), with
    ``threads`` intra-op threads (None: ONNX Runtime's default, one per core)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise HandoffError(f"ONNX Runtime cannot load the model: {exc}", file=path) from None


def check_arrays(
    specs: Sequence[TensorSpec], arrays: Sequence[np.ndarray], *, what: str, source: str
) -> None:
    """Check count, dtype and shape of arrays against contract specs, naming the first mismatch."""
    if len(arrays) != len(specs):
        raise HandoffError(
            f"contract.yaml declares {len(specs)} ({', '.join(s.name for s in specs)}), "
            f"{source} produced {len(arrays)}",
            file="contract.yaml",
            field=what,
        )
    for index, (spec, array) in enumerate(zip(specs, arrays, strict=True)):
        if array.dtype != spec.numpy_dtype:
            raise HandoffError(
                f"{what}[{index}] '{spec.name}': expected dtype {spec.dtype}, "
                f"{source} produced {array.dtype}",
                file="contract.yaml",
                field=f"{what}[{index}].dtype",
            )
        if not spec.accepts(array.shape):
            raise HandoffError(
                f"{what}[{index}] '{spec.name}': expected shape {spec.shape} (-1 = any), "
                f"{source} produced {list(array.shape)}",
                file="contract.yaml",
                field=f"{what}[{index}].shape",
            )
        outside = first_outside(spec, array)
        if outside is not None:
            value, at, bounds = outside
            raise HandoffError(
                f"{what}[{index}] '{spec.name}': {source} holds {value} at {at}, outside the range {bounds}",
                file="contract.yaml",
                field=f"{what}[{index}].range",
            )


def first_outside(spec: TensorSpec, array: np.ndarray) -> tuple[int, list[int], str] | None:
    """The first value of ``array`` outside ``spec.range``, its index and the range as written
    (``[0, 99]``), or None (also when the spec has no range)."""
    if spec.range is None or not array.size:
        return None
    low, high = spec.range
    bad = (array < low) | (array > high)
    if not bad.any():
        return None
    flat = int(np.argmax(bad.reshape(-1)))
    at = [int(i) for i in np.unravel_index(flat, array.shape)]
    return int(array.reshape(-1)[flat]), at, f"[{low}, {high}]"


def run_session(
    session: ort.InferenceSession, contract: Contract, inputs: Sequence[np.ndarray]
) -> list[np.ndarray]:
    feeds = dict(zip(contract.input_names, inputs, strict=True))
    return session.run(contract.output_names, feeds)
