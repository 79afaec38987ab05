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
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InferenceError, InvalidInput

from handoff.contract import Contract, TensorSpec
from handoff.errors import HandoffError
from handoff.onnx_io import first_outside, open_session
from handoff.raw_io import HookRaised, check_raw_hooks, has_raw_hooks, load_serving_hooks, run_hook
from handoff.serving import metrics
from handoff.serving.batcher import Batcher

# A child of KServe's logger, so its lines land in the server log in the same format.
log = logging.getLogger("kserve.handoff")

# numpy's kinds for JSON data that may fill a tensor of each kind: no strings, nulls or booleans
# in numbers (numpy would turn True into 1.0 and None into NaN), no fractions in integers.
_ALLOWED_KINDS = {"f": "fi", "i": "iu", "u": "iu", "b": "b"}
_KIND_NAMES = {"f": "numbers", "i": "integers", "u": "non-negative integers", "b": "true/false values"}


def _checked(where: str, spec: TensorSpec, shape: list[int], data: list[Any]) -> np.ndarray:
    """JSON tensor data as the contract's dtype, or InvalidInput saying what is wrong with it."""
    want = spec.numpy_dtype
    expected_count = math.prod(shape)
    try:
        raw = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InvalidInput(
            f"{where}: data must be a flat (or evenly nested) list of {expected_count} values"
        ) from None
    if raw.size != expected_count:
        raise InvalidInput(f"{where}: shape {shape} needs {expected_count} values, data has {raw.size}")
    if raw.size and raw.dtype.kind not in _ALLOWED_KINDS[want.kind]:
        raise InvalidInput(f"{where}: data must be {_KIND_NAMES[want.kind]} for datatype {spec.v2_datatype}")
    if want.kind in "iu" and raw.size:
        info = np.iinfo(want)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(
                f"{where}: data outside the range of {spec.v2_datatype} [{info.min}, {info.max}]"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        return _finite(where, spec, raw.astype(want, copy=False).reshape(shape))


def _checked_bytes(where: str, shape: list[int], data: list[Any]) -> np.ndarray:
    """JSON strings for a BYTES input, as the object array of UTF-8 ``bytes`` preprocess gets."""
    expected_count = math.prod(shape)
    flat: list[Any] = []
    stack = [data]
    while stack:  # V2 JSON data may be flat or nested in the tensor's shape
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if len(flat) != expected_count:
        raise InvalidInput(f"{where}: shape {shape} needs {expected_count} values, data has {len(flat)}")
    if not all(isinstance(v, str) for v in flat):
        raise InvalidInput(f"{where}: data must be strings for datatype BYTES")
    array = np.empty(len(flat), dtype=object)
    array[:] = [v.encode("utf-8") for v in flat]
    return array.reshape(shape)


def _finite(where: str, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """``array`` when its values are ones the model accepts: finite numbers (unless the contract
    allows others) and integers within the contract's range."""
    outside = first_outside(spec, array)
    if outside is not None:
        # Past an embedding table ONNX Runtime's Gather fails (a 500); a negative id it wraps
        # around silently (a wrong 200). Neither is the client's answer.
        value, at, bounds = outside
        raise InvalidInput(f"{where}: {value} at {at} is outside the contract's range {bounds}")
    if array.dtype.kind == "f" and not spec.allow_non_finite and not np.isfinite(array).all():
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
    ):
        super().__init__(name)
        self.onnx_path = onnx_path
        self.contract = contract
        # Where model.py is (the contract's folder): imported in load() when the contract has raw:.
        self.code_dir = code_dir
        self.hooks: ModuleType | None = None
        self.session: Any = None
        self.batcher = Batcher(
            self._run,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            on_batch=lambda rows, requests: metrics.record_batch(name, rows, requests),
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

    def _array(self, spec: TensorSpec, request: InferRequest) -> np.ndarray:
        tensor = request.get_input_by_name(spec.name)
        if tensor is None:
            names = [s.name for s in self.contract.request_inputs]
            raise InvalidInput(f"input '{spec.name}' is missing; expected inputs {names}")
        where = f"input '{spec.name}'"
        if tensor.datatype != spec.v2_datatype:
            raise InvalidInput(f"{where}: expected datatype {spec.v2_datatype}, got {tensor.datatype}")
        shape = list(tensor.shape)
        if any(dim < 0 for dim in shape) or not spec.accepts(shape):
            raise InvalidInput(f"{where}: expected shape {spec.shape} (-1 = any), got {shape}")
        if spec.v2_datatype == "BYTES" and tensor.data is not None:
            return _checked_bytes(where, shape, tensor.data)
        if tensor.data is None:  # binary tensor data extension: the bytes are already typed
            try:
                array = tensor.as_numpy().astype(spec.numpy_dtype, copy=False)
            except Exception as exc:  # noqa: BLE001 - malformed data is the client's error
                raise InvalidInput(f"{where}: binary data does not match shape {shape}: {exc}") from None
            return _finite(where, spec, array)
        return _checked(where, spec, shape, tensor.data)

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
        return list(self.session.run(self.contract.output_names, dict(feeds)))

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        """Check each input against the contract (400 on mismatch), run it (batched), answer V2."""
        specs = self.contract.request_inputs
        expected = [spec.name for spec in specs]
        answers = self.contract.response_outputs
        unknown = sorted({i.name for i in payload.inputs} - set(expected))
        if unknown:
            raise InvalidInput(f"unknown input(s) {unknown}; expected inputs {expected}")
        repeated = sorted(
            name for name, count in Counter(i.name for i in payload.inputs).items() if count > 1
        )
        if repeated:
            raise InvalidInput(f"input(s) {repeated} given more than once; expected inputs {expected}")
        requested = {o.name for o in payload.request_outputs or []}
        if requested - {spec.name for spec in answers}:
            raise InvalidInput(
                f"unknown output(s) {sorted(requested - {spec.name for spec in answers})}; "
                f"the model's outputs are {[spec.name for spec in answers]}"
            )
        feeds = {spec.name: self._array(spec, payload) for spec in specs}
        rows = {name: array.shape[0] for name, array in feeds.items()}
        if len(set(rows.values())) > 1:
            raise InvalidInput(f"every input needs the same first (batch) dimension, got {rows}")
        if self.hooks is not None and hasattr(self.hooks, "preprocess"):
            feeds = self._hook("preprocess", feeds, self.contract.inputs, "inputs")
            rows = {name: array.shape[0] for name, array in feeds.items()}
            if len(set(rows.values())) > 1:
                raise InferenceError(f"model.py preprocess() returned inputs of different batch sizes {rows}")
        try:
            results = await self.batcher.run(feeds)
        except Exception as exc:
            # InferenceError is answered by FastAPI's own handler (500, V2 body) and keeps the
            # connection open; an exception that escapes resets it.
            log.exception("inference failed for model %s", self.name)
            raise InferenceError(f"inference failed: {type(exc).__name__}: {exc}") from None
        if self.hooks is not None and hasattr(self.hooks, "postprocess"):
            named = dict(zip(self.contract.output_names, results, strict=True))
            results = list(self._hook("postprocess", named, answers, "raw.outputs").values())
        outputs = [
            # KServe encodes the array as JSON or raw bytes, as the request asked.
            InferOutput(name=spec.name, shape=list(array.shape), datatype=spec.v2_datatype, data=array)
            for spec, array in zip(answers, results, strict=True)
        ]
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=bool(payload.use_binary_outputs),
            requested_outputs=payload.request_outputs,
        )
