"""The model server as V2 clients nobody here wrote meet it: Triton's ``tritonclient`` (JSON, which it
sends without a ``Content-Type``; binary tensors; gzip and deflate request bodies; its asyncio client;
model metadata, readiness and inference on the versioned paths) and KServe's own
``InferenceRESTClient`` (JSON and binary). Every answer is the model's, checked against bare ONNX
Runtime on the same input, and says which registered version gave it (``model_version``, from the
server spec's ``model_version``: here "3", so a default of "1" cannot pass by accident)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from kserve.inference_client import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from tritonclient.utils import InferenceServerException

from handoff.serving import local_server
from tests.model_server import start_server

pytestmark = pytest.mark.local

MODEL = "digits-classifier"
VERSION = "3"  # the registered version the server holds; not the default "1"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server(
    default_onnx: Path, default_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One real server for the module, serving version 3: its ``host:port`` (tritonclient's form)."""
    handle, url = start_server(
        tmp_path_factory.mktemp("clients"), default_onnx, default_project, model_version=VERSION
    )
    yield url.removeprefix("http://")
    local_server.terminate(handle)


@pytest.fixture(scope="module")
def session(default_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(default_onnx), providers=["CPUExecutionProvider"])


def images(seed: int, rows: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 1, 8, 8), dtype=np.float32)


def assert_the_models_answer(logits: np.ndarray, image: np.ndarray, session: ort.InferenceSession) -> None:
    expected = session.run(None, {"image": image})[0]
    assert logits.shape == expected.shape
    assert float(np.max(np.abs(logits - expected))) <= TOLERANCE


def triton_request(image: np.ndarray, *, binary: bool) -> tuple[list[Any], list[Any]]:
    """tritonclient's inputs and requested outputs; ``binary`` False is its JSON mode."""
    tensor = triton.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image, binary_data=binary)
    return [tensor], [triton.InferRequestedOutput("logits", binary_data=binary)]


def triton_infer(server: str, image: np.ndarray, *, binary: bool, **options: Any) -> Any:
    client = triton.InferenceServerClient(server, network_timeout=30)
    try:
        inputs, outputs = triton_request(image, binary=binary)
        return client.infer(MODEL, inputs, outputs=outputs, **options)
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json-without-content-type", "binary"])
def test_tritonclient_infers(server: str, session: ort.InferenceSession, binary: bool) -> None:
    image = images(1)
    result = triton_infer(server, image, binary=binary)
    assert_the_models_answer(result.as_numpy("logits"), image, session)
    assert result.get_response()["model_version"] == VERSION


@pytest.mark.parametrize("body", ["json", "json-labelled", "binary"])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_sends_a_compressed_request(
    server: str, session: ort.InferenceSession, algorithm: str, body: str
) -> None:
    """``Content-Encoding: gzip`` / ``deflate`` bodies are decoded; the answer may come back
    compressed too (tritonclient asks with ``Accept-Encoding`` and decodes what it gets).
    ``json-labelled`` adds the ``Content-Type`` tritonclient leaves out, so only the compression is new."""
    image = images(2)
    result = triton_infer(
        server,
        image,
        binary=body == "binary",
        headers={"Content-Type": "application/json"} if body == "json-labelled" else None,
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert_the_models_answer(result.as_numpy("logits"), image, session)
    assert result.get_response()["model_version"] == VERSION


def test_tritonclients_asyncio_client_infers(server: str, session: ort.InferenceSession) -> None:
    """Its JSON mode differs from the blocking client's: aiohttp labels the JSON body
    ``application/octet-stream``, with no ``Inference-Header-Content-Length``."""
    image = images(3)

    async def infer_both_ways() -> list[Any]:
        async with triton_aio.InferenceServerClient(server, conn_timeout=30) as client:
            results = []
            for binary in (False, True):
                inputs, outputs = triton_request(image, binary=binary)
                results.append(await client.infer(MODEL, inputs, outputs=outputs))
            return results

    for result in asyncio.run(infer_both_ways()):
        assert_the_models_answer(result.as_numpy("logits"), image, session)
        assert result.get_response()["model_version"] == VERSION


def test_tritonclient_reads_metadata_that_lists_the_served_version(server: str) -> None:
    client = triton.InferenceServerClient(server, network_timeout=30)
    try:
        for version in ("", VERSION):  # unversioned, then versioned
            metadata = client.get_model_metadata(MODEL, model_version=version)
            assert metadata["name"] == MODEL
            assert isinstance(metadata["versions"], list) and VERSION in metadata["versions"], metadata
            assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
            assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    finally:
        client.close()


def test_tritonclient_uses_the_versioned_paths(server: str, session: ort.InferenceSession) -> None:
    client = triton.InferenceServerClient(server, network_timeout=30)
    try:
        assert client.is_model_ready(MODEL, model_version=VERSION)
        image = images(4)
        inputs, outputs = triton_request(image, binary=False)
        result = client.infer(MODEL, inputs, outputs=outputs, model_version=VERSION)
    finally:
        client.close()
    assert_the_models_answer(result.as_numpy("logits"), image, session)
    assert result.get_response()["model_version"] == VERSION


def test_another_version_is_a_404_that_names_the_served_one(server: str) -> None:
    """A client pinned to a version the server does not hold (a rollout or a rollback it missed)
    hears which version is served, not a 501 or an answer from the wrong model."""
    client = triton.InferenceServerClient(server, network_timeout=30)
    try:
        assert not client.is_model_ready(MODEL, model_version="2")
        inputs, outputs = triton_request(images(5), binary=False)
        with pytest.raises(InferenceServerException) as infer_error:
            client.infer(MODEL, inputs, outputs=outputs, model_version="2")
        with pytest.raises(InferenceServerException) as metadata_error:
            client.get_model_metadata(MODEL, model_version="2")
    finally:
        client.close()
    for error in (infer_error.value, metadata_error.value):
        assert error.status() == "404", error.message()
        assert re.search(rf"\b{VERSION}\b", error.message() or ""), error.message()


class RecordingTransport(httpx.AsyncHTTPTransport):
    """Keeps each response (httpx reads its body into the same object): kserve 0.21's
    ``InferResponse.from_bytes`` drops the body's ``model_version``, so the test reads it there."""

    def __init__(self) -> None:
        super().__init__()
        self.responses: list[httpx.Response] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.responses.append(response)
        return response


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserves_rest_client_infers(server: str, session: ort.InferenceSession, binary: bool) -> None:
    image = images(6)
    tensor = InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image, binary_data=binary)
    request = InferRequest(
        MODEL,
        [tensor],
        request_outputs=[RequestedOutput("logits", parameters={"binary_data": binary})],
    )
    transport = RecordingTransport()

    async def infer() -> Any:
        client = InferenceRESTClient(RESTConfig(transport=transport, protocol="v2", timeout=30))
        return await client.infer(f"http://{server}", request, model_name=MODEL)

    response = asyncio.run(infer())
    (logits,) = response.outputs
    assert logits.name == "logits"
    assert_the_models_answer(logits.as_numpy(), image, session)
    (raw,) = transport.responses
    assert ("inference-header-content-length" in raw.headers) == binary  # the answer came as asked
    split = int(raw.headers.get("inference-header-content-length", len(raw.content)))
    assert orjson.loads(raw.content[:split])["model_version"] == VERSION
