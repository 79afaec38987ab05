"""Checks a new server must pass before it serves: the smoke test replays the contract example over
Open Inference Protocol v2 REST and compares; the latency check holds the served p99 to the SLO."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from handoff.contract import Contract
from handoff.payload_log import LATENCY_CHECK_ID, SMOKE_TEST_ID


@dataclass(frozen=True)
class SmokeResult:
    passed: bool
    detail: str
    latency_ms: float
    max_abs_diff: float


def smoke_test(url: str, model_name: str, contract: Contract, example: dict[str, Any]) -> SmokeResult:
    """POST the example to ``/v2/models/<name>/infer``; outputs must match the contract and values."""
    try:
        return _smoke_test(url, model_name, contract, example)
    except Exception as exc:  # noqa: BLE001 - a malformed answer is a failed smoke test, not a crash
        return SmokeResult(False, f"unexpected response: {type(exc).__name__}: {exc}", 0.0, float("nan"))


def _smoke_test(url: str, model_name: str, contract: Contract, example: dict[str, Any]) -> SmokeResult:
    started = time.perf_counter()
    try:
        response = requests.post(
            f"{url}/v2/models/{model_name}/infer",
            json={"id": SMOKE_TEST_ID, "inputs": example["inputs"]},
            timeout=30,
        )
    except requests.RequestException as exc:
        return SmokeResult(False, f"request failed: {exc}", 0.0, float("nan"))
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return SmokeResult(
            False, f"HTTP {response.status_code}: {response.text[:300]}", latency, float("nan")
        )
    outputs = {o["name"]: o for o in response.json().get("outputs", [])}
    worst = 0.0
    expected_by_name = {o["name"]: o for o in example["expected_outputs"]}
    for spec in contract.response_outputs:  # raw.outputs when postprocess runs in the server
        expected = expected_by_name.get(spec.name)
        if expected is None:
            return SmokeResult(
                False, f"the example has no expected value for output '{spec.name}'", latency, float("nan")
            )
        got = outputs.get(spec.name)
        if got is None:
            return SmokeResult(
                False, f"output '{spec.name}' missing from the response", latency, float("nan")
            )
        if got["datatype"] != spec.v2_datatype or list(got["shape"]) != list(expected["shape"]):
            return SmokeResult(
                False,
                f"output '{spec.name}': expected {spec.v2_datatype} {expected['shape']}, "
                f"got {got['datatype']} {got['shape']}",
                latency,
                float("nan"),
            )
        if spec.v2_datatype == "BYTES":  # strings: equal or not
            if list(got["data"]) != list(expected["data"]):
                return SmokeResult(
                    False,
                    f"output '{spec.name}': expected {expected['data'][:5]}, got {got['data'][:5]}",
                    latency,
                    float("nan"),
                )
            continue
        diff = np.max(
            np.abs(
                np.asarray(got["data"], dtype=np.float64) - np.asarray(expected["data"], dtype=np.float64)
            ),
            initial=0.0,
        )
        worst = max(worst, float(diff))
    if not worst <= contract.slo.parity_tolerance:
        return SmokeResult(
            False,
            f"served outputs differ from the exported model by {worst:.3g} "
            f"(> slo.parity_tolerance {contract.slo.parity_tolerance:g})",
            latency,
            worst,
        )
    return SmokeResult(True, "outputs match the contract example", round(latency, 3), worst)


@dataclass(frozen=True)
class LatencyResult:
    passed: bool
    detail: str
    p50_ms: float
    p99_ms: float


def latency_check(
    url: str, model_name: str, contract: Contract, example: dict[str, Any], requests_n: int = 200
) -> LatencyResult:
    """Time ``requests_n`` sequential requests of ``slo.latency_batch_size`` rows (the example's
    rows, repeated) over one keep-alive connection, after a warm-up; p99 must be within the SLO."""
    rows = contract.slo.latency_batch_size
    inputs = []
    for tensor in example["inputs"]:
        array = np.asarray(tensor["data"]).reshape(tensor["shape"])
        repeated = np.resize(array, (rows, *array.shape[1:]))
        inputs.append({**tensor, "shape": list(repeated.shape), "data": repeated.ravel().tolist()})
    # Encoded once: the client's encoding is not the server's latency. The id keeps it out of the
    # payload log (synthetic traffic).
    body = json.dumps({"id": LATENCY_CHECK_ID, "inputs": inputs})
    headers = {"content-type": "application/json"}
    timings = []
    with requests.Session() as session:
        for i in range(requests_n + 10):
            started = time.perf_counter()
            try:
                response = session.post(
                    f"{url}/v2/models/{model_name}/infer", data=body, headers=headers, timeout=30
                )
            except requests.RequestException as exc:
                return LatencyResult(False, f"request failed: {exc}", float("nan"), float("nan"))
            if response.status_code != 200:
                return LatencyResult(
                    False, f"HTTP {response.status_code}: {response.text[:300]}", float("nan"), float("nan")
                )
            if i >= 10:  # the first requests warm up the connection and the session
                timings.append((time.perf_counter() - started) * 1000)
    p50, p99 = (float(v) for v in np.percentile(timings, [50, 99]))
    budget = contract.slo.latency_p99_ms
    if p99 > budget:
        return LatencyResult(
            False,
            f"served p99 latency {p99:.2f} ms over {requests_n} requests of {rows} row(s) exceeds "
            f"slo.latency_p99_ms {budget:g}",
            p50,
            p99,
        )
    return LatencyResult(True, f"served p99 {p99:.2f} ms within slo.latency_p99_ms {budget:g}", p50, p99)
