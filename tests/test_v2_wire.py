"""The V2 wire format on its own: what a body must be to be a request, and the bytes a response is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handoff.serving.v2_wire import Output, WireError, decode_binary, decode_json, encode_response

pytestmark = pytest.mark.unit


def tensor(**change: object) -> dict[str, object]:
    return {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5], **change}


def test_a_request_keeps_ids_outputs_and_the_binary_output_switch() -> None:
    body = {
        "id": "r1",
        "inputs": [tensor()],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        "parameters": {"binary_data_output": False},
    }
    request = decode_json(json.dumps(body).encode())
    assert (request.id, request.outputs, request.binary_outputs) == ("r1", {"y": True, "z": None}, False)
    assert (request.inputs[0].shape, request.inputs[0].data) == ([1, 2], [0.5, 1.5])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "the request body: must be a JSON object, got a list"),
        (b'{"inputs": [], "id": 3}', "id: must be a string, got a number"),
        (json.dumps({"inputs": [tensor(shape=[1.0, 2])]}).encode(), "shape must be a list of integers"),
        (
            json.dumps({"inputs": [tensor(datatype="float32")]}).encode(),
            "unknown datatype 'float32'; V2 datatypes",
        ),
        (json.dumps({"inputs": [tensor(parameters=[])]}).encode(), "parameters: must be a JSON object"),
        (json.dumps({"inputs": [tensor()], "outputs": {"y": 1}}).encode(), "outputs: must be a list"),
        (b'{"inputs": [], "inputs": []}', 'the request body repeats a key (Detected duplicate key "inputs"'),
    ],
    ids=["not-an-object", "id", "float-dim", "numpy-dtype-name", "parameters", "outputs", "duplicate"],
)
def test_what_is_not_a_v2_request_says_where(body: bytes, message: str) -> None:
    with pytest.raises(WireError) as raised:
        decode_json(body)
    assert message in str(raised.value)


def test_nan_literals_parse_so_the_contract_can_name_them() -> None:
    request = decode_json(
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [NaN, -Infinity]}]}'
    )
    data = request.inputs[0].data
    assert data is not None and np.isnan(data[0]) and data[1] == -np.inf


def test_binary_inputs_are_views_of_the_body_sized_by_shape_and_datatype() -> None:
    values = np.arange(6, dtype=np.int32)
    header = json.dumps(
        {
            "inputs": [
                {"name": "ids", "shape": [2, 3], "datatype": "INT32", "parameters": {"binary_data_size": 24}}
            ]
        }
    ).encode()
    request = decode_binary(header + values.tobytes(), str(len(header)))
    raw = request.inputs[0].raw
    assert raw is not None and np.frombuffer(raw, dtype="<i4").tolist() == values.tolist()
    with pytest.raises(
        WireError, match="binary_data_size is 24 bytes, but shape \\[2, 2\\] of INT32 needs 16"
    ):
        decode_binary(header.replace(b"[2, 3]", b"[2, 2]") + values.tobytes(), str(len(header)))
    with pytest.raises(WireError, match="must be the byte length of the JSON header"):
        decode_binary(header, "x")


def test_a_response_is_json_or_a_json_header_then_the_raw_outputs() -> None:
    logits = np.array([[0.25, -1.0]], dtype=np.float32)
    labels = np.array([b"cat"], dtype=object)
    body, headers = encode_response(
        "m", "4", "r1", [Output("logits", "FP32", logits, False), Output("label", "BYTES", labels, False)]
    )
    assert headers == [(b"content-type", b"application/json")]
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "4",
        "id": "r1",
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [0.25, -1.0]},
            {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["cat"]},
        ],
    }
    body, headers = encode_response("m", "4", "r1", [Output("logits", "FP32", logits, True)])
    split = int(dict(headers)[b"inference-header-content-length"])
    header = json.loads(body[:split])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[split:], dtype="<f4").tolist() == [0.25, -1.0]


def test_non_finite_outputs_are_written_as_python_and_triton_write_them() -> None:
    body, _ = encode_response(
        "m", "1", "r", [Output("y", "FP32", np.array([np.nan, np.inf], np.float32), False)]
    )
    assert b"[NaN,Infinity]" in body
    assert json.loads(body)["outputs"][0]["data"][1] == float("inf")
