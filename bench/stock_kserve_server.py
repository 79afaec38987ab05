"""The baseline bench/serving.py compares against: a stock ``kserve.Model`` around an ONNX Runtime session.

What KServe's documentation shows for a custom Python model: load the session in ``load()``, read
the V2 inputs with ``as_numpy()``, run, answer V2 JSON; served by KServe's own ``ModelServer`` (one
worker, gRPC off, as the handoff server runs). No contract checks, guards or readiness gate.
Usage: python bench/stock_kserve_server.py <model.onnx> <model name> <port>
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse

DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.session: Any = None

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        results = self.session.run(None, {i.name: i.as_numpy() for i in payload.inputs})
        outputs = []
        for meta, array in zip(self.session.get_outputs(), results, strict=True):
            output = InferOutput(name=meta.name, shape=list(array.shape), datatype=DATATYPES[meta.type])
            output.set_data_from_numpy(array, binary_data=False)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs
        )


if __name__ == "__main__":
    onnx_path, model_name, port = sys.argv[1:4]
    model = OnnxModel(model_name, onnx_path)
    model.load()
    kserve.ModelServer(http_port=int(port), enable_grpc=False, workers=1).start([model])
