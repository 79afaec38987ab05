"""A ``kserve.Model`` that serves an ONNX file through ONNX Runtime, with the contract as its schema.

Load once in ``load()``, then ``predict``. Requests are checked against the contract (names,
datatypes, shapes) and their data (value count, element types, finite numbers unless the contract
allows others, integers within the contract's ``range``), and rejected with ``InvalidInput``
(HTTP 400) naming the input and what was expected, so a client never gets an opaque ONNX Runtime
error. Checked requests go through the dynamic batcher (``batcher.py``) to the session. Outputs
are JSON, or raw bytes when the request asks for the V2 binary tensor extension
(``binary_data_output`` or an output's ``binary_data``).

With model.py's preprocess/postprocess (the contract's ``raw:``), requests are checked against
``raw.inputs`` instead (``BYTES`` allowed), preprocess turns each into the model's inputs (a hook
that raises on a request is a 400 naming it), and postprocess turns the model's outputs into the
``raw.outputs`` the response carries. The hooks are model.py's, imported from the model's folder
in ``load()`` (``raw_io.load_serving_hooks``), and run in this process.

With a ``PayloadLog``, each answered request is offered to it: the inputs as the request gave them
(before preprocess) and the response's outputs (after postprocess, all of them).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InferenceError, InvalidInput

from handoff.contract import Contract, TensorSpec
from handoff.errors import HandoffError
from handoff.onnx_io import first_outside, open_session
from handoff.payload_log import PayloadLog
from handoff.raw_io import HookRaised, check_raw_hooks, has_raw_hooks, load_serving_hooks, run_hook
from handoff.serving import metrics
from handoff.serving.batcher import Batcher
from handoff.serving.v2_wire import (
    NUMPY_OF_DATATYPE,
    Output,
    Request,
    Tensor,
    WireError,
    bytes_elements,
    flat_values,
    object_array,
)

# A child of KServe's logger, so its lines land in the server log in the same format.
log = logging.getLogger("kserve.handoff")

# Runs with inputs at least this large give ONNX Runtime's memory arena back when they end.
SHRINK_ARENA_BYTES = 1024 * 1024
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

# numpy's kinds for JSON data that may fill a tensor of each kind: no strings, nulls or booleans
# in numbers (numpy would turn True into 1.0 and None into NaN), no fractions in integers.
_ALLOWED_KINDS = {"f": "fi", "i": "iu", "u": "iu", "b": "b"}
_KIND_NAMES = {"f": "numbers", "i": "integers", "u": "non-negative integers", "b": "true/false values"}
# A flat JSON list longer than this is converted a slice at a time: numpy never holds a float64
# copy of all of it, and between slices the event loop's thread gets the GIL back (health checks
# answer while a maximum-size request is decoded).
_SLICE = 1 << 16


def _numbers(where: str, spec: TensorSpec, data: list[Any], count: int) -> np.ndarray:
    """JSON numbers as a flat array of the contract's dtype, checked slice by slice."""
    if len(data) != count or (data and isinstance(data[0], list)):  # nested in the tensor's shape
        raw = _flat_array(where, data, count)
        if raw.dtype == object:
            raise InvalidInput(f"{where}: data must be a flat (or evenly nested) list of {count} values")
        return _typed(where, spec, raw.reshape(-1), count)
    if count <= _SLICE:
        return _typed(where, spec, _flat_array(where, data, count), count)
    out = np.empty(count, dtype=spec.numpy_dtype)
    for start in range(0, count, _SLICE):
        part = _flat_array(where, data[start : start + _SLICE], count)
        out[start : start + len(part)] = _typed(where, spec, part, part.size)
    return out


def _flat_array(where: str, data: list[Any], count: int) -> np.ndarray:
    try:
        return np.asarray(data)
    except ValueError:  # ragged nesting, or lists among the numbers
        raise InvalidInput(
            f"{where}: data must be a flat (or evenly nested) list of {count} values"
        ) from None


