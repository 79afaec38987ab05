"""The Open Inference Protocol (V2) on the wire: request bodies in, response bodies out.

Decoding is strict where a lenient parser hides a client's bug: shape entries must be JSON
integers (not ``"1"`` or ``true``), datatype names exact (``FP32``, not ``fp32``), an object may
not repeat a key (which value would win is up to the parser), and every field has its V2 type.
It builds no Python object it does not need: JSON goes through jiter (fast, and it reports
duplicate keys; ``NaN``/``Infinity``, which Python clients send, parse so the contract's finite
check can name them), binary tensor data (the V2 binary extension) stays in the request's bytes
until the model reads it. Responses are written with orjson, which serializes numpy arrays
without building lists.

What a tensor must be to fit the model (names, datatypes and shapes the contract allows, values)
is the model's business (``onnx_model.py``); this module only says whether a body is a V2 request.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import jiter
import numpy as np
import orjson

# The V2 datatypes (the protocol's tensor data types) and the numpy type of their binary form.
NUMPY_OF_DATATYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY_OF_DATATYPE, "BYTES")
HEADER_LENGTH = "inference-header-content-length"


class WireError(ValueError):
    """A body that is not a V2 request (400), with the sentence the client reads."""


# Named tuples rather than dataclasses: several are made for every request, and a tuple is made
# in a fraction of the time.


class Tensor(NamedTuple):
    """One request input as sent: JSON ``data`` (possibly nested lists), or the binary extension's
    bytes (``raw``, a view into the body)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    raw: memoryview | None = None
    array: np.ndarray | None = None  # decoded already (KServe's own request objects)
    parameters: dict[str, Any] = {}  # noqa: RUF012 - never changed (a tuple's field default)


class Request(NamedTuple):
    id: str | None
    inputs: list[Tensor]
    # Requested outputs by name, each with whether it wants binary data (None: the default).
    outputs: dict[str, bool | None] | None
    binary_outputs: bool  # parameters.binary_data_output
    parameters: dict[str, Any] = {}  # noqa: RUF012 - never changed (a tuple's field default)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{where}: must be a JSON object, got {_kind(value)}")
    return value


def _or_empty(value: Any) -> Any:
    """An optional object field: absent or null is an empty object, anything else must be one."""
    return {} if value is None else value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{where}: must be a string, got {_kind(value)}")
    return value


def _tensor(value: Any, index: int, *, binary: bool) -> Tensor:
    # Every request goes through here: the checks are inline and the messages built only on failure.
    raw = _object(value, f"inputs[{index}]")
    name, shape, datatype = raw.get("name"), raw.get("shape"), raw.get("datatype")
    if type(name) is not str or type(shape) is not list or type(datatype) is not str:
        label = f"input '{name}' (inputs[{index}])" if isinstance(name, str) else f"inputs[{index}]"
        for key in ("name", "shape", "datatype"):
            if key not in raw:
                raise WireError(f"{label}: {key}: Field required")
        _string(name, f"{label}: name")
        _string(datatype, f"{label}: datatype")
        raise WireError(f"{label}: shape must be a list of integers, got {json.dumps(shape)}")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            label = f"input '{name}' (inputs[{index}])"
            if all(type(dim) is int for dim in shape):
                raise WireError(f"{label}: shape must be sizes (integers >= 0), got {shape}")
            raise WireError(f"{label}: shape must be a list of integers, got {json.dumps(shape)}")
    if datatype not in NUMPY_OF_DATATYPE and datatype != "BYTES":
        close = [known for known in DATATYPES if known.lower() == datatype.lower()]
        hint = f" (did you mean {close[0]}?)" if close else f"; V2 datatypes are {', '.join(DATATYPES)}"
        raise WireError(f"input '{name}' (inputs[{index}]): unknown datatype {datatype!r}{hint}")
    parameters = raw.get("parameters")
    if parameters is None:
        parameters = {}
    elif type(parameters) is not dict:
        raise WireError(
            f"input '{name}' (inputs[{index}]): parameters: must be a JSON object, got {_kind(parameters)}"
        )
    data = raw.get("data")
    if type(data) is list:
        return Tensor(name, datatype, shape, data, None, None, parameters)
    label = f"input '{name}' (inputs[{index}])"
    if data is not None:
        raise WireError(f"{label}: data must be a list, got {_kind(data)}")
    if not binary:
        raise WireError(f"{label}: data: Field required")
    if "binary_data_size" not in parameters:
        raise WireError(f"{label}: needs 'data' or parameters.binary_data_size")
    return Tensor(name, datatype, shape, None, None, None, parameters)


def _request(document: Any, *, binary: bool) -> Request:
    body = _object(document, "the request body")
    if "inputs" not in body:
        raise WireError("inputs: Field required")
    inputs = body["inputs"]
    if not isinstance(inputs, list):
        raise WireError(f"inputs: Input should be a valid list, got {_kind(inputs)}")
    request_id = body.get("id")
    if request_id is not None:
        _string(request_id, "id")
    parameters = _object(_or_empty(body.get("parameters")), "parameters")
    outputs: dict[str, bool | None] | None = None
    if body.get("outputs") is not None:
        if not isinstance(body["outputs"], list):
            raise WireError(f"outputs: must be a list, got {_kind(body['outputs'])}")
        outputs = {}
        for index, item in enumerate(body["outputs"]):
            item = _object(item, f"outputs[{index}]")
            name = _string(item.get("name"), f"outputs[{index}]: name")
            wanted = _object(_or_empty(item.get("parameters")), f"outputs[{index}]: parameters")
            binary_data = wanted.get("binary_data")
            outputs[name] = binary_data if isinstance(binary_data, bool) else None
    tensors = [_tensor(item, index, binary=binary) for index, item in enumerate(inputs)]
    return Request(
        id=request_id,
        inputs=tensors,
        outputs=outputs,
        binary_outputs=parameters.get("binary_data_output") is True,
        parameters=parameters,
    )


