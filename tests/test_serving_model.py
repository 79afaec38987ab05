"""The served model (`kserve.Model` over ONNX Runtime), called directly: contract-checked requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput

from handoff.project import Project
from handoff.serving.onnx_model import OnnxModel

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def served(default_project: Path, default_onnx: Path) -> OnnxModel:
    project = Project.load(default_project)
    model = OnnxModel("digits-classifier", default_onnx, project.contract)
    assert model.load() and model.ready
    return model


def request(
    name: str = "image", datatype: str = "FP32", shape: tuple[int, ...] = (3, 1, 8, 8)
) -> InferRequest:
    tensor = InferInput(name=name, shape=list(shape), datatype=datatype)
    dtype = {"FP32": np.float32, "FP64": np.float64}[datatype]
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype), binary_data=False)
    return InferRequest(model_name="digits-classifier", infer_inputs=[tensor], request_id=None)


def test_predict_returns_the_contract_outputs_and_an_id(served: OnnxModel) -> None:
    response = asyncio.run(served.predict(request()))
    output = response.outputs[0]
    assert (output.name, output.datatype, output.shape) == ("logits", "FP32", [3, 10])
    assert response.id  # generated when the request has none


def test_metadata_comes_from_the_contract(served: OnnxModel) -> None:
    assert served.get_input_types() == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert served.get_output_types() == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"name": "pixels"}, "unknown input(s) ['pixels']; expected inputs ['image']"),
        ({"shape": (3, 64)}, "input 'image': expected shape [-1, 1, 8, 8] (-1 = any), got [3, 64]"),
        ({"datatype": "FP64"}, "input 'image': expected datatype FP32, got FP64"),
    ],
    ids=["name", "shape", "datatype"],
)
def test_requests_that_break_the_contract_are_invalid_input(
    served: OnnxModel, bad: dict, message: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        asyncio.run(served.predict(request(**bad)))
    assert message in str(raised.value)
