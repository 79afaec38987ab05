"""The model server's production features over real HTTP: dynamic batching that never mixes up
requests, the V2 binary tensor extension, Prometheus metrics, the contract's NaN switch and a
SIGTERM that lets in-flight requests finish. The batcher's own rules are checked directly."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from handoff.errors import HandoffError
from handoff.serving import local_server
from handoff.serving.batcher import Batcher
from tests.model_server import start_server

pytestmark = pytest.mark.local

MODEL = "digits-classifier"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def batched(
    default_onnx: Path, default_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A server that holds each batch open 30 ms, so concurrent requests surely share one."""
    state = tmp_path_factory.mktemp("batched")
    handle, url = start_server(
        state, default_onnx, default_project, batching={"max_batch_size": 64, "max_wait_ms": 30}
    )
    yield url
    local_server.terminate(handle)


@pytest.fixture(scope="module")
def session(default_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(default_onnx), providers=["CPUExecutionProvider"])


def images(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 1, 8, 8), dtype=np.float32)


def json_request(array: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "image", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def binary_header(size: int, shape: list[int] | None = None) -> dict[str, Any]:
    parameters = {"binary_data_size": size}
    tensor = {"name": "image", "shape": shape or [1, 1, 8, 8], "datatype": "FP32", "parameters": parameters}
    return {"inputs": [tensor]}


def post_binary(url: str, header: dict[str, Any], payload: bytes) -> requests.Response:
    """A V2 binary tensor extension request: the JSON header, then the raw bytes."""
    encoded = json.dumps(header).encode()
    return requests.post(
        f"{url}{INFER}",
        data=encoded + payload,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(encoded)),
        },
        timeout=30,
    )


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"{url}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows(
    batched: str, session: ort.InferenceSession
) -> None:
    before = metric_samples(batched)
    inputs = [images(seed, rows=1 + seed % 3) for seed in range(16)]

    def infer(array: np.ndarray) -> np.ndarray:
        response = requests.post(f"{batched}{INFER}", json=json_request(array), timeout=30)
        assert response.status_code == 200, response.text
        (logits,) = response.json()["outputs"]
        return np.asarray(logits["data"], dtype=np.float32).reshape(logits["shape"])

    with ThreadPoolExecutor(max_workers=16) as pool:
        served = list(pool.map(infer, inputs))
    for array, logits in zip(inputs, served, strict=True):
        # Each request's own rows, in its own order: what ONNX Runtime gives for it alone.
        np.testing.assert_allclose(logits, session.run(None, {"image": array})[0], rtol=1e-5, atol=1e-5)

    after = metric_samples(batched)
    labels = (("model", MODEL),)
    runs = after[("handoff_batch_requests_count", labels)] - before.get(
        ("handoff_batch_requests_count", labels), 0
    )
    rows = after[("handoff_batch_size_sum", labels)] - before.get(("handoff_batch_size_sum", labels), 0)
    assert rows == sum(len(a) for a in inputs)
    assert runs < len(inputs), f"16 concurrent requests took {runs} model runs: nothing was batched"


def test_binary_tensors_in_and_out_give_the_json_results(batched: str) -> None:
    array = images(7, rows=256)  # 64 KiB of FP32
    raw = array.tobytes()
    header = binary_header(size=len(raw), shape=[256, 1, 8, 8])
    header["parameters"] = {"binary_data_output": True}
    response = post_binary(batched, header, raw)
    assert response.status_code == 200, response.text
    split = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:split])
    (logits,) = meta["outputs"]
    assert logits["shape"] == [256, 10] and logits["parameters"]["binary_data_size"] == 256 * 10 * 4
    binary = np.frombuffer(response.content[split:], dtype=np.float32).reshape(256, 10)
    as_json = requests.post(f"{batched}{INFER}", json=json_request(array), timeout=30).json()
    np.testing.assert_allclose(binary, np.asarray(as_json["outputs"][0]["data"]).reshape(256, 10), rtol=1e-6)


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        (
            binary_header(size=100),
            b"\0" * 100,
            "input 'image': binary_data_size is 100 bytes, but shape [1, 1, 8, 8] of FP32 needs 256",
        ),
        (
            binary_header(size=256),
            b"\0" * 100,
            "input 'image': binary_data_size 256 runs past the end of the body (100 bytes left",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "FP32", "parameters": {"binary_data_size": 256}}]},
            b"\0" * 256,
            "binary request: input 'image' (inputs[0]): shape: Field required",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32"}]},
            b"\0" * 256,
            "binary request: input 'image' (inputs[0]): needs 'data' or parameters.binary_data_size",
        ),
    ],
    ids=["size-vs-shape", "missing-bytes", "no-shape", "no-size"],
)
def test_a_malformed_binary_request_is_a_400_naming_the_input(
    batched: str, header: dict[str, Any], payload: bytes, message: str
) -> None:
    response = post_binary(batched, header, payload)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_metrics_count_requests_by_status_and_time_them(batched: str) -> None:
    before = metric_samples(batched)
    connection = http.client.HTTPConnection(*batched.removeprefix("http://").split(":"))
    for body in (json_request(images(1, 1)), {"inputs": []}, json_request(images(2, 2))):
        connection.request("POST", INFER, body=json.dumps(body), headers={"content-type": "application/json"})
        connection.getresponse().read()
    connection.close()
    after = metric_samples(batched)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("handoff_inference_requests_total", model=MODEL, code="200") == 2
    assert grew("handoff_inference_requests_total", model=MODEL, code="400") == 1
    assert grew("handoff_inference_request_duration_seconds_count", model=MODEL) == 3
    assert grew("handoff_inference_request_duration_seconds_sum", model=MODEL) > 0
    assert ("request_predict_seconds_count", (("model_name", MODEL),)) in after  # KServe's own still there


