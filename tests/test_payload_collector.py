"""The payload collector (handoff.payload_collector) as KServe's logger meets it on a cluster.

The real collector runs as its own process on 127.0.0.1, for a generated project (``--project``,
what ``handoff collect`` runs) and for a namespace (``--store``, what manifests/monitoring runs),
and receives CloudEvents exactly as KServe's agent posts them (kserve pkg/logger/worker.go with
cloudevents sdk-go's HTTP binding: binary content mode, ``Ce-*`` headers, the inference body as
the event's body, request and response under one ``Ce-Id``, the request's Content-Type on both).
What it writes is read back with ``read_window``, as ``handoff monitor`` reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from handoff import __version__
from handoff.errors import HandoffError
from handoff.feedback import read_labels
from handoff.kube import isvc_manifest
from handoff.payload_collector import (
    MAX_OPEN_LOGS,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    Decoded,
    PayloadCollector,
    Target,
)
from handoff.payload_log import Window, read_window

from .conftest import build, edit_yaml
from .test_manifests import (
    COMMON_LABELS,
    PLATFORM_IMAGE,
    fresh_checkout,
    restricted_violations,
    strict_errors,
)

pytestmark = pytest.mark.unit

MODEL = "digits-classifier"
TTL_S = 1.0  # how long a half-pair waits here (the default is a minute)


@dataclass
class Collector:
    url: str
    store: Path
    process: subprocess.Popen[bytes]

    def post(self, kind: str, event_id: str, body: bytes, **extra: str) -> requests.Response:
        """One event as KServe's agent sends it (the headers sdk-go writes for its attributes)."""
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        headers = {
            "Ce-Id": event_id,
            "Ce-Specversion": "1.0",
            "Ce-Type": REQUEST_TYPE if kind == "request" else RESPONSE_TYPE,
            "Ce-Source": f"{MODEL}-predictor-00002-deployment-5d4f7-abcde",
            "Ce-Time": now,
            "Ce-Recordedtime": now,
            "Ce-Inferenceservicename": MODEL,
            "Ce-Namespace": "ml-models",
            "Ce-Component": "predictor",
            "Ce-Endpoint": "default",
            "Ce-Metadata": "{}",
            "Ce-Annotations": json.dumps({"handoff.dev/model-version": "7"}, separators=(",", ":")),
            "Content-Type": "application/json",
            **extra,
        }
        return requests.post(self.url + "/", data=body, headers=headers, timeout=10)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def window(self, rows: int, store: Path | None = None) -> Window:
        """The store's rows once there are ``rows`` of them (the log writes every 2 s)."""
        deadline = time.monotonic() + 10
        while True:
            found = read_window(store or self.store)
            if found.rows >= rows or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], store: Path) -> Iterator[Collector]:
    port = free_port()
    command = [sys.executable, "-m", "handoff.payload_collector", *args]
    command += ["--host", "127.0.0.1", "--port", str(port), "--pending-ttl-s", str(TTL_S)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert process.poll() is None, process.communicate()[0].decode()
        assert time.monotonic() < deadline, "the collector did not answer /healthz"
        time.sleep(0.05)
    yield Collector(url, store, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0].decode()
    # uvicorn shuts down (the app's lifespan shutdown writes the logs), then re-raises the signal.
    assert process.returncode in (0, -signal.SIGTERM) and "Traceback" not in output, output


@pytest.fixture(scope="module")
def collector(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    """A project's collector (``handoff collect``): handoff.yaml's monitoring.store is a folder."""
    root = tmp_path_factory.mktemp("collector")
    project = Path(shutil.copytree(default_project, root / default_project.name))
    store = root / "payloads"
    edit_yaml(project / "handoff.yaml", lambda d: d["monitoring"].update(store=str(store)))
    yield from start(["--project", str(project)], store)


def request_body(images: np.ndarray, request_id: str | None) -> bytes:
    document: dict[str, Any] = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": list(images.shape),
                "data": images.ravel().tolist(),
            }
        ]
    }
    if request_id is not None:
        document["id"] = request_id
    return json.dumps(document).encode()