def _typed(where: str, spec: TensorSpec, raw: np.ndarray, count: int) -> np.ndarray:
    want = spec.numpy_dtype
    if raw.size != count or raw.ndim != 1:
        raise InvalidInput(f"{where}: data must be a flat (or evenly nested) list of {count} values")
    if raw.size and raw.dtype.kind not in _ALLOWED_KINDS[want.kind]:
        raise InvalidInput(f"{where}: data must be {_KIND_NAMES[want.kind]} for datatype {spec.v2_datatype}")
    if want.kind in "iu" and raw.size:
        info = np.iinfo(want)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(
                f"{where}: data outside the range of {spec.v2_datatype} [{info.min}, {info.max}]"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        return raw.astype(want, copy=False)


def _count(value: Any) -> int:
    """How many values a (possibly nested) JSON list holds."""
    if not isinstance(value, list):
        return 1
    if value and isinstance(value[0], list):
        return sum(_count(item) for item in value)
    return len(value)


def _checked(where: str, spec: TensorSpec, shape: list[int], data: list[Any]) -> np.ndarray:
    """JSON tensor data as the contract's dtype, or InvalidInput saying what is wrong with it."""
    expected_count = math.prod(shape)
    found = _count(data)
    if found != expected_count:
        raise InvalidInput(f"{where}: shape {shape} needs {expected_count} values, data has {found}")
    flat = _numbers(where, spec, data, expected_count)
    try:
        array = flat.reshape(shape)
    except ValueError as exc:  # an empty tensor with an absurd dimension beside the 0
        raise InvalidInput(f"{where}: shape {shape} cannot be made: {exc}") from None
    return _finite(where, spec, array)


def _checked_bytes(where: str, shape: list[int], data: list[Any]) -> np.ndarray:
    """JSON strings for a BYTES input, as the object array of UTF-8 ``bytes`` preprocess gets."""
    expected_count = math.prod(shape)
    flat = flat_values(data)
    if len(flat) != expected_count:
        raise InvalidInput(f"{where}: shape {shape} needs {expected_count} values, data has {len(flat)}")
    if not all(isinstance(v, str) for v in flat):
        raise InvalidInput(f"{where}: data must be strings for datatype BYTES")
    return object_array([v.encode("utf-8") for v in flat], shape)


def _all_finite(array: np.ndarray) -> bool:
    # One reduction where it can answer: a finite sum means finite values; a sum that is not
    # (NaN, or an overflow of large finite values) is looked at value by value.
    return math.isfinite(array.sum()) or bool(np.isfinite(array).all())


def _finite(where: str, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """``array`` when its values are ones the model accepts: finite numbers (unless the contract
    allows others) and integers within the contract's range."""
    outside = first_outside(spec, array)
    if outside is not None:
        # Past an embedding table ONNX Runtime's Gather fails (a 500); a negative id it wraps
        # around silently (a wrong 200). Neither is the client's answer.
        value, at, bounds = outside
        raise InvalidInput(f"{where}: {value} at {at} is outside the contract's range {bounds}")
    if array.dtype.kind == "f" and not spec.allow_non_finite and not _all_finite(array):
        raise InvalidInput(
            f"{where}: data holds NaN or infinite values (or values too large for {spec.v2_datatype}); "
            "the model accepts finite numbers only (contract.yaml: allow_non_finite: true on the "
            "input allows others)"
        )
    return array


class OnnxModel(kserve.Model):
    """One ONNX model behind the V2 protocol; the contract is its request and metadata schema."""

    def __init__(
        self,
        name: str,
        onnx_path: Path,
        contract: Contract,
        *,
        max_batch_size: int = 1,
        max_wait_ms: float = 0,
        code_dir: Path | None = None,
        payload_log: PayloadLog | None = None,
    ):
        super().__init__(name)
        self.payload_log = payload_log
        self.onnx_path = onnx_path
        self.contract = contract
        # Where model.py is (the contract's folder): imported in load() when the contract has raw:.
        self.code_dir = code_dir
        self.hooks: ModuleType | None = None
        self.session: Any = None
        # What every request is checked against, read from the contract once.
        self.request_specs = contract.request_inputs
        self.response_specs = contract.response_outputs
        self.input_names = [spec.name for spec in self.request_specs]
        self.input_set = set(self.input_names)
        self.response_names = [spec.name for spec in self.response_specs]
        self.response_types = [(spec.name, spec.v2_datatype) for spec in self.response_specs]
        self.output_names = contract.output_names
        self.batcher = Batcher(
            self._run,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            on_batch=metrics.batch_recorder(name),
        )

    def load(self) -> bool:
        """Open the ONNX Runtime session once; a model that contradicts its contract never gets ready."""
        self.session = open_session(self.onnx_path)
        for kind, found, declared in (
            ("inputs", [i.name for i in self.session.get_inputs()], self.contract.input_names),
            ("outputs", [o.name for o in self.session.get_outputs()], self.contract.output_names),
        ):
            if found != declared:
                # Never becomes ready: serving a model its own contract does not describe would
                # turn every request into a 500.
                raise ValueError(f"{self.onnx_path} has {kind} {found}, its contract declares {declared}")
        if has_raw_hooks(self.contract):
            folder = self.code_dir or self.onnx_path.parent
            self.hooks = load_serving_hooks(folder)
            check_raw_hooks(self.hooks, self.contract, folder / "contract.yaml")
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        """``/v2/models/<name>`` metadata comes from the contract, the schema clients code against
        (``raw.inputs``/``raw.outputs`` when preprocess/postprocess run here)."""
        return [spec.v2_metadata() for spec in self.contract.request_inputs]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [spec.v2_metadata() for spec in self.contract.response_outputs]

    def _array(self, spec: TensorSpec, tensor: Tensor | None) -> np.ndarray:
        if tensor is None:
            raise InvalidInput(f"input '{spec.name}' is missing; expected inputs {self.input_names}")
        where = f"input '{spec.name}'"
        if tensor.datatype != spec.v2_datatype:
            raise InvalidInput(f"{where}: expected datatype {spec.v2_datatype}, got {tensor.datatype}")
        shape = tensor.shape
        if not spec.accepts(shape):
            raise InvalidInput(f"{where}: expected shape {spec.shape} (-1 = any), got {shape}")
        if tensor.data is not None:
            if spec.v2_datatype == "BYTES":
                return _checked_bytes(where, shape, tensor.data)
            return _checked(where, spec, shape, tensor.data)
        if tensor.array is not None:  # decoded by KServe (``predict``)
            array = tensor.array
        elif spec.v2_datatype == "BYTES":
            assert tensor.raw is not None
            try:
                return object_array(bytes_elements(tensor.raw, math.prod(shape), where), shape)
            except WireError as exc:
                raise InvalidInput(str(exc)) from None
        else:  # binary tensor data extension: the bytes are already typed (sizes checked on decoding)
            assert tensor.raw is not None
            array = np.frombuffer(tensor.raw, dtype=NUMPY_OF_DATATYPE[tensor.datatype])
        try:
            array = array.reshape(shape).astype(spec.numpy_dtype, copy=False)
        except Exception as exc:  # noqa: BLE001 - malformed data is the client's error
            raise InvalidInput(f"{where}: binary data does not match shape {shape}: {exc}") from None
        return _finite(where, spec, array)

    def _hook(self, hook: str, arrays: dict[str, np.ndarray], specs: list[TensorSpec], field: str) -> Any:
        """Run model.py's ``hook``: raising on a request is the request's fault (400, naming the
        hook and model.py's line); returning what the contract does not declare is the model's (500)."""
        assert self.hooks is not None
        try:
            return run_hook(self.hooks, hook, arrays, specs, field)
        except HookRaised as exc:
            raise InvalidInput(f"model.py {hook}() rejected the request: {exc.detail}") from None
        except HandoffError as exc:
            log.error("model.py %s() broke the contract: %s", hook, exc.detail)
            raise InferenceError(f"model.py {hook}() broke the contract: {exc.detail}") from None

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # ONNX Runtime's arena keeps the largest run's activations for good (150 MB for a 16 MiB
        # request to a small CNN); after a large run it hands them back instead.
        large = sum(array.nbytes for array in feeds.values()) >= SHRINK_ARENA_BYTES
        return list(self.session.run(self.output_names, dict(feeds), _SHRINK if large else None))

    def decode(self, request: Request) -> dict[str, np.ndarray]:
        """Each input checked against the contract (``InvalidInput``, a 400, naming what is wrong),
        as the array the model (or preprocess) gets. Pure CPU work on the request alone: the front
        door runs it off the event loop for large requests."""
        expected = self.input_names
        by_name = {tensor.name: tensor for tensor in request.inputs}
        if not by_name.keys() <= self.input_set:
            unknown = sorted(by_name.keys() - self.input_set)
            raise InvalidInput(f"unknown input(s) {unknown}; expected inputs {expected}")
        if len(by_name) != len(request.inputs):
            given = Counter(tensor.name for tensor in request.inputs)
            repeated = sorted(name for name, count in given.items() if count > 1)
            raise InvalidInput(f"input(s) {repeated} given more than once; expected inputs {expected}")
        if request.outputs is not None and not request.outputs.keys() <= set(self.response_names):
            unknown_outputs = sorted(request.outputs.keys() - set(self.response_names))
            raise InvalidInput(
                f"unknown output(s) {unknown_outputs}; the model's outputs are {self.response_names}"
            )
        feeds = {spec.name: self._array(spec, by_name.get(spec.name)) for spec in self.request_specs}
        rows = {name: array.shape[0] for name, array in feeds.items()}
        if len(set(rows.values())) > 1:
            raise InvalidInput(f"every input needs the same first (batch) dimension, got {rows}")
        return feeds

    async def infer(
        self,
        request: Request,
        feeds: dict[str, np.ndarray] | None = None,
        *,
        request_id: str | None = None,
    ) -> list[Output]:
        """The response's outputs for a V2 request (``feeds``: its inputs, already decoded;
        ``request_id``: the id its response carries, for the payload log, else the request's)."""
        if feeds is None:
            feeds = self.decode(request)
        received = feeds
        if self.hooks is not None and hasattr(self.hooks, "preprocess"):
            feeds = self._hook("preprocess", feeds, self.contract.inputs, "inputs")
            rows = {name: array.shape[0] for name, array in feeds.items()}
            if len(set(rows.values())) > 1:
                raise InferenceError(f"model.py preprocess() returned inputs of different batch sizes {rows}")
        try:
            results = await self.batcher.run(feeds)
        except Exception as exc:
            log.exception("inference failed for model %s", self.name)
            raise InferenceError(f"inference failed: {type(exc).__name__}: {exc}") from None
        if self.hooks is not None and hasattr(self.hooks, "postprocess"):
            named = dict(zip(self.output_names, results, strict=True))
            results = list(self._hook("postprocess", named, self.response_specs, "raw.outputs").values())
        if self.payload_log is not None:
            answered = dict(zip(self.response_names, results, strict=True))
            self.payload_log.offer(received, answered, request_id or request.id)
        binary = request.binary_outputs
        if request.outputs is None:
            return [
                Output(name, datatype, array, binary)
                for (name, datatype), array in zip(self.response_types, results, strict=True)
            ]
        outputs = {
            name: Output(name, datatype, array, binary)
            for (name, datatype), array in zip(self.response_types, results, strict=True)
        }
        return [
            Output(
                name,
                outputs[name].datatype,
                outputs[name].array,
                request.binary_outputs if binary is None else binary,
            )
            for name, binary in request.outputs.items()
        ]

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        """KServe's entry point (its own routes and tests): the same checks and run as the front
        door's ``infer``, on a request KServe decoded."""
        request = Request(
            id=payload.id,
            inputs=[
                Tensor(
                    name=tensor.name,
                    datatype=tensor.datatype,
                    shape=list(tensor.shape),
                    data=tensor.data
                    if tensor.data is not None and not isinstance(tensor.data, np.ndarray)
                    else None,
                    array=tensor.as_numpy()
                    if tensor.data is None or isinstance(tensor.data, np.ndarray)
                    else None,
                )
                for tensor in payload.inputs
            ],
            outputs={o.name: None for o in payload.request_outputs} if payload.request_outputs else None,
            binary_outputs=bool(payload.use_binary_outputs),
        )
        response_id = payload.id or str(uuid.uuid4())
        outputs = await self.infer(request, request_id=response_id)
        return InferResponse(
            response_id=response_id,
            model_name=self.name,
            infer_outputs=[
                # KServe encodes the array as JSON or raw bytes, as the request asked.
                InferOutput(name=o.name, shape=list(o.array.shape), datatype=o.datatype, data=o.array)
                for o in outputs
            ],
            use_binary_outputs=bool(payload.use_binary_outputs),
        )
