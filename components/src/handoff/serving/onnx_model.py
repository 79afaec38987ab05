"""A ``kserve.Model`` that serves an ONNX file through ONNX Runtime, with the contract as its schema.

Load once in ``load()``, then ``predict``. Requests are checked against the contract (names,
datatypes, shapes) and rejected with ``InvalidInput`` (HTTP 400) naming the input and what was
expected, so a client never gets an opaque ONNX Runtime error.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput

from handoff.contract import Contract, TensorSpec
from handoff.onnx_io import open_session


class OnnxModel(kserve.Model):
    """One ONNX model behind the V2 protocol; the contract is its request and metadata schema."""

    def __init__(self, name: str, onnx_path: Path, contract: Contract):
        super().__init__(name)
        self.onnx_path = onnx_path
        self.contract = contract
        self.session: Any = None

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
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        """``/v2/models/<name>`` metadata comes from the contract, the schema clients code against."""
        return [spec.v2_metadata() for spec in self.contract.inputs]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [spec.v2_metadata() for spec in self.contract.outputs]

    def _array(self, spec: TensorSpec, request: InferRequest) -> np.ndarray:
        tensor = request.get_input_by_name(spec.name)
        if tensor is None:
            raise InvalidInput(f"input '{spec.name}' is missing; expected inputs {self.contract.input_names}")
        if tensor.datatype != spec.v2_datatype:
            raise InvalidInput(
                f"input '{spec.name}': expected datatype {spec.v2_datatype}, got {tensor.datatype}"
            )
        if not spec.accepts(list(tensor.shape)):
            raise InvalidInput(
                f"input '{spec.name}': expected shape {spec.shape} (-1 = any), got {list(tensor.shape)}"
            )
        try:
            array = tensor.as_numpy()
        except Exception as exc:  # noqa: BLE001 - malformed data is the client's error
            raise InvalidInput(
                f"input '{spec.name}': data does not match shape "
                f"{list(tensor.shape)} and datatype {tensor.datatype}: {exc}"
            ) from None
        return array.astype(spec.numpy_dtype, copy=False).reshape(tensor.shape)

    def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        """Check each input against the contract (400 on mismatch), run the session, answer V2."""
        unknown = sorted({i.name for i in payload.inputs} - set(self.contract.input_names))
        if unknown:
            raise InvalidInput(f"unknown input(s) {unknown}; expected inputs {self.contract.input_names}")
        feeds = {spec.name: self._array(spec, payload) for spec in self.contract.inputs}
        results = self.session.run(self.contract.output_names, feeds)
        outputs = []
        for spec, array in zip(self.contract.outputs, results, strict=True):
            output = InferOutput(name=spec.name, shape=list(array.shape), datatype=spec.v2_datatype)
            output.set_data_from_numpy(array, binary_data=False)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs
        )