def binary_request_body(images: np.ndarray) -> bytes:
    """The V2 binary tensor extension: a JSON header, then the tensor's bytes."""
    blob = images.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": list(images.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    return json.dumps(header).encode() + blob


def response_body(logits: np.ndarray, request_id: str, version: str = "7") -> bytes:
    return json.dumps(
        {
            "model_name": MODEL,
            "model_version": version,
            "id": request_id,
            "outputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": list(logits.shape),
                    "data": logits.ravel().tolist(),
                }
            ],
        }
    ).encode()


def arrays(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((rows, 1, 8, 8), dtype=np.float32), rng.random((rows, 10), dtype=np.float32)


def test_requests_and_responses_pair_in_either_order_into_payload_rows(collector: Collector) -> None:
    """A JSON pair in order, and a binary-extension request whose response came first: the rows
    carry the request's inputs, the response's outputs, the V2 id (else the event's id, which the
    agent made) and the version the InferenceService's annotation names."""
    images_a, logits_a = arrays(2, seed=1)
    first = collector.post("request", "ce-a", request_body(images_a, "req-a"))
    assert (first.status_code, first.content) == (200, b"")
    assert collector.post("response", "ce-a", response_body(logits_a, "req-a")).status_code == 200

    images_b, logits_b = arrays(1, seed=2)
    octet = {"Content-Type": "application/octet-stream"}  # the request's, on the response event too
    assert collector.post("response", "ce-b", response_body(logits_b, "ce-b"), **octet).status_code == 200
    assert collector.post("request", "ce-b", binary_request_body(images_b), **octet).status_code == 200

    window = collector.window(3)
    assert window.rows == 3
    assert window.request_ids == ["req-a", "req-a", "ce-b"]
    assert window.versions == ["7", "7", "7"]
    np.testing.assert_array_equal(np.stack(window.inputs["image"]), np.concatenate([images_a, images_b]))
    np.testing.assert_array_equal(np.stack(window.outputs["logits"]), np.concatenate([logits_a, logits_b]))
    pairs = collector.metrics()[("handoff_collector_pairs_total", (("model", MODEL),))]
    assert pairs == 2


def test_feedback_posted_to_the_collector_is_kept_beside_the_payload_log(collector: Collector) -> None:
    """On a cluster the model server keeps no store, so product code reports outcomes here: what
    ``handoff ab status`` joins with the logged predictions, by request id."""
    url = f"{collector.url}/v2/models/{MODEL}/feedback"
    recorded = requests.post(url, json=[{"id": "req-fb", "labels": [3, 1]}], timeout=10)
    assert recorded.status_code == 200 and recorded.json() == {"recorded": 1, "rows": 2}
    refused = requests.post(url, json={"id": "req-fb"}, timeout=10)
    assert refused.status_code == 400 and "labels must be a non-empty list" in refused.json()["error"]
    other = requests.post(
        f"{collector.url}/v2/models/other/feedback", json={"id": "x", "labels": [1]}, timeout=10
    )
    assert (
        other.status_code == 400 and "this collector logs model 'digits-classifier'" in other.json()["error"]
    )
    deadline = time.monotonic() + 10
    while not (labels := read_labels(str(collector.store))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert labels["req-fb"].tolist() == [3.0, 1.0]


def test_a_request_whose_response_never_comes_expires_and_is_counted(collector: Collector) -> None:
    before = collector.metrics()[("handoff_collector_dropped_total", (("reason", "expired"),))]
    images, _ = arrays(1, seed=3)
    assert collector.post("request", "ce-lonely", request_body(images, "lonely")).status_code == 200
    waiting = collector.metrics()[("handoff_collector_pending_events", ())]
    assert waiting >= 1
    time.sleep(TTL_S * 1.5)
    after = collector.metrics()
    assert after[("handoff_collector_dropped_total", (("reason", "expired"),))] == before + 1
    assert after[("handoff_collector_pending_events", ())] == waiting - 1
    # Its response, arriving late, waits for a request that is gone: nothing is logged.
    pairs = after.get(("handoff_collector_pairs_total", (("model", MODEL),)), 0.0)
    _, logits = arrays(1, seed=3)
    assert collector.post("response", "ce-lonely", response_body(logits, "lonely")).status_code == 200
    late = collector.metrics()
    assert late.get(("handoff_collector_pairs_total", (("model", MODEL),)), 0.0) == pairs
    assert late[("handoff_collector_pending_events", ())] == waiting


def test_a_malformed_event_is_refused_with_the_reason_and_nothing_is_written(collector: Collector) -> None:
    # No series before the model's first pair (this test may run first): 0.
    pairs = collector.metrics().get(("handoff_collector_pairs_total", (("model", MODEL),)), 0.0)
    images, logits = arrays(1, seed=4)
    short = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [1.0, 2.0]}]}
    )
    refused = collector.post("request", "ce-bad", short.encode())
    assert refused.status_code == 400
    assert refused.json()["error"] == (
        "event ce-bad: the request body is not a V2 request: input 'image': shape [1, 1, 8, 8] "
        "needs 64 values, data has 2"
    )
    not_json = collector.post("response", "ce-bad", b"<html>upstream error</html>")
    assert not_json.status_code == 400
    assert (
        "the response body is not a V2 response: the request body is not valid JSON"
        in not_json.json()["error"]
    )
    no_id = requests.post(collector.url + "/", data=request_body(images, None), timeout=10)
    assert no_id.status_code == 400 and "Ce-Id and Ce-Type headers are required" in no_id.json()["error"]

    # A pair whose output the contract does not have: the model moved on without its contract.
    assert collector.post("request", "ce-renamed", request_body(images, "renamed")).status_code == 200
    renamed = response_body(logits, "renamed").replace(b'"logits"', b'"probs"')
    answer = collector.post("response", "ce-renamed", renamed)
    assert answer.status_code == 400
    assert "output(s) ['probs'] are not in contract.yaml; expected ['logits']" in answer.json()["error"]

    counts = collector.metrics()
    assert counts[("handoff_collector_dropped_total", (("reason", "malformed"),))] >= 2
    assert counts[("handoff_collector_dropped_total", (("reason", "mismatch"),))] == 2
    assert counts.get(("handoff_collector_pairs_total", (("model", MODEL),)), 0.0) == pairs  # none logged