def test_nan_inputs_are_served_when_the_contract_allows_them(
    default_onnx: Path, default_project: Path, tmp_path: Path
) -> None:
    contract = tmp_path / "contract"
    contract.mkdir()
    text = (default_project / "contract.yaml").read_text()
    assert "    shape: [-1, 1, 8, 8]\n" in text
    (contract / "contract.yaml").write_text(
        text.replace("    shape: [-1, 1, 8, 8]\n", "    shape: [-1, 1, 8, 8]\n    allow_non_finite: true\n")
    )
    handle, url = start_server(tmp_path, default_onnx, contract)
    try:
        body = json_request(images(3, 1))
        body["inputs"][0]["data"][5] = math.nan  # sent as JSON's NaN literal
        response = requests.post(
            f"{url}{INFER}", data=json.dumps(body), headers={"content-type": "application/json"}, timeout=10
        )
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [1, 10]
    finally:
        local_server.terminate(handle)


def test_sigterm_lets_an_in_flight_request_finish(
    default_onnx: Path, default_project: Path, tmp_path: Path
) -> None:
    # The batch is held open 1 s, so the request is surely in flight when SIGTERM arrives.
    handle, url = start_server(
        tmp_path, default_onnx, default_project, batching={"max_batch_size": 64, "max_wait_ms": 1000}
    )
    process = psutil.Process(handle.pid)
    answered: list[requests.Response] = []
    client = threading.Thread(
        target=lambda: answered.append(
            requests.post(f"{url}{INFER}", json=json_request(images(4, 1)), timeout=30)
        )
    )
    client.start()
    time.sleep(0.4)
    process.send_signal(signal.SIGTERM)
    client.join(timeout=30)
    assert answered and answered[0].status_code == 200, answered and answered[0].text
    assert answered[0].json()["outputs"][0]["shape"] == [1, 10]
    # The server drains, then exits 0: a stop asked for is not a failure.
    assert process.wait(timeout=15) == 0
    assert "Application shutdown complete" in Path(handle.log).read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/health/live", timeout=2)


# The batcher's rules, on a model that is plain numpy (row i of the output is 2 * row i).


def doubled(calls: list[dict[str, np.ndarray]]) -> Any:
    def run(feeds: Any) -> list[np.ndarray]:
        calls.append(dict(feeds))
        if np.any(feeds["x"] < 0):
            raise ValueError("negative input")
        return [feeds["x"] * 2]

    return run


async def gather(batcher: Batcher, arrays: list[np.ndarray]) -> list[Any]:
    return await asyncio.gather(*(batcher.run({"x": a}) for a in arrays), return_exceptions=True)


@pytest.mark.unit
def test_batches_respect_max_batch_size_and_keep_shapes_apart() -> None:
    calls: list[dict[str, np.ndarray]] = []
    batcher = Batcher(doubled(calls), max_batch_size=4, max_wait_ms=50)
    arrays = [np.full((1, 3), i, dtype=np.float32) for i in range(6)] + [np.ones((2, 5), dtype=np.float32)]
    results = asyncio.run(gather(batcher, arrays))
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(result[0], array * 2)
    assert [len(c["x"]) for c in calls] == [4, 2, 2]  # 4 rows max; the (2, 5) request runs apart
    batcher.close()


