"""Property-based fuzzing of the real model server over HTTP: whatever a client sends (arbitrary
JSON, near-miss V2 requests, binary tensor requests with wrong sizes, raw bytes, made-up model
names), the answer is never a 5xx, and every rejection is a V2 ``{"error": "..."}`` body.

Hypothesis runs derandomized (a fixed seed), so CI sees the same cases every run; a failure
prints the smallest body that breaks the property.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff.serving import local_server
from tests.model_server import start_server

pytestmark = pytest.mark.local

MODEL = "digits-classifier"
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Client:
    """One keep-alive connection, reopened only when the server closed it (a 413 does)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connection = http.client.HTTPConnection(host, port, timeout=30)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self.connection.request("POST", path, body=body, headers=headers)
                response = self.connection.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException):
                self.connection.close()
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def client(
    default_onnx: Path, default_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Client]:
    # A small body limit, so the fuzzer also meets it.
    handle, url = start_server(
        tmp_path_factory.mktemp("fuzz"), default_onnx, default_project, max_request_bytes=64 * 1024
    )
    yield Client("127.0.0.1", int(url.rsplit(":", 1)[1]))
    local_server.terminate(handle)


def assert_v2_answer(status: int, body: bytes, sent: Any) -> None:
    assert status < 500, f"{status} for {sent!r:.500}: {body[:300]!r}"
    if status >= 400:
        error = json.loads(body)
        assert isinstance(error, dict) and isinstance(error.get("error"), str) and error["error"], body[:300]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
datatypes = st.sampled_from(
    ["FP32", "FP64", "FP16", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "fp32", "", "X"]
)
shapes = st.lists(
    st.one_of(st.integers(-2, 9), st.sampled_from([2**31, 2**63 - 1, 10**12])), min_size=0, max_size=5
) | st.sampled_from([[1, 1, 8, 8], [2, 1, 8, 8], [0, 1, 8, 8], [1, 64]])
numbers = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-(2**70), 2**70)
data = (
    st.lists(numbers, max_size=200)
    | st.lists(st.one_of(numbers, st.text(max_size=3), st.booleans(), st.none()), max_size=70)
    | st.lists(st.lists(numbers, max_size=8), max_size=8)
    | st.builds(lambda n: [0.5] * n, st.sampled_from([63, 64, 65, 128]))
    | json_values
)
tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["image", "pixels", ""]) | st.text(max_size=5) | json_values,
        "shape": shapes | json_values,
        "datatype": datatypes | json_values,
        "data": data,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "content_type", "x"]), json_values
        ),
    },
)
requests_ = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=5) | json_values,
        "inputs": st.lists(tensors, max_size=3) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["logits", "x"]) | json_values}), max_size=2
        )
        | json_values,
        "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "x"]), json_values),
    },
)


@FUZZ
@given(body=requests_ | json_values)
def test_json_requests_never_get_a_5xx(client: Client, body: Any) -> None:
    raw = json.dumps(body).encode()  # NaN and Infinity travel as JavaScript's literals
    status, answer = client.post(f"/v2/models/{MODEL}/infer", raw, {"content-type": "application/json"})
    assert_v2_answer(status, answer, body)


@FUZZ
# Header values a valid HTTP request can carry (anything else is the HTTP parser's 400, not V2's).
@given(
    header=requests_,
    payload=st.binary(max_size=600),
    length=st.none() | st.from_regex(r"[ -~]{0,4}", fullmatch=True),
)
def test_binary_requests_never_get_a_5xx(
    client: Client, header: Any, payload: bytes, length: str | None
) -> None:
    encoded = json.dumps(header).encode()
    declared = str(len(encoded)) if length is None else length
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": declared}
    status, answer = client.post(f"/v2/models/{MODEL}/infer", encoded + payload, headers)
    assert_v2_answer(status, answer, (header, payload, declared))


@FUZZ
@given(
    body=st.binary(max_size=300), model=st.sampled_from([MODEL, "other"]) | st.text(min_size=1, max_size=8)
)
def test_raw_bytes_and_unknown_models_never_get_a_5xx(client: Client, body: bytes, model: str) -> None:
    path = f"/v2/models/{urllib.parse.quote(model, safe='')}/infer"
    status, answer = client.post(path, body, {"content-type": "application/json"})
    assert_v2_answer(status, answer, (model, body))