def test_a_namespace_collector_keeps_a_store_per_model_and_writes_it_when_stopped(tmp_path: Path) -> None:
    """What manifests/monitoring runs (--store: <store>/<model name>). Triton answers
    model_version "1" (its folder); the row names the registered version the InferenceService's
    annotation forwards. Stopping the pod (SIGTERM) writes what its logs still hold."""
    running = start(["--store", str(tmp_path / "payloads")], tmp_path / "payloads")
    namespace_collector = next(running)
    images, logits = arrays(3, seed=5)
    event = str(uuid.uuid4())  # no V2 id and no Ce-Id from the client: the agent's uuid
    assert namespace_collector.post("request", event, request_body(images, None)).status_code == 200
    triton = response_body(logits, event, version="1")
    assert namespace_collector.post("response", event, triton).status_code == 200
    # A model name is a folder name only when it is a DNS-1123 label.
    bad = response_body(logits, "x").replace(MODEL.encode(), b"../elsewhere")
    assert namespace_collector.post("request", "ce-evil", request_body(images, None)).status_code == 200
    answer = namespace_collector.post("response", "ce-evil", bad)
    assert answer.status_code == 400 and "is not a DNS-1123 label" in answer.json()["error"]

    with pytest.raises(StopIteration):
        next(running)  # SIGTERM, well within the log's 2 s flush interval
    window = read_window(tmp_path / "payloads" / MODEL)
    assert (window.request_ids, window.versions) == ([event] * 3, ["7"] * 3)
    np.testing.assert_array_equal(np.stack(window.inputs["image"]), images)
    np.testing.assert_array_equal(np.stack(window.outputs["logits"]), logits)
    assert sorted(p.name for p in (tmp_path / "payloads").iterdir()) == [MODEL]


