"""The Open Inference Protocol as published, fuzzed against a real model server with Schemathesis.

The description is KServe's OpenAPI for the V2 REST data plane (``tests/schemas/``, copied from
``shared/schemas/``). Its model paths are templates (``/v2/models/${MODEL_NAME}/versions/
${MODEL_VERSION}/...``) in which ``${...}`` is not OpenAPI path templating (``{...}``): a fuzzer
would send a literal ``$``. So the test derives the served model's own description:

- each model path gets the served model's name and version written in, and loses its two path
  parameters (a fuzzed name or version would only test the 404, and the pinned ones are the
  protocol the clients use);
- each model path also gets its unversioned twin (``/v2/models/<name>/infer`` beside
  ``/v2/models/<name>/versions/<v>/infer``, same operation, its ``operationId`` suffixed
  ``-unversioned``): the protocol makes the version optional, and the description lists only the
  versioned form;
- the inference request body gets the served model's example requests (OpenAPI ``examples``; the
  published ones are ``x-examples`` for a model with other inputs), so the examples phase sends
  requests the model answers and the 200 response is checked too, not only the 400s that random
  tensors get.

Schemathesis runs as its CLI (``schemathesis run``) in a child process: its pytest plugin replaces
Hypothesis' printer process-wide (every other property test would report its failing example as
``n=,``), so the suite runs with ``-p no:schemathesis`` and nothing here imports it. Every operation
gets the examples, coverage and fuzzing phases (positive and negative data; fuzzing bounded by
``MAX_EXAMPLES``, deterministic, so every run sends the same requests), and two checks: no response
is a server error (5xx), and every response whose status the description documents matches its
schema (``model_version`` a string, metadata ``versions`` a list of strings, no ``null`` where it
says object or string). Other statuses (404, 405, 413, 415...) are the server's to choose; the error
tests check those. The run's JSON report counts the failures; the test wants none.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from handoff.files import write_json
from handoff.serving import local_server
from tests.model_server import start_server

pytestmark = pytest.mark.local

MODEL = "digits-classifier"
VERSION = "3"  # what the server spec says it holds; the default would be "1"
PUBLISHED = Path(__file__).parent / "schemas" / "open-inference-protocol-v2-rest.yaml"
MAX_EXAMPLES = 100  # fuzzed per operation; ~510 requests in all with the other phases, ~8 s on 2 cores
# What the default project's model answers (its contract: image FP32 [-1, 1, 8, 8] -> logits [-1, 10]).
EXAMPLE_REQUESTS = {
    "one image": {
        "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]
    },
    "two images, output named, with id and parameters": {
        "id": "42",
        "parameters": {},
        "inputs": [{"name": "image", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.25] * 128}],
        "outputs": [{"name": "logits"}],
    },
}


def served_description(
    published: dict[str, Any], model: str, version: str, examples: dict[str, Any]
) -> dict[str, Any]:
    """The published description for one served model: names pinned, unversioned paths added,
    the model's example requests on its inference operation."""
    paths: dict[str, Any] = {}
    for template, item in published["paths"].items():
        if "${MODEL_NAME}" not in template:
            paths[template] = item
            continue
        assert "/versions/${MODEL_VERSION}" in template, template  # every model path is versioned
        pinned = {key: value for key, value in item.items() if key != "parameters"}  # MODEL_NAME, _VERSION
        if "post" in pinned:
            pinned = copy.deepcopy(pinned)
            media = pinned["post"]["requestBody"]["content"]["application/json"]
            media["examples"] = {name: {"value": value} for name, value in examples.items()}
        named = template.replace("${MODEL_NAME}", model)
        paths[named.replace("${MODEL_VERSION}", version)] = pinned
        unversioned = copy.deepcopy(pinned)
        for operation in unversioned.values():
            operation["operationId"] += "-unversioned"
        paths[named.replace("/versions/${MODEL_VERSION}", "")] = unversioned
    return {**published, "paths": paths}


def description() -> dict[str, Any]:
    return served_description(yaml.safe_load(PUBLISHED.read_text()), MODEL, VERSION, EXAMPLE_REQUESTS)


@pytest.fixture(scope="module")
def server(
    default_onnx: Path, default_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One real server for the module, serving version 3 of the model: its base URL."""
    handle, url = start_server(
        tmp_path_factory.mktemp("schema"), default_onnx, default_project, model_version=VERSION
    )
    yield url
    local_server.terminate(handle)


def test_the_served_description_pins_the_model_and_adds_unversioned_paths() -> None:
    paths = description()["paths"]
    assert sorted(paths) == [
        "/v2/",
        "/v2/health/live",
        "/v2/health/ready",
        f"/v2/models/{MODEL}",
        f"/v2/models/{MODEL}/infer",
        f"/v2/models/{MODEL}/ready",
        f"/v2/models/{MODEL}/versions/{VERSION}",
        f"/v2/models/{MODEL}/versions/{VERSION}/infer",
        f"/v2/models/{MODEL}/versions/{VERSION}/ready",
    ]
    assert not any("parameters" in item for item in paths.values())
    operation_ids = [operation["operationId"] for item in paths.values() for operation in item.values()]
    assert len(set(operation_ids)) == len(operation_ids) == 9


def test_the_server_keeps_the_published_protocol(server: str, tmp_path: Path) -> None:
    served = tmp_path / "open-inference-protocol-v2-served.json"
    write_json(served, description())
    report = tmp_path / "report.json"
    # cwd: Hypothesis' and Schemathesis' own files stay in tmp_path, and no schemathesis.toml is found
    run = subprocess.run(
        [
            *(sys.executable, "-m", "schemathesis.cli", "--no-color", "run", str(served), "--url", server),
            *("--checks", "not_a_server_error,response_schema_conformance"),
            *("--phases", "examples,coverage,fuzzing", "--mode", "all"),
            *("--max-examples", str(MAX_EXAMPLES), "--generation-deterministic"),
            *("--workers", "1", "--request-timeout", "30"),
            "--continue-on-failure",  # count every failing request, not one per operation
            *("--report", "json", "--report-json-path", str(report)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.exists(), run.stdout + run.stderr
    summary = json.loads(report.read_text())
    output = run.stdout[-20_000:]  # the CLI's own account: each failure with a curl to reproduce it
    assert summary["complete"] and not summary["errors"], output
    assert summary["operations"]["tested"] == 9, output
    failures = {
        f"{failure['title']} ({failure['code']})": failure["count"] for failure in summary["failures"]
    }
    generated = summary["test_cases"]["generated"]
    assert failures == {}, f"distinct failures {failures} in {generated} requests\n{output}"
    assert run.returncode == 0, output