@pytest.mark.unit
def test_a_failing_request_fails_alone_and_batching_off_runs_one_at_a_time() -> None:
    calls: list[dict[str, np.ndarray]] = []
    batcher = Batcher(doubled(calls), max_batch_size=8, max_wait_ms=50)
    arrays = [np.ones((1, 2)), -np.ones((1, 2)), np.full((2, 2), 3.0)]
    ok, bad, ok_too = asyncio.run(gather(batcher, arrays))
    assert isinstance(bad, ValueError) and "negative input" in str(bad)
    np.testing.assert_array_equal(ok[0], arrays[0] * 2)
    np.testing.assert_array_equal(ok_too[0], arrays[2] * 2)
    assert [len(c["x"]) for c in calls] == [4, 1, 1, 2]  # the batch, then each on its own
    batcher.close()

    calls.clear()
    alone = Batcher(doubled(calls), max_batch_size=1, max_wait_ms=50)
    asyncio.run(gather(alone, [np.ones((1, 2))] * 3))
    assert [len(c["x"]) for c in calls] == [1, 1, 1]
    alone.close()


def test_rejected_binary_bodies_never_reach_a_shared_connection_state(batched: str) -> None:
    """After a rejected binary request the same keep-alive connection still serves."""
    host, port = batched.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    bad = b'{"inputs": 1}'
    connection.request(
        "POST",
        INFER,
        body=bad + b"xx",
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(bad)),
        },
    )
    rejected = connection.getresponse()
    assert rejected.status == 400 and "binary request: inputs" in json.loads(rejected.read())["error"]
    connection.request(
        "POST",
        INFER,
        body=json.dumps(json_request(images(5, 1))),
        headers={"content-type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["outputs"][0]["shape"] == [1, 10]
    connection.close()


@pytest.mark.unit
def test_a_fast_model_runs_a_lone_request_on_the_event_loop_and_a_slow_one_in_the_worker() -> None:
    threads: list[str] = []

    def model(delay_s: float) -> Any:
        def run(feeds: Any) -> list[np.ndarray]:
            threads.append(threading.current_thread().name)
            if delay_s:
                time.sleep(delay_s)
            return [feeds["x"]]

        return run

    async def one_by_one(batcher: Batcher, n: int) -> None:
        for _ in range(n):
            await batcher.run({"x": np.ones((1, 2))})

    fast = Batcher(model(0), max_batch_size=8, max_wait_ms=0)
    asyncio.run(one_by_one(fast, 20))
    # The first run is measured in the worker; once the model is known to be fast, on the loop.
    assert threads[0].startswith("model") and threads[-1] == "MainThread"
    fast.close()
    threads.clear()
    slow = Batcher(model(0.002), max_batch_size=8, max_wait_ms=0)
    asyncio.run(one_by_one(slow, 3))
    assert all(name.startswith("model") for name in threads)
    slow.close()


@pytest.mark.unit
def test_a_large_request_or_a_batch_wait_keeps_the_model_off_the_event_loop() -> None:
    threads: list[str] = []

    def run(feeds: Any) -> list[np.ndarray]:
        threads.append(threading.current_thread().name)
        return [feeds["x"]]

    async def calls(batcher: Batcher, sizes: list[int]) -> None:
        for rows in sizes:
            await batcher.run({"x": np.ones((rows, 2))})

    fast = Batcher(run, max_batch_size=10**6, max_wait_ms=0)
    asyncio.run(calls(fast, [1] * 20 + [10**6]))  # ~ms per row x a million rows: not on the loop
    assert threads[-2] == "MainThread" and threads[-1].startswith("model")
    fast.close()
    threads.clear()
    waiting = Batcher(run, max_batch_size=64, max_wait_ms=1)  # a batch wait asks for batching
    asyncio.run(calls(waiting, [1] * 20))
    assert all(name.startswith("model") for name in threads)
    waiting.close()


@pytest.mark.unit
def test_the_worker_outlives_a_batch_that_fails_outside_the_model() -> None:
    failures = iter([RuntimeError("metrics backend down")])

    def on_batch(rows: int, requests: int) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure

    batcher = Batcher(lambda feeds: [feeds["x"]], max_batch_size=8, max_wait_ms=5, on_batch=on_batch)

    async def two() -> list[Any]:
        first = await asyncio.gather(batcher.run({"x": np.ones((1, 2))}), return_exceptions=True)
        second = await batcher.run({"x": np.full((1, 2), 3.0)})
        return [first[0], second]

    failed, answered = asyncio.run(asyncio.wait_for(two(), timeout=10))
    assert isinstance(failed, RuntimeError) and "metrics backend down" in str(failed)
    np.testing.assert_array_equal(answered[0], np.full((1, 2), 3.0))
    batcher.close()


@pytest.mark.unit
def test_the_handover_folder_must_be_private(tmp_path: Path) -> None:
    assert len(str(local_server.handover_path())) < 100  # Unix socket paths are short
    path = local_server.handover_path(tmp_path)
    assert path.parent.stat().st_mode & 0o777 == 0o700
    path.parent.chmod(0o755)
    with pytest.raises(HandoffError, match=r"must be a folder owned by this user that nobody else can enter"):
        local_server.handover_path(tmp_path)