def parse_json(body: bytes) -> Any:
    """A JSON document, or WireError naming where it is broken (or the key it repeats)."""
    try:
        return jiter.from_json(body, catch_duplicate_keys=True, cache_mode="keys")
    except ValueError as exc:
        reason = str(exc)
        if "duplicate key" in reason.lower():
            raise WireError(f"the request body repeats a key ({reason})") from None
        raise WireError(f"the request body is not valid JSON ({reason})") from None


def decode_json(body: bytes) -> Request:
    """A V2 JSON inference request."""
    return _request(parse_json(body), binary=False)


def decode_binary(body: bytes, header_length: str) -> Request:
    """A V2 binary tensor extension request: a JSON header of ``header_length`` bytes, then each
    input's raw bytes in order, as many as its ``parameters.binary_data_size`` says."""
    digits = header_length.strip()
    if not (digits.isascii() and digits.isdigit()) or int(digits) > len(body):
        raise WireError(
            f"Inference-Header-Content-Length must be the byte length of the JSON header at the "
            f"start of the body ({len(body)} bytes), got {header_length!r}"
        )
    split = int(digits)
    try:
        request = _request(parse_json(body[:split]), binary=True)
    except WireError as exc:
        raise WireError(f"binary request: {exc}") from None
    view = memoryview(body)
    offset = split
    tensors = []
    for tensor in request.inputs:
        where = f"input '{tensor.name}'"
        if tensor.data is not None:
            tensors.append(tensor)
            continue
        size = tensor.parameters["binary_data_size"]
        if type(size) is not int or size < 0:
            raise WireError(f"{where}: parameters.binary_data_size must be a byte count, got {size!r}")
        item = NUMPY_OF_DATATYPE.get(tensor.datatype)
        if item is not None and size != math.prod(tensor.shape) * item.itemsize:
            raise WireError(
                f"{where}: binary_data_size is {size} bytes, but shape {tensor.shape} of "
                f"{tensor.datatype} needs {math.prod(tensor.shape) * item.itemsize}"
            )
        if offset + size > len(body):
            raise WireError(
                f"{where}: binary_data_size {size} runs past the end of the body "
                f"({len(body) - offset} bytes left after the JSON header and earlier inputs)"
            )
        tensors.append(
            Tensor(
                tensor.name,
                tensor.datatype,
                tensor.shape,
                raw=view[offset : offset + size],
                parameters=tensor.parameters,
            )
        )
        offset += size
    if offset != len(body):
        raise WireError(
            f"the inputs' binary_data_size add up to {offset - split} bytes, but "
            f"{len(body) - split} follow the JSON header"
        )
    return Request(request.id, tensors, request.outputs, request.binary_outputs, request.parameters)


def bytes_elements(raw: memoryview, count: int, where: str) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then its bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise WireError(f"{where}: BYTES data ends inside an element's 4-byte length")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(raw):
            raise WireError(f"{where}: a BYTES element of {size} bytes runs past its binary_data_size")
        items.append(bytes(raw[offset : offset + size]))
        offset += size
    if len(items) != count:
        raise WireError(f"{where}: shape needs {count} BYTES elements, binary data has {len(items)}")
    return items


class Output(NamedTuple):
    name: str
    datatype: str
    array: np.ndarray
    binary: bool


def flat_values(data: Any) -> list[Any]:
    """V2 JSON ``data``, flat or nested in its tensor's shape, as one flat list in order."""
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def object_array(items: list[bytes], shape: list[int]) -> np.ndarray:
    """BYTES elements as the object array of ``bytes`` numpy code (and preprocess) gets."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _json_data(output: Output) -> Any:
    array = output.array
    if output.datatype == "BYTES":
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in array.reshape(-1)
        ]
    if array.dtype == np.float16:
        return array.astype(np.float32).reshape(-1)  # orjson has no float16
    return array.reshape(-1)  # C-contiguous, as orjson needs: a view, or a copy when it was not


def _binary_data(output: Output) -> bytes:
    array = output.array
    if output.datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            value = item if isinstance(item, bytes) else str(item).encode()
            parts += [len(value).to_bytes(4, "little"), value]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_OF_DATATYPE[output.datatype]).tobytes()


def encode_response(
    model_name: str, model_version: str, request_id: str, outputs: list[Output]
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The response body and its headers: JSON, or a JSON header followed by the binary outputs
    (``Inference-Header-Content-Length`` says where the header ends)."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.array.shape),
        }
        if output.binary:
            blob = _binary_data(output)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(output)
        described.append(entry)
    document = {
        "model_name": model_name,
        "model_version": model_version,
        "id": request_id,
        "outputs": described,
    }
    header = _dumps(document)
    if not blobs:
        return header, [(b"content-type", b"application/json")]
    return header + b"".join(blobs), [
        (b"content-type", b"application/octet-stream"),
        (HEADER_LENGTH.encode(), str(len(header)).encode()),
    ]


def _dumps(document: dict[str, Any]) -> bytes:
    """orjson, unless an output holds NaN or infinities: JSON has no literal for them and orjson
    writes them as ``null`` (nothing else in a response is null), so those responses are written
    again with Python's ``NaN``/``Infinity``, as Triton writes them and V2 clients in Python
    (tritonclient, KServe's) read them back."""
    body = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" not in body:
        return body
    plain = {
        **document,
        "outputs": [
            {**entry, "data": entry["data"].tolist()} if isinstance(entry.get("data"), np.ndarray) else entry
            for entry in document["outputs"]
        ],
    }
    return json.dumps(plain, separators=(",", ":")).encode()


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