def test_a_project_collector_needs_a_store(default_project: Path, tmp_path: Path) -> None:
    with pytest.raises(HandoffError) as caught:
        Target.of_project(default_project)
    assert str(caught.value).startswith(
        "handoff.yaml: monitoring.store: the payload collector writes the store"
    )
    done = subprocess.run(
        [sys.executable, "-m", "handoff.payload_collector", "--project", str(default_project), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert done.returncode == 1 and "error: handoff.yaml: monitoring.store:" in done.stderr


def test_the_collector_manifests_build_into_an_overlay_and_pass_restricted(tmp_path: Path) -> None:
    """manifests/monitoring as an environment adds it (a Component): every object in the overlay's
    namespace with its labels, valid, its pod "restricted", the platform image of this version,
    and the Service the InferenceService's logger url names."""
    manifests = fresh_checkout(tmp_path)
    # The dev overlay with the component added, as an environment's own kustomization adds it.
    overlay = manifests / "overlays/monitoring-check"
    overlay.mkdir()
    dev = yaml.safe_load((manifests / "overlays/dev/kustomization.yaml").read_text())
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({**dev, "components": ["../../monitoring"]}))
    objects = {(o["kind"], o["metadata"]["name"]): o for o in build(overlay)}
    added = {key: o for key, o in objects.items() if key[1] == isvc_manifest.PAYLOAD_COLLECTOR}
    assert set(added) == {
        ("ServiceAccount", "handoff-payload-collector"),
        ("ConfigMap", "handoff-payload-collector"),
        ("Deployment", "handoff-payload-collector"),
        ("Service", "handoff-payload-collector"),
    }
    for obj in added.values():
        assert obj["metadata"]["namespace"] == "ml-models-dev"
        assert COMMON_LABELS.items() <= obj["metadata"]["labels"].items()
        assert strict_errors(obj) is None
    deployment = added[("Deployment", "handoff-payload-collector")]
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}
    assert restricted_violations(pod) == []
    assert template["spec"]["automountServiceAccountToken"] is False
    assert added[("ServiceAccount", "handoff-payload-collector")]["automountServiceAccountToken"] is False
    (container,) = template["spec"]["containers"]
    assert container["image"] == f"{PLATFORM_IMAGE}:{__version__}"
    assert container["command"] == ["python", "-m", "handoff.payload_collector"]
    # Every setting it reads is in the ConfigMap (or optional), and pairs need a single replica.
    data = added[("ConfigMap", "handoff-payload-collector")]["data"]
    for env in container["env"]:
        ref = env.get("valueFrom", {}).get("configMapKeyRef")
        assert ref is None or ref["key"] in data or ref.get("optional"), env
    assert deployment["spec"]["replicas"] == 1
    service = added[("Service", "handoff-payload-collector")]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(80, "http")]


def test_stopping_right_after_a_rollout_keeps_the_rows_of_the_evicted_version(tmp_path: Path) -> None:
    """Each new version opens a log and the oldest is closed; a SIGTERM right after must still find
    the evicted log's rows written (shutdown waits for that close)."""
    collector = PayloadCollector(
        Target(store=str(tmp_path), sample_rate=1.0, max_bytes=1 << 30), flush_s=3600
    )
    for version in range(MAX_OPEN_LOGS + 1):  # the last one evicts version 0's log
        rows = 20_000 if version == 0 else 1  # the evicted log takes a while to write
        images, logits = np.zeros((rows, 1, 8, 8), np.float32), np.zeros((rows, 10), np.float32)
        request = Decoded("e", "request", {"image": images}, f"r{version}", MODEL, str(version), 0)
        collector._log(request, Decoded("e", "response", {"logits": logits}, None, MODEL, None, 0))
    collector.close()
    window = read_window(tmp_path / MODEL, model_version="0")
    assert window.rows == 20_000 and set(window.request_ids) == {"r0"}
