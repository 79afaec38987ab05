"""Faster forms of the exported fp32 ONNX model, made with ONNX Runtime's own tools.

* ``fp32_optimized``: ORT's offline graph optimization (constant folding, fusions) saved as a
  model file, at the *extended* level: the *all* level adds layout rewrites (NCHWc) tied to the
  CPU that ran it, which another node's CPU may not run.
* ``int8_static``: QDQ, uint8 activations and per-channel int8 weights, activation ranges
  calibrated on training items (``quantize_static``), after ORT's quantization pre-processing
  (shape inference, fusions); Softmax stays fp32 (attention masks would take its range).
* ``int8_dynamic``: int8 weights, activations quantized per request (``quantize_dynamic``); made
  only for a model whose weights sit mostly in MatMul/Gemm (transformers, MLPs), the case it
  fits: dynamic quantization leaves Conv activations in fp32.
* ``fp16``: every float tensor in half precision but the graph's inputs and outputs, so the
  contract (float32 in, float32 out) does not change; what a GPU serves fastest.

A form that cannot be made raises ``FormNotMade`` with one sentence that says why (the op ONNX
Runtime does not quantize, the tool's own error): optimize then falls back, never fails.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

CalibrationFeeds = Iterable[dict[str, np.ndarray]]

# Ops that hold a model's weights: where the size and the arithmetic are.
MATMUL_OPS = frozenset({"MatMul", "Gemm"})
WEIGHT_OPS = MATMUL_OPS | {"Conv", "ConvTranspose"}
# What a quantized graph holds where ORT quantized an op (static: QDQ pairs around it; dynamic:
# integer kernels).
QUANTIZED_MARKS = frozenset({"DequantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"})
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class FormNotMade(Exception):
    """The form could not be made from this model; the message says why in one sentence."""


def make_form(
    form: str, fp32: Path, out: Path, calibration: CalibrationFeeds, method: str = "minmax"
) -> Path:
    """Write ``form`` of the fp32 model ``fp32`` to ``out`` (one self-contained file); returns the
    path of the model to score (``fp32`` itself for ``"fp32"``). Raises ``FormNotMade``."""
    if form == "fp32":
        return fp32
    makers = {
        "fp32_optimized": lambda: _graph_optimized(fp32, out),
        "int8_static": lambda: _static_int8(fp32, out, calibration, method),
        "int8_dynamic": lambda: _dynamic_int8(fp32, out),
        "fp16": lambda: _fp16(fp32, out),
    }
    try:
        with _quiet():
            makers[form]()
        onnx.checker.check_model(str(out))  # what MLflow checks when it loads the registered model
    except FormNotMade:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT's tools raise whatever their internals raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormNotMade(f"ONNX Runtime's tools failed: {type(exc).__name__}: {first}") from None
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantization tools log every skipped node at WARNING through the root logger, and
    their sessions warn about each initializer they drop; the step's one line per form says what
    matters."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)  # the sessions ORT's tools open log to stderr themselves
    try:
        yield
    finally:
        logging.disable(previous)


def _graph_optimized(fp32: Path, out: Path) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])


@contextmanager
def _preprocessed(fp32: Path) -> Iterator[Path]:
    """ORT's quantization pre-processing (symbolic shape inference, ORT's basic optimizations), in
    a scratch folder; quantizing without it misses ops whose shapes are unknown."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    scratch = Path(tempfile.mkdtemp(prefix="handoff-quantize-"))
    try:
        prepared = scratch / "preprocessed.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared))
        except Exception as exc:  # noqa: BLE001 - shape inference raises plain Exceptions
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FormNotMade(f"ONNX Runtime's quantization pre-processing failed: {first}") from None
        yield prepared
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Feeds:
    """``CalibrationDataReader`` over the step's calibration feeds (ORT's calibrator pulls them)."""

    def __init__(self, feeds: CalibrationFeeds):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _static_int8(fp32: Path, out: Path, calibration: CalibrationFeeds, method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # ORT's own default set (both registries), but Softmax stays fp32: its input holds attention
    # masks filled with a large negative number, a range that leaves no resolution for the real
    # scores (the text starter's encoder: 86.5% accuracy quantized, 97% with Softmax left out).
    ops = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - {"Softmax"})

    with _preprocessed(fp32) as prepared:
        quantize_static(
            str(prepared),
            str(out),
            _Feeds(calibration),  # duck-typed: ORT only calls get_next
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # U8S8: ORT's x86 CPU kernels take uint8 activations with int8 weights for every
            # quantized Conv and MatMul; with int8 activations most Convs fall back to fp32
            # between Q/DQ pairs (bench/optimize.py: 2.05x vs 0.67x fp32's speed on a ResNet).
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            op_types_to_quantize=ops,
        )
    _check_quantized(fp32, out, "int8_static")


def _dynamic_int8(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32)).graph
    matmul, everything = weight_share(graph)
    if everything == 0 or matmul * 2 < everything:
        raise FormNotMade(
            f"made for models whose weights sit mostly in MatMul/Gemm; this one holds {matmul} of "
            f"its {everything} weights there (the rest in Conv, whose activations dynamic "
            "quantization leaves in fp32): int8_static is the int8 form for it"
        )
    with _preprocessed(fp32) as prepared:
        # MatMul/Gemm only: ORT's default set also turns Conv into ConvInteger, which the ONNX
        # Runtime in Triton's images does not implement.
        quantize_dynamic(
            str(prepared), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=sorted(MATMUL_OPS)
        )
    _check_quantized(fp32, out, "int8_dynamic")


def weight_share(graph: onnx.GraphProto) -> tuple[int, int]:
    """(weights held by MatMul/Gemm, weights held by any of WEIGHT_OPS), counted in elements."""
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    matmul = everything = 0
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        held = sum(sizes.get(name, 0) for name in node.input)
        everything += held
        if node.op_type in MATMUL_OPS:
            matmul += held
    return matmul, everything


def _check_quantized(fp32: Path, out: Path, form: str) -> None:
    """A quantizer that found no op it quantizes writes the fp32 graph back unchanged: that is no
    int8 model, and the reason names the graph's ops."""
    ops = {node.op_type for node in onnx.load(str(out), load_external_data=False).graph.node}
    if ops & QUANTIZED_MARKS:
        return
    original = sorted({node.op_type for node in onnx.load(str(fp32), load_external_data=False).graph.node})
    raise FormNotMade(
        f"ONNX Runtime's quantizer quantized no op of this graph ({', '.join(original)}): none is "
        "an op it quantizes (Conv, MatMul, Gemm, …)"
    )


def _fp16(fp32: Path, out: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model: Any = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    # The converter appends its input casts at the end of the node list; ONNX (and MLflow's loader,
    # which checks the model) wants the graph in topological order.
    converted = OnnxModel(model)
    converted.topological_sort()
    onnx.save(converted.model, str(out))
