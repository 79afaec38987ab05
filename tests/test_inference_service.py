"""Deploying to a cluster: the project's KServe InferenceService, through the real kubernetes client.

Only the Kubernetes API is faked (``tests/fake_kube.py``): every object it receives is validated
against the InferenceService CRD schema (strict about unknown fields), and its ``KServe``
controller plays KServe and Knative (revisions, canary traffic, status, predictor pods). The rest
is real: MLflow's registry holds two versions with different weights, and each revision's URL is
a real KServe model server on 127.0.0.1 serving that version's exported ONNX model, so a smoke
test that reaches the wrong revision fails just as it would on a cluster.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from handoff.deployment import DeployResult, deploy_to_cluster, registered_release
from handoff.errors import HandoffError
from handoff.files import write_json
from handoff.kube import inference_service as isvc
from handoff.kube import isvc_manifest, isvc_plan
from handoff.project import Project
from handoff.registry import TRITON_TAG
from handoff.serving import local_server
from handoff.serving.smoke import SmokeResult
from handoff.serving.spec import SETTINGS_ENV
from handoff.step_entry import in_cluster
from handoff.tracking import use_tracking

from . import fake_rbac
from .conftest import HANDOFF, TEMPLATE, edit_yaml
from .fake_kube import APPLY, INFERENCESERVICE, FakeKube, KServe, fake_kube, schema_problems
from .test_triton_layout import MODEL, Registered, registered_versions

NAMESPACE = "ml-models"
KEY = ("inferenceservices", NAMESPACE, MODEL)
JSON_PATCH = "application/json-patch+json"
POLL_S = 0.02
CRASH = (  # what a predictor says when its model file is corrupt, traceback and all
    'Traceback (most recent call last):\n  File "/usr/lib/python3/serve.py", line 12\n'
    "onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf: [ONNXRuntimeError] : 7 : "
    "INVALID_PROTOBUF : "
    "Load model from /mnt/models/digits-classifier/1/model.onnx failed: Protobuf parsing failed."
)


@pytest.fixture(scope="session")
def registered(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """Two registered versions (the registry test_triton_layout checks; made once per session)."""
    return registered_versions(default_project, tmp_path_factory)


@pytest.fixture(scope="module")
def servers(registered: Registered, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real KServe model server per registered version, as a revision of it would be."""

    def start(version: str) -> local_server.ServerHandle:
        state = tmp_path_factory.mktemp(f"server-v{version}")
        sock = local_server.bind("127.0.0.1", 0)
        spec = {
            "model_name": MODEL,
            "onnx_path": str(registered.exports[version] / "model.onnx"),
            "contract_dir": str(registered.project),
            "host": "127.0.0.1",
            "port": sock.getsockname()[1],
        }
        write_json(state / "spec.json", spec)
        return local_server.start(
            state / "spec.json",
            sock,
            model_name=MODEL,
            version=version,
            state_dir=state,
            ready_timeout_s=60,
        )

    with ThreadPoolExecutor(2) as pool:
        handles = dict(zip(("1", "2"), pool.map(start, ("1", "2")), strict=True))
    yield {version: handle.url for version, handle in handles.items()}
    for handle in handles.values():
        local_server.terminate(handle)


def answer(url: str, registered: Registered) -> np.ndarray:
    """What the model at ``url`` says to the contract example."""
    example = json.loads((registered.exports["1"] / "example.json").read_text())
    response = requests.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": example["inputs"]}, timeout=10)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"][0]["data"])


def version_of(obj: dict[str, Any]) -> str:
    return obj["metadata"]["annotations"][isvc.VERSION_KEY]


def serving(servers: dict[str, str]) -> Callable[[dict[str, Any]], str]:
    """Each revision answers with the model its spec names."""
    return lambda obj: servers[version_of(obj)]


def deploy(registered: Registered, fake: FakeKube, version: str, **options: Any) -> DeployResult:
    return deploy_to_cluster(
        registered.project, MODEL, version, api=fake.api_client(), poll_s=POLL_S, **options
    )


def invalid(fake: FakeKube) -> list[str]:
    return [r for r in fake.rejected if r.startswith("422")]


def stored(fake: FakeKube) -> dict[str, Any]:
    return fake.get(*KEY)


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("handoff: deploy: ")]


@pytest.mark.local
def test_the_two_versions_answer_differently(registered: Registered, servers: dict[str, str]) -> None:
    """What makes the smoke tests below telling: one version's server fails the other's example."""
    assert np.max(np.abs(answer(servers["1"], registered) - answer(servers["2"], registered))) > 1e-3


@pytest.mark.local
def test_first_deploy_creates_the_service_and_gives_it_all_traffic(
    registered: Registered, servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_kube(KServe(serving(servers))) as fake:
        result = deploy(registered, fake, "1")
        obj = stored(fake)
    assert (result.target, result.version, result.smoke_passed) == ("cluster", "1", True)
    assert result.url == servers["1"] and result.smoke_detail == "outputs match the contract example"
    assert invalid(fake) == [] and schema_problems(INFERENCESERVICE, obj) == []
    assert [method for method, path in fake.requests if method != "GET"] == ["PATCH"]  # no canary to promote
    project = Project.load(registered.project)
    kserve = project.settings.serving.kserve  # the project's handoff.yaml, as generated
    tags = use_tracking(project).get_model_version(MODEL, "1").tags
    amounts = {"cpu": kserve.cpu, "memory": kserve.memory}
    predictor = obj["spec"]["predictor"]
    assert predictor["model"] == {
        "modelFormat": {"name": "onnx", "version": "1"},
        "protocolVersion": "v2",
        "runtime": "kserve-tritonserver",
        "runtimeVersion": kserve.runtime_version,
        "storageUri": tags[TRITON_TAG],  # the repository root: Triton finds <model>/1/model.onnx under it
        "resources": {"requests": amounts, "limits": amounts},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (kserve.min_replicas, kserve.max_replicas)
    assert predictor.get("serviceAccountName") == kserve.service_account
    assert "canaryTrafficPercent" not in predictor  # the first version takes all traffic
    # On its pods: the version, and the digest that ties what KServe reports to this spec.
    assert predictor["labels"] == {isvc.VERSION_KEY: "1", isvc.SPEC_KEY: isvc.spec_digest(predictor)}
    assert predictor["securityContext"]["runAsNonRoot"] is True
    meta = obj["metadata"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "handoff"
    assert meta["labels"]["app.kubernetes.io/name"] == MODEL
    assert meta["annotations"] == {
        "serving.kserve.io/enable-tag-routing": "true",
        "handoff.dev/model-name": MODEL,
        "handoff.dev/model-version": "1",
        "handoff.dev/onnx-sha256": tags["handoff.onnx_sha256"],
    }
    lines = log_lines(capsys)
    # The test registry keeps artifacts on local disk, which a real predictor could not download.
    assert lines[0].startswith("handoff: deploy: warning: the model's files are on a local path (file://")
    assert re.search(
        r"created InferenceService ml-models/digits-classifier: .* version 1, all traffic", lines[1]
    )
    assert any(
        f"generation 1: revision {MODEL}-predictor-00001, 100% of traffic: Ready=True" in line
        for line in lines
    )
    assert any("smoke test passed at " + servers["1"] in line for line in lines)
    assert lines[-1].endswith("serves digits-classifier version 1 with all traffic")


@pytest.mark.local
def test_a_new_version_is_a_canary_until_its_smoke_test_passes_then_takes_all_traffic(
    registered: Registered, servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_kube(KServe(serving(servers))) as fake:
        deploy(registered, fake, "1")
        result = deploy(registered, fake, "2")
        history = fake.history[KEY]
        obj = stored(fake)
    assert invalid(fake) == [] and result.smoke_passed and result.url == servers["2"]
    states = [
        (h["metadata"]["generation"], version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent"))
        for h in history
    ]
    assert states == [(1, "1", None), (2, "2", 10), (3, "2", None)]  # create, canary, promote
    canary = history[1]
    before = isvc.Served.decode(canary["metadata"]["annotations"][isvc.ROLLBACK_KEY])
    assert before is not None and before.version == "1"
    assert before.predictor == history[0]["spec"]["predictor"]  # what a rollback would restore
    traffic = obj["status"]["components"]["predictor"]["traffic"]
    assert [(t["percent"], t["url"]) for t in traffic] == [(100, servers["2"])]
    assert np.allclose(answer(obj["status"]["url"], registered), answer(servers["2"], registered))
    lines = "\n".join(log_lines(capsys))
    assert "patched InferenceService ml-models/digits-classifier: version 1 → 2, 10% of traffic" in lines
    assert "promoted version 2 of InferenceService ml-models/digits-classifier to all traffic" in lines


@pytest.mark.local
def test_a_ready_status_left_from_the_previous_generation_is_not_trusted(
    registered: Registered, servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Right after the patch, the status still says Ready (for version 1's generation) and its URLs
    still reach version 1, whose answers fail version 2's smoke test: a deploy that took that
    Ready for its own would fail. KServe here takes 8 polls to notice each new generation."""
    kserve = KServe(serving(servers), stale_gets=8)
    with fake_kube(kserve) as fake:
        deploy(registered, fake, "1")
        capsys.readouterr()
        result = deploy(registered, fake, "2")
    assert result.smoke_passed and kserve.stale_answers >= 8
    lines = log_lines(capsys)
    stale = [
        i
        for i, line in enumerate(lines)
        if "generation 2: waiting for its revision (the latest, "
        f"{MODEL}-predictor-00001, is another spec's: Ready=True" in line
    ]
    ready = [
        i
        for i, line in enumerate(lines)
        if f"generation 2: revision {MODEL}-predictor-00002, 10% of traffic: Ready=True" in line
    ]
    smoke = [i for i, line in enumerate(lines) if "smoke test passed at " + servers["2"] in line]
    assert stale and "Ready=True" in lines[stale[0]]  # the stale Ready was seen, and waited out
    assert stale[0] < ready[0] < smoke[0]


@pytest.mark.local
def test_a_crash_looping_predictor_is_rolled_back_with_the_containers_message(
    registered: Registered, servers: dict[str, str]
) -> None:
    kserve = KServe(serving(servers), crash=lambda obj: CRASH if version_of(obj) == "2" else None)
    with fake_kube(kserve) as fake:
        deploy(registered, fake, "1")
        first = stored(fake)
        started = time.monotonic()
        with pytest.raises(HandoffError) as caught:
            deploy(registered, fake, "2")
        elapsed = time.monotonic() - started
        after = stored(fake)
        for _ in range(100):  # KServe acts on the rollback (the deploy waited for that too)
            if (
                after["status"]["components"]["predictor"]["latestCreatedRevision"]
                == f"{MODEL}-predictor-00003"
            ):
                break
            time.sleep(0.01)
            after = stored(fake)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(
        r"container kserve-container is crash-looping \(3 restarts\): .*INVALID_PROTOBUF : Load model from "
        r"/mnt/models/digits-classifier/1/model.onnx failed: Protobuf parsing failed\.",
        message,
    )
    assert (
        "rolled back: version 1's spec is restored with canaryTrafficPercent 0, so its revision keeps"
        in message
    )
    assert elapsed < 10  # the crash loop ends the wait, not serving.kserve.ready_timeout_s (600 s)
    assert invalid(fake) == []
    # The spec says version 1 again, nothing is left of the failed rollout, and the revision that
    # served version 1 keeps all traffic while the restored spec's revision starts.
    assert after["spec"]["predictor"] == {**first["spec"]["predictor"], "canaryTrafficPercent": 0}
    assert after["metadata"]["annotations"] == first["metadata"]["annotations"]
    prev = [t for t in after["status"]["components"]["predictor"]["traffic"] if t["percent"] == 100]
    assert [t["revisionName"] for t in prev] == [f"{MODEL}-predictor-00001"]
    # Version 1 never stopped taking the traffic: the service still answers with it.
    assert np.allclose(answer(after["status"]["url"], registered), answer(servers["1"], registered))


@pytest.mark.local
def test_a_failing_smoke_test_rolls_back_and_the_next_deploy_starts_dark(
    registered: Registered, servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    kserve = KServe(lambda obj: servers["1"])  # version 2's revision is up, with the wrong weights
    with fake_kube(kserve) as fake:
        deploy(registered, fake, "1")
        first = stored(fake)
        with pytest.raises(HandoffError) as caught:
            deploy(registered, fake, "2")
        after = stored(fake)
        # Fixed (the right file this time), version 2 goes out again from the rolled-back state.
        kserve.url_for = serving(servers)
        capsys.readouterr()
        result = deploy(registered, fake, "2")
        history = fake.history[KEY]
    assert re.search(
        r"smoke test of digits-classifier version 2 at \S+ failed: served outputs differ from the exported "
        r"model by \S+ \(> slo.parity_tolerance 0.0001\); rolled back: version 1's spec is restored with "
        r"canaryTrafficPercent 0, so its revision keeps all traffic",
        str(caught.value),
    )
    assert after["spec"]["predictor"] == {**first["spec"]["predictor"], "canaryTrafficPercent": 0}
    assert after["metadata"]["annotations"] == first["metadata"]["annotations"]
    predictor = after["status"]["components"]["predictor"]
    assert [(t["revisionName"], t["percent"]) for t in predictor["traffic"]] == [
        (f"{MODEL}-predictor-00003", 0),  # version 1's restored spec
        (f"{MODEL}-predictor-00001", 100),  # the revision that served version 1 all along
    ]
    assert np.allclose(answer(after["status"]["url"], registered), answer(servers["1"], registered))
    # The failed revision 00002 is still Ready: a canary share for "latest" could reach it until the
    # new revision is up, so the next rollout gets none until its smoke test passed.
    states = [(version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent")) for h in history]
    assert states == [("1", None), ("2", 10), ("1", 0), ("2", 0), ("2", None)]
    assert result.smoke_passed and result.url == servers["2"]
    assert any("version 1 → 2, no traffic until its smoke test passes" in line for line in log_lines(capsys))


@pytest.mark.local
def test_all_at_once_rollouts_roll_back_to_the_previous_spec(
    registered: Registered, servers: dict[str, str], tmp_path: Path
) -> None:
    """canary_percent 0: the new revision takes all traffic once Ready, so a rollback cannot pin
    it to the old revision (KServe's `prev` would be the new one); the previous spec comes back."""
    project = Path(shutil.copytree(registered.project, tmp_path / MODEL))  # with its registry
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"]["kserve"].update(canary_percent=0))
    kserve = KServe(lambda obj: servers["1"])
    with fake_kube(kserve) as fake:
        deploy_to_cluster(project, MODEL, "1", api=fake.api_client(), poll_s=POLL_S)
        with pytest.raises(
            HandoffError, match=r"rolled back: version 1's spec is restored and its revision takes"
        ):
            deploy_to_cluster(project, MODEL, "2", api=fake.api_client(), poll_s=POLL_S)
        history = fake.history[KEY]
        after = stored(fake)
    states = [(version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent")) for h in history]
    assert states == [("1", None), ("2", None), ("1", None)]
    assert after["spec"]["predictor"] == history[0]["spec"]["predictor"]
    assert after["status"]["components"]["predictor"]["latestRolledoutRevision"] == f"{MODEL}-predictor-00003"


# --- what KServe's status is about --------------------------------------------------------------
#
# KServe copies status.observedGeneration from the Knative Service (Serverless) or the predictor's
# Deployment (RawDeployment), whose generations count their own changes (kserve#6081): a KServe
# upgrade re-rendering the Knative Service, an autoscaler scaling the Deployment. The deploy ties
# the status to its spec by the spec's digest on the new revision's pods, or on the Deployment.


def fast_clock() -> float:
    """A clock 60 times faster: serving.kserve.ready_timeout_s (600 s) passes in 10 s."""
    return time.monotonic() * 60


def raw_deployment(fake: FakeKube) -> dict[str, Any]:
    return fake.stored[("deployments", NAMESPACE, f"{MODEL}-predictor")]


@pytest.mark.local
def test_a_healthy_version_rolls_out_after_a_kserve_upgrade_moved_the_knative_generation(
    registered: Registered, servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An upgraded KServe re-renders the Knative Service: a new revision of the same spec, and the
    status's observedGeneration runs one ahead of the InferenceService's generation. The status
    left from before the next patch then claims that patch's generation, Ready, with a `latest`
    URL reaching version 1: trusting observedGeneration would smoke-test version 1 and roll back
    a healthy version 2. KServe here takes 8 polls to notice each new generation."""
    kserve = KServe(serving(servers), stale_gets=8)
    with fake_kube(kserve) as fake:
        deploy(registered, fake, "1")
        kserve.upgrade(fake)
        upgraded = stored(fake)
        capsys.readouterr()
        result = deploy(registered, fake, "2", clock=fast_clock)
        history = fake.history[KEY]
        obj = stored(fake)
    assert (upgraded["metadata"]["generation"], upgraded["status"]["observedGeneration"]) == (1, 2)
    assert upgraded["status"]["components"]["predictor"]["latestReadyRevision"] == f"{MODEL}-predictor-00002"
    assert result.smoke_passed and result.url == servers["2"] and invalid(fake) == []
    states = [
        (h["metadata"]["generation"], version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent"))
        for h in history
    ]
    assert states == [(1, "1", None), (2, "2", 10), (3, "2", None)]  # canary, promoted: no rollback
    assert (obj["metadata"]["generation"], obj["status"]["observedGeneration"]) == (3, 4)
    lines = log_lines(capsys)
    stale = [
        i
        for i, line in enumerate(lines)
        if "generation 2: waiting for its revision (the latest, "
        f"{MODEL}-predictor-00002, is another spec's: Ready=True" in line
    ]
    ready = [i for i, line in enumerate(lines) if f"revision {MODEL}-predictor-00003, 10% of traffic" in line]
    assert stale and ready and stale[0] < ready[0]


@pytest.mark.local
def test_raw_deployment_waits_for_the_rollout_not_kserves_ready_through_an_autoscaler(
    registered: Registered, servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """RawDeployment with an HPA that scales the predictor's Deployment to 2 replicas during the
    first rollout: the Deployment's generation (which KServe reports as observedGeneration) runs
    ahead of the InferenceService's, and a wait for the two to match would time out and roll the
    healthy model back. During the second rollout KServe says Ready (the old pods keep the
    Deployment Available) while the Service still reaches version 1: the deploy waits for the
    rollout itself, as `kubectl rollout status` does."""
    kserve = KServe(serving(servers), mode="RawDeployment", autoscale_to=2)
    with fake_kube(kserve) as fake:
        first = deploy(registered, fake, "1", clock=fast_clock)
        capsys.readouterr()
        second = deploy(registered, fake, "2", clock=fast_clock)
        history = fake.history[KEY]
        obj, deployment = stored(fake), raw_deployment(fake)
        pods = [p for p in fake.pods if p["metadata"]["labels"].get("app") == f"isvc.{MODEL}-predictor"]
    assert first.smoke_passed and first.url == servers["1"]
    assert second.smoke_passed and second.url == servers["2"] and invalid(fake) == []
    states = [(h["metadata"]["generation"], version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent"))
              for h in history]  # fmt: skip
    assert states == [(1, "1", None), (2, "2", None)]  # a rolling update each, no rollback
    # The fake reports what KServe does: the Deployment's generation, not the InferenceService's.
    assert deployment["metadata"]["generation"] == deployment["status"]["observedGeneration"] == 3
    assert (obj["metadata"]["generation"], obj["status"]["observedGeneration"]) == (2, 3)
    template = deployment["spec"]["template"]["metadata"]["labels"]
    assert template[isvc.SPEC_KEY] == obj["spec"]["predictor"]["labels"][isvc.SPEC_KEY]
    assert len(pods) == 2 and {p["metadata"]["labels"][isvc.VERSION_KEY] for p in pods} == {"2"}
    lines = log_lines(capsys)
    name = f"Deployment {MODEL}-predictor"
    midway = [
        i
        for i, line in enumerate(lines)
        if f"generation 2: {name}: 1 of 2 replicas updated (Ready=True" in line
    ]
    done = [
        i
        for i, line in enumerate(lines)
        if f"generation 2: {name} rolled out (2 replicas): Ready=True" in line
    ]
    smoke = [i for i, line in enumerate(lines) if "smoke test passed at " + servers["2"] in line]
    assert midway and done and smoke and midway[0] < done[0] < smoke[0]


@pytest.mark.local
def test_raw_deployment_rolls_back_a_crash_looping_version(
    registered: Registered, servers: dict[str, str]
) -> None:
    """The new ReplicaSet's pod crash-loops while the old pods keep KServe's Ready True: the crash
    ends the wait with the container's message, and the restored spec brings the old pods back."""
    kserve = KServe(
        serving(servers), mode="RawDeployment", crash=lambda obj: CRASH if version_of(obj) == "2" else None
    )
    with fake_kube(kserve) as fake:
        deploy(registered, fake, "1", clock=fast_clock)
        first, before = stored(fake), raw_deployment(fake)
        started = time.monotonic()
        with pytest.raises(HandoffError) as caught:
            deploy(registered, fake, "2", clock=fast_clock)
        elapsed = time.monotonic() - started
        after, deployment = stored(fake), raw_deployment(fake)
        pods = [p for p in fake.pods if p["metadata"]["labels"].get("app") == f"isvc.{MODEL}-predictor"]
    message = str(caught.value)
    assert re.search(
        r"container kserve-container is crash-looping \(3 restarts\): .*INVALID_PROTOBUF", message
    )
    assert (
        "rolled back: version 1's spec is restored and its revision takes all traffic back once Ready"
        in message
    )
    assert elapsed < 10 and invalid(fake) == []
    assert after["spec"]["predictor"] == first["spec"]["predictor"]
    assert deployment["spec"]["template"] == before["spec"]["template"]  # version 1's pods again
    assert [p["metadata"]["labels"][isvc.VERSION_KEY] for p in pods] == ["1"]  # the crashing one is gone
    assert np.allclose(answer(after["status"]["url"], registered), answer(servers["1"], registered))


@pytest.mark.local
def test_the_pipeline_role_lets_deploy_read_the_predictor_deployment(
    registered: Registered, servers: dict[str, str]
) -> None:
    """The deploy step runs as `handoff-pipeline` with the Role in manifests/base: in raw deployment
    mode it reads the predictor's Deployment, which the Role grants; without that rule the deploy
    says which permission it lacks."""
    role, binding = yaml.safe_load_all((TEMPLATE / "manifests/base/rbac-pipeline.yaml").read_text())
    for obj in (role, binding):
        obj["metadata"]["namespace"] = NAMESPACE  # what kustomize's `namespace:` does
    without = {**role, "rules": [r for r in role["rules"] if r["apiGroups"] != ["apps"]]}
    with fake_kube(KServe(serving(servers), mode="RawDeployment")) as fake:
        fake.caller = fake_rbac.service_account(NAMESPACE, "handoff-pipeline")
        fake.apply(without, binding)
        with pytest.raises(HandoffError) as caught:
            deploy(registered, fake, "1", clock=fast_clock)
        fake.apply(role)
        result = deploy(registered, fake, "1", clock=fast_clock)
    message = str(caught.value)
    assert (
        f"could not read Deployment {NAMESPACE}/{MODEL}-predictor, the predictor of InferenceService "
        f"{NAMESPACE}/{MODEL}: HTTP 403" in message
    )
    assert "grant it in the namespace's Role" in message and "nothing served before this deploy" in message
    assert result.smoke_passed and result.url == servers["1"]


def project_with(registered: Registered, tmp_path: Path, **kserve: Any) -> Path:
    """A copy of the project (with its registry) whose serving.kserve has ``kserve`` changed."""
    project = Path(shutil.copytree(registered.project, tmp_path / MODEL))
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"]["kserve"].update(**kserve))
    return project


@pytest.mark.local
def test_a_deploy_that_may_not_list_pods_stops_before_changing_anything(
    registered: Registered, servers: dict[str, str], tmp_path: Path
) -> None:
    """Without the pods, a status left from before the patch cannot be told from the new one's:
    with canary_percent 0 it shows the old revision as the latest, ready, with all traffic, and a
    deploy that trusted it would smoke-test the old model. The Role grants `list pods` (and
    `handoff doctor` checks it), so a step without it stops, naming the permission, before it
    changes anything."""
    project = project_with(registered, tmp_path, canary_percent=0)
    role, binding = yaml.safe_load_all((TEMPLATE / "manifests/base/rbac-pipeline.yaml").read_text())
    for obj in (role, binding):
        obj["metadata"]["namespace"] = NAMESPACE
    without = {**role, "rules": [r for r in role["rules"] if r["resources"] != ["pods"]]}
    with fake_kube(KServe(serving(servers), stale_gets=8)) as fake:
        deploy_to_cluster(project, MODEL, "1", api=fake.api_client(), poll_s=POLL_S, clock=fast_clock)
        fake.caller = fake_rbac.service_account(NAMESPACE, "handoff-pipeline")
        fake.apply(without, binding)
        with pytest.raises(HandoffError) as caught:
            deploy_to_cluster(project, MODEL, "2", api=fake.api_client(), poll_s=POLL_S, clock=fast_clock)
        history = fake.history[KEY]
    message = str(caught.value)
    assert message.startswith(f"could not list the pods of InferenceService {NAMESPACE}/{MODEL}: HTTP 403"), (
        message
    )
    assert "grant it in the namespace's Role" in message
    assert message.endswith("the deploy watches them, so it changed nothing")
    assert [version_of(h) for h in history] == ["1"]  # never patched


REFUSED = {  # what admission says of a new version's pods
    "Serverless": 'violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false '
    '(container "queue-proxy" must set securityContext.allowPrivilegeEscalation=false)',
    "RawDeployment": "exceeded quota: compute, requested: limits.memory=2Gi, used: limits.memory=2Gi, "
    "limited: limits.memory=3Gi",
}


@pytest.mark.local
@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment"])
def test_pods_that_admission_refuses_end_the_wait_with_its_reason(
    registered: Registered, servers: dict[str, str], mode: str
) -> None:
    """Pod Security or a ResourceQuota refuses the new version's pods, so there is no pod to watch.
    Serverless: Knative fails the revision (RevisionFailed, with the API server's refusal), and
    the revision KServe made after the patch is this spec's even without pods. RawDeployment: the
    new ReplicaSet cannot create its surge pod (ReplicaFailure, FailedCreate) while the old pods
    keep the Deployment Available. Either ends the wait at once, not ready_timeout_s later."""
    refused = REFUSED[mode]
    kserve = KServe(
        serving(servers), mode=mode, refuse=lambda obj: refused if version_of(obj) == "2" else None
    )
    with fake_kube(kserve) as fake:
        deploy(registered, fake, "1", clock=fast_clock)
        first = stored(fake)
        started = time.monotonic()
        with pytest.raises(HandoffError) as caught:
            deploy(registered, fake, "2", clock=fast_clock)
        elapsed = time.monotonic() - started
        after = stored(fake)
    message = str(caught.value)
    if mode == "Serverless":
        revision = f"{MODEL}-predictor-00002"
        said = (
            f'revision {revision} failed: Revision "{revision}" failed with message: '
            f'pods "{revision}-deployment-7d9f8-" is forbidden: {refused}.'
        )
        assert said in message, message
    else:
        deployment = f"{MODEL}-predictor"
        said = rf'Deployment {deployment} cannot make its pods \(FailedCreate\): pods "{deployment}-\w+-" '
        assert re.search(said + re.escape(f"is forbidden: {refused}"), message), message
    assert "rolled back: version 1's spec is restored" in message
    assert elapsed < 5  # not serving.kserve.ready_timeout_s (600 s, 10 s on this clock)
    assert after["spec"]["predictor"]["labels"] == first["spec"]["predictor"]["labels"]
    assert invalid(fake) == []


@pytest.mark.local
def test_revisions_scaled_to_zero_are_still_this_specs(
    registered: Registered, servers: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """minReplicas 0: with no requests Knative scales every revision to zero, the canary's too, and
    no pod names the revision any more. A retried deploy resuming its canary, and a redeploy that
    finds the spec already there, still recognise the latest revision as theirs (it was there when
    their patch changed nothing), instead of timing out and rolling back a healthy model."""
    project = project_with(registered, tmp_path, min_replicas=0)
    settings = Project.load(project).settings
    kserve = KServe(serving(servers))
    with fake_kube(kserve) as fake:
        deploy_to_cluster(project, MODEL, "1", api=fake.api_client(), poll_s=POLL_S, clock=fast_clock)
        release, _, _ = registered_release(Project.load(project), MODEL, "2")
        services = isvc.ServiceClient(NAMESPACE, MODEL, fake.api_client(), retry_s=POLL_S)

        def killed(url: str) -> Any:
            raise KeyboardInterrupt  # the first attempt dies between the canary and its smoke test

        with pytest.raises(KeyboardInterrupt):
            isvc.rollout(services, settings, release, killed, isvc.Watch(services, poll_s=POLL_S))
        kserve.idle(fake)
        assert not [p for p in fake.pods if p["metadata"]["labels"].get(isvc.ISVC_LABEL) == MODEL]
        resumed = deploy_to_cluster(
            project, MODEL, "2", api=fake.api_client(), poll_s=POLL_S, clock=fast_clock
        )
        kserve.idle(fake)
        capsys.readouterr()
        again = deploy_to_cluster(project, MODEL, "2", api=fake.api_client(), poll_s=POLL_S, clock=fast_clock)
        history = fake.history[KEY]
    assert resumed.smoke_passed and resumed.url == servers["2"]
    assert again.smoke_passed and again.url == servers["2"]
    states = [
        (h["metadata"]["generation"], version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent"))
        for h in history
    ]
    assert states == [(1, "1", None), (2, "2", 10), (3, "2", None)]  # resumed and promoted, no rollback
    lines = log_lines(capsys)
    assert any("already has this spec: version 2" in line for line in lines)
    assert any(f"revision {MODEL}-predictor-00002, 100% of traffic: Ready=True" in line for line in lines)


@pytest.mark.unit
def test_a_revision_or_rollout_that_cannot_finish_ends_the_wait_with_the_controllers_words(
    default_project: Path,
) -> None:
    """Knative gave up on the new revision, or the Deployment's progress deadline passed or it
    cannot make its pods: the wait ends at once, with what the controller said, not
    serving.kserve.ready_timeout_s later. A failed revision of an earlier spec is not this spec's
    failure; a revision without pods (admission refused them) is this spec's when KServe made it
    after the patch."""
    from kubernetes.client import (
        V1Deployment,
        V1DeploymentCondition,
        V1DeploymentSpec,
        V1DeploymentStatus,
        V1LabelSelector,
        V1ObjectMeta,
        V1PodTemplateSpec,
    )

    settings = Project.load(default_project).settings
    body = isvc.manifest(settings, isvc.Release(MODEL, "2", "cd" * 32, "s3://models/triton"))
    obj = {**body, "metadata": {**body["metadata"], "generation": 2}}
    failed = 'Revision "x-predictor-00002" failed with message: Container failed with: OOMKilled.'
    serverless = {
        **obj,
        "status": {
            "deploymentMode": "Serverless",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "RevisionFailed", "message": failed}
            ],
            "components": {
                "predictor": {
                    "latestCreatedRevision": "x-predictor-00002",
                    "latestReadyRevision": "x-predictor-00001",
                }
            },
        },
    }
    assert schema_problems(INFERENCESERVICE, serverless) == []
    before = isvc.Before("x-predictor-00001")  # the latest created revision when the patch was made
    progress = isvc.serverless_progress(serverless, 2, {"x-predictor-00002": True}, before, canary=None)
    assert progress.failure == f"revision x-predictor-00002 failed: {failed}"
    # No pods at all: the revision KServe made since the patch is this spec's.
    assert isvc.serverless_progress(serverless, 2, {}, before, canary=None).failure == progress.failure
    for revisions, since in (
        ({"x-predictor-00003": True}, before),  # this spec's pods are another revision's
        ({"x-predictor-00002": False}, before),  # the failed revision's pods are another spec's
        ({}, isvc.Before("x-predictor-00002")),  # the failed revision was there before the patch
    ):
        assert isvc.serverless_progress(serverless, 2, revisions, since, canary=None).failure is None

    raw = {**obj, "status": {"deploymentMode": "RawDeployment"}}
    stuck = 'ReplicaSet "x-predictor-6b9f8" has timed out progressing.'
    deployment = V1Deployment(
        metadata=V1ObjectMeta(name="x-predictor", generation=3),
        spec=V1DeploymentSpec(
            replicas=1,
            selector=V1LabelSelector(match_labels={"app": "isvc.x-predictor"}),
            template=V1PodTemplateSpec(metadata=V1ObjectMeta(labels=obj["spec"]["predictor"]["labels"])),
        ),
        status=V1DeploymentStatus(
            observed_generation=3,
            replicas=2,
            updated_replicas=1,
            available_replicas=1,
            conditions=[
                V1DeploymentCondition(
                    type="Progressing", status="False", reason="ProgressDeadlineExceeded", message=stuck
                )
            ],
        ),
    )
    progress = isvc.raw_progress(raw, 2, deployment, "x-predictor")
    assert progress.failure == f"Deployment x-predictor exceeded its progress deadline: {stuck}"
    # The new ReplicaSet cannot make its pods: kubectl would wait for the deadline; the deploy stops.
    refused = 'pods "x-predictor-6b9f8-" is forbidden: exceeded quota: compute, requested: limits.memory=2Gi'
    assert deployment.status is not None
    deployment.status.conditions = [
        V1DeploymentCondition(type="Progressing", status="True", reason="ReplicaSetUpdated"),
        V1DeploymentCondition(type="ReplicaFailure", status="True", reason="FailedCreate", message=refused),
    ]
    progress = isvc.raw_progress(raw, 2, deployment, "x-predictor")
    assert progress.failure == f"Deployment x-predictor cannot make its pods (FailedCreate): {refused}"


@pytest.mark.local
def test_a_failed_first_deploy_stays_for_inspection_and_the_next_deploy_starts_over(
    registered: Registered, servers: dict[str, str]
) -> None:
    """No delete (the Role has none): the failed service is marked, and replaced as a first deploy."""
    kserve = KServe(serving(servers), crash=lambda obj: CRASH if version_of(obj) == "1" else None)
    with fake_kube(kserve) as fake:
        with pytest.raises(HandoffError, match=r"crash-looping.*nothing served before this deploy"):
            deploy(registered, fake, "1")
        failed = fake.get("inferenceservices", NAMESPACE, MODEL)
        assert failed["metadata"]["annotations"][isvc.NEVER_SERVED_KEY] == "true"
        deploy(registered, fake, "2")
        served = fake.get("inferenceservices", NAMESPACE, MODEL)
    assert version_of(served) == "2"
    assert isvc.NEVER_SERVED_KEY not in served["metadata"]["annotations"]
    assert "canaryTrafficPercent" not in served["spec"]["predictor"]  # all traffic: nothing to share with
    assert not any(method == "DELETE" for method, _ in fake.requests)


@pytest.mark.local
def test_the_api_server_rejects_a_misspelt_field_with_its_path(registered: Registered) -> None:
    project = Project.load(registered.project)
    release, _, _ = registered_release(project, MODEL, "1")
    body = isvc.manifest(project.settings, release)
    assert schema_problems(INFERENCESERVICE, body) == []
    body["spec"]["predictor"]["model"]["storageURI"] = body["spec"]["predictor"]["model"].pop("storageUri")
    with fake_kube() as fake:
        services = isvc.ServiceClient(NAMESPACE, MODEL, fake.api_client(), retry_s=POLL_S)
        with pytest.raises(HandoffError) as caught:
            services.create(body)
        assert fake.objects == {}
        config = isvc.manifest(project.settings, release)
        services.create(config)
        config["spec"]["predictor"]["minReplica"] = 2
        with pytest.raises(HandoffError) as patched:  # an apply is checked as the object it makes
            services.apply(config)
    assert "could not create InferenceService ml-models/digits-classifier: HTTP 422" in str(caught.value)
    assert "spec.predictor.model: Additional properties are not allowed ('storageURI' was unexpected)" in str(
        caught.value
    )
    assert "could not apply" in str(patched.value)
    assert "spec.predictor: Additional properties are not allowed ('minReplica' was unexpected)" in str(
        patched.value
    )


@pytest.mark.local
def test_an_unavailable_api_server_is_retried_but_not_forever(
    registered: Registered, servers: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_kube(KServe(serving(servers))) as fake:
        fake.unavailable_requests = 6  # the first reads and writes meet a restarting API server
        result = deploy(registered, fake, "1")
        assert result.smoke_passed and fake.unavailable_answered == 6
        assert stored(fake)["metadata"]["generation"] == 1  # retried, not applied twice
        retries = [line for line in log_lines(capsys) if "retrying" in line]
        assert len(retries) == 6 and "HTTP 503: the server is unable to handle it" in retries[0]
        fake.unavailable_requests = isvc.MAX_API_FAILURES
        # The first read (is an A/B test's graph routing to the service?) is the one that gives up.
        with pytest.raises(
            HandoffError, match=r"gave up on InferenceGraph ml-models/digits-classifier-ab after 30"
        ):
            deploy(registered, fake, "2")
        assert version_of(stored(fake)) == "1"  # it gave up before changing anything


@pytest.mark.unit
def test_the_kserve_runtime_reads_one_model_folder_and_settings_reach_the_predictor(
    default_project: Path,
) -> None:
    settings = Project.load(default_project).settings
    kserve = settings.serving.kserve.model_copy(
        update={"runtime": "kserve", "gpus": 1, "service_account": "model-reader", "min_replicas": 0}
    )
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"kserve": kserve})})
    release = isvc.Release(
        MODEL, "7", "ab" * 32, "s3://models/mlflow/1/run/artifacts/triton/0123456789abcdef/"
    )
    body = isvc.manifest(settings, release, canary=25)
    assert schema_problems(INFERENCESERVICE, body) == []
    predictor = body["spec"]["predictor"]
    assert predictor["model"]["runtime"] == "handoff-onnx" and "runtimeVersion" not in predictor["model"]
    assert (
        predictor["model"]["storageUri"]
        == f"s3://models/mlflow/1/run/artifacts/triton/0123456789abcdef/{MODEL}"
    )
    assert predictor["model"]["resources"]["limits"] == {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": 1}
    assert predictor["serviceAccountName"] == "model-reader" and predictor["minReplicas"] == 0
    assert predictor["canaryTrafficPercent"] == 25 and predictor["labels"] == {
        "handoff.dev/model-version": "7",
        "handoff.dev/predictor-spec": isvc.spec_digest(predictor),
    }
    # The canary share is traffic, not pods: the same spec without it has the same digest.
    assert isvc.manifest(settings, release)["spec"]["predictor"]["labels"] == predictor["labels"]
    changed = _with_runtime(settings, "kserve", max_concurrency=3)
    assert isvc.manifest(changed, release)["spec"]["predictor"]["labels"] != predictor["labels"]


def _with_runtime(settings: Any, runtime: str, **serving: Any) -> Any:
    kserve = settings.serving.kserve.model_copy(update={"runtime": runtime})
    changed = settings.serving.model_copy(update={"kserve": kserve, **serving})
    return settings.model_copy(update={"serving": changed})


@pytest.mark.unit
def test_the_kserve_runtime_gets_the_serving_settings_and_triton_does_not(default_project: Path) -> None:
    """serving.batching, max_request_mib and the rest reach handoff-onnx (not local-only), as the
    JSON its prologue merges into the server's spec; no Go template delimiters in it."""
    from handoff.serving.spec import SETTINGS_ENV

    base = Project.load(default_project).settings
    batching = base.serving.batching.model_copy(update={"max_batch_size": 8, "max_wait_ms": 2.0})
    settings = _with_runtime(base, "kserve", max_request_mib=1, max_concurrency=7, batching=batching)
    release = isvc.Release(MODEL, "7", "ab" * 32, "s3://models/triton")
    body = isvc.manifest(settings, release)
    assert schema_problems(INFERENCESERVICE, body) == []
    assert "{{" not in json.dumps(body)
    model = body["spec"]["predictor"]["model"]
    ((name, value),) = [(e["name"], e["value"]) for e in model["env"]]
    assert name == SETTINGS_ENV
    assert json.loads(value) == {
        "model_version": "7",
        "max_request_bytes": 1024 * 1024,
        "max_inflight_bytes": 64 * 1024 * 1024,
        "max_concurrency": 7,
        "header_timeout_s": 10.0,
        "shutdown_grace_s": 20.0,
        "batching": {"max_batch_size": 8, "max_wait_ms": 2.0},
    }
    triton = isvc.manifest(_with_runtime(base, "triton"), release)["spec"]["predictor"]["model"]
    assert "env" not in triton


@pytest.mark.unit
@pytest.mark.parametrize("runtime", ["kserve", "triton"])
def test_a_payload_store_sends_the_predictors_traffic_to_the_namespaces_collector(
    default_project: Path, runtime: str
) -> None:
    """monitoring.store set: KServe's logger (request and response) posts to the collector's
    Service in the service's namespace and forwards the version annotation; the model server
    keeps no payload log of its own there. No store: no logger."""
    base = _with_runtime(Project.load(default_project).settings, runtime)
    release = isvc.Release(MODEL, "7", "ab" * 32, "s3://models/triton")
    assert "logger" not in isvc.manifest(base, release)["spec"]["predictor"]

    monitoring = base.monitoring.model_copy(update={"store": f"s3://payloads/{MODEL}"})
    settings = base.model_copy(update={"monitoring": monitoring, "namespace": "ml-models-dev"})
    body = isvc.manifest(settings, release, canary=10)
    assert schema_problems(INFERENCESERVICE, body) == []
    predictor = body["spec"]["predictor"]
    assert predictor["logger"] == {
        "mode": "all",
        "url": "http://handoff-payload-collector.ml-models-dev.svc.cluster.local/",
        "metadataAnnotations": ["handoff.dev/model-version"],
    }
    # The annotation it forwards is one handoff sets on the service (KServe copies it to the pods).
    assert body["metadata"]["annotations"]["handoff.dev/model-version"] == "7"
    # The collector's Service in manifests/ is the one the URL names.
    collector = yaml.safe_load_all((TEMPLATE / "manifests/monitoring/collector.yaml").read_text())
    services = [o["metadata"]["name"] for o in collector if o and o["kind"] == "Service"]
    assert services == [isvc_manifest.PAYLOAD_COLLECTOR]
    # A logger changes the pods (KServe adds its agent): a new spec digest.
    assert predictor["labels"] != isvc.manifest(base, release)["spec"]["predictor"]["labels"]
    for entry in predictor["model"].get("env", []):
        assert "payload_log" not in json.loads(entry["value"])


@pytest.mark.unit
def test_pods_wait_for_their_endpoints_to_go_in_raw_mode_only(default_project: Path) -> None:
    """Raw deployment mode: preStop sleep, then SIGTERM, within a grace period covering both and
    serving.shutdown_grace_s. Serverless: neither (Knative refuses both; its queue-proxy drains)."""
    settings = _with_runtime(Project.load(default_project).settings, "kserve", shutdown_grace_s=30)
    v1 = isvc.Release(MODEL, "1", "ab" * 32, "s3://models/triton")
    serverless = isvc.manifest(settings, v1)["spec"]["predictor"]
    assert "terminationGracePeriodSeconds" not in serverless and "lifecycle" not in serverless["model"]
    raw = isvc.manifest(settings, v1, raw=True)
    assert schema_problems(INFERENCESERVICE, raw) == []
    predictor = raw["spec"]["predictor"]
    assert predictor["model"]["lifecycle"] == {"preStop": {"sleep": {"seconds": isvc.PRE_STOP_S}}}
    assert predictor["terminationGracePeriodSeconds"] == isvc.PRE_STOP_S + 30 + isvc.EXIT_MARGIN_S

    # A deploy learns the mode from the service it updates (decided from the object read: no API).
    v2 = isvc.Release(MODEL, "2", "cd" * 32, "s3://models/triton")
    for mode, drains in (("RawDeployment", True), ("Standard", True), ("Serverless", False)):
        live = {**isvc.manifest(settings, v1), "status": {"deploymentMode": mode}}
        live["metadata"] = {**live["metadata"], "generation": 1}
        predictor = isvc_plan.start(live, settings, v2, "the service").config["spec"]["predictor"]
        assert ("terminationGracePeriodSeconds" in predictor) is drains, mode
        assert ("lifecycle" in predictor["model"]) is drains, mode


@pytest.mark.unit
def test_storage_uris_are_ones_kserve_can_download() -> None:
    assert isvc.storage_uri("s3://bucket/a/triton/x/") == "s3://bucket/a/triton/x"
    assert isvc.storage_uri("gs://bucket/a") == "gs://bucket/a"
    assert (
        isvc.storage_uri("wasbs://models@acct.blob.core.windows.net/mlflow/1/r/artifacts/triton/x")
        == "https://acct.blob.core.windows.net/models/mlflow/1/r/artifacts/triton/x"
    )
    with pytest.raises(HandoffError) as caught:
        isvc.storage_uri("mlflow-artifacts:/1/r/artifacts/triton/x")
    message = str(caught.value)
    assert message.startswith("handoff.yaml: mlflow.tracking_uri: the registered model's Triton repository")
    assert "--artifacts-destination s3://" in message


@pytest.mark.unit
def test_deploy_goes_to_the_cluster_from_a_pod_but_never_in_a_local_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("HANDOFF_LOCAL_RUN", raising=False)
    assert not in_cluster()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert in_cluster()
    monkeypatch.setenv("HANDOFF_LOCAL_RUN", "1")
    assert not in_cluster()


@pytest.mark.local
def test_deploy_cluster_without_credentials_is_one_line_naming_the_fix(
    registered: Registered, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    result = subprocess.run(
        [HANDOFF, "deploy", "--cluster", "--version", "1"],
        cwd=registered.project,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no Kubernetes credentials" in errors[0] and "KUBECONFIG" in errors[0]


@pytest.mark.local
def test_a_retried_deploy_finishes_the_rollout_its_killed_attempt_started(
    registered: Registered, servers: dict[str, str]
) -> None:
    """A deploy step killed mid-canary (node drained, pod evicted) is retried by the pipeline: the
    retry resumes that canary instead of patching again, and still knows what to roll back to."""
    project = Project.load(registered.project)
    with fake_kube(KServe(serving(servers))) as fake:
        deploy(registered, fake, "1")
        release, _, _ = registered_release(project, MODEL, "2")
        services = isvc.ServiceClient(NAMESPACE, MODEL, fake.api_client(), retry_s=POLL_S)

        def killed(url: str) -> Any:
            raise KeyboardInterrupt  # the first attempt dies between the canary and its smoke test

        with pytest.raises(KeyboardInterrupt):
            isvc.rollout(services, project.settings, release, killed, isvc.Watch(services, poll_s=POLL_S))
        assert stored(fake)["spec"]["predictor"]["canaryTrafficPercent"] == 10
        result = deploy(registered, fake, "2")
        history = fake.history[KEY]
    assert result.smoke_passed and result.url == servers["2"]
    states = [
        (h["metadata"]["generation"], version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent"))
        for h in history
    ]
    assert states == [(1, "1", None), (2, "2", 10), (3, "2", None)]  # one canary, resumed, then promoted
    recorded = isvc.Served.decode(history[-1]["metadata"]["annotations"][isvc.ROLLBACK_KEY])
    assert recorded is not None and recorded.predictor == history[0]["spec"]["predictor"]


MERGE = "application/merge-patch+json"
PATH = f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices/{MODEL}"


def send(api: Any, body: Any, content_type: str, **query: str) -> Any:
    """A PATCH of the service as any client sends it (``fieldManager``, ``force``: query parameters)."""
    return api.call_api(
        PATH,
        "PATCH",
        query_params=list(query.items()),
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        response_type="object",
        _return_http_data_only=True,
    )


@pytest.mark.unit
def test_the_fake_patches_like_the_api_server(default_project: Path) -> None:
    """The fake's PATCH is what the deploy relies on; check it against the API server's rules."""
    project = Project.load(default_project)
    release = isvc.Release(MODEL, "1", "ab" * 32, "s3://models/triton/0123456789abcdef")
    config = isvc.manifest(project.settings, release)
    with fake_kube() as fake:
        api = fake.api_client()
        services = isvc.ServiceClient(NAMESPACE, MODEL, api, retry_s=POLL_S)
        created = services.create(config)
        assert created is not None and created["metadata"]["generation"] == 1
        version, uid = created["metadata"]["resourceVersion"], created["metadata"]["uid"]
        # Metadata changes leave the generation alone; status in a patch is ignored (a subresource).
        noted = send(
            api, {"metadata": {"annotations": {"note": "x"}}, "status": {"url": "http://evil"}}, MERGE
        )
        assert noted["metadata"]["generation"] == 1 and "status" not in noted
        assert noted["metadata"]["resourceVersion"] != version
        # A spec change moves the generation; null deletes a key (RFC 7386).
        changed = send(api, {"spec": {"predictor": {"minReplicas": 2, "labels": None}}}, MERGE)
        assert changed["metadata"]["generation"] == 2 and "labels" not in changed["spec"]["predictor"]
        # A write made from a stale read is refused, not applied over the newer state.
        with pytest.raises(Exception, match="409"):
            send(
                api,
                {"metadata": {"resourceVersion": version}, "spec": {"predictor": {"minReplicas": 3}}},
                MERGE,
            )
        with pytest.raises(isvc.Conflict, match="the object has been modified"):
            services.apply(
                {**config, "metadata": {**config["metadata"], "uid": uid, "resourceVersion": version}}
            )
        assert fake.get(*KEY)["spec"]["predictor"]["minReplicas"] == 2
        patched = send(
            api, [{"op": "replace", "path": "/spec/predictor/maxReplicas", "value": 5}], JSON_PATCH
        )
        assert patched["spec"]["predictor"]["maxReplicas"] == 5 and patched["metadata"]["generation"] == 3
        with pytest.raises(Exception, match="415"):  # a dict body makes the client send a strategic
            send(api, {"spec": {"predictor": {"maxReplicas": 6}}}, JSON_PATCH)  # merge patch: refused for CRs
        with pytest.raises(Exception, match="415"):
            send(api, yaml.safe_dump(config), "application/yaml", fieldManager="handoff")
        # PatchOptions, checked before anything else: an apply names its manager, only an apply forces.
        with pytest.raises(Exception, match=r"(?s)422.*fieldManager: Required value: is required for apply"):
            send(api, config, APPLY)
        with pytest.raises(Exception, match=r"(?s)422.*force: Forbidden: may not be specified for non-apply"):
            send(api, {"metadata": {"annotations": {"note": "y"}}}, MERGE, force="true")
        # An apply made from a read of a service deleted since does not create it again.
        api.call_api(PATH, "DELETE", response_type="object")
        with pytest.raises(isvc.Conflict, match="UID in precondition"):
            services.apply({**config, "metadata": {**config["metadata"], "uid": uid}})
        assert fake.objects == {}


@pytest.mark.unit
def test_the_fakes_server_side_apply_removes_what_its_manager_left_out(default_project: Path) -> None:
    """What makes server-side apply right for canary → full rollouts and rollbacks: a field the same
    manager applied before and leaves out now is removed (a key, an item of a list-map such as
    ``env``, a whole struct); one another manager set stays; changing another manager's field is a
    conflict unless forced; an apply that changes nothing writes nothing."""
    settings = _with_runtime(Project.load(default_project).settings, "kserve")
    release = isvc.Release(MODEL, "1", "ab" * 32, "s3://models/triton")
    first = isvc.manifest(settings, release, canary=10, rollback_to="{}", raw=True)
    first["spec"]["predictor"]["model"]["env"].append({"name": "EXTRA", "value": "1"})
    second = isvc.manifest(settings, release)
    with fake_kube() as fake:
        api = fake.api_client()
        services = isvc.ServiceClient(NAMESPACE, MODEL, api, retry_s=POLL_S)
        assert services.create(first) is not None
        send(
            api, {"metadata": {"annotations": {"example.com/team": "ml"}}}, MERGE, fieldManager="kubectl-edit"
        )
        after = services.apply(second)
        predictor = after["spec"]["predictor"]
        assert "canaryTrafficPercent" not in predictor and "terminationGracePeriodSeconds" not in predictor
        assert "lifecycle" not in predictor["model"]
        assert [e["name"] for e in predictor["model"]["env"]] == [SETTINGS_ENV]
        assert predictor == second["spec"]["predictor"] and after["metadata"]["generation"] == 2
        assert after["metadata"]["annotations"] == {
            **second["metadata"]["annotations"],
            "example.com/team": "ml",  # another manager's
        }
        owners = {(m["manager"], m["operation"]) for m in after["metadata"]["managedFields"]}
        assert owners == {("handoff", "Apply"), ("kubectl-edit", "Update")}
        # Someone edits a field handoff owns: an apply that does not force meets a conflict, a
        # forced one (every apply but a create) takes the field back.
        send(api, {"spec": {"predictor": {"minReplicas": 3}}}, MERGE, fieldManager="kubectl-edit")
        with pytest.raises(
            isvc.Conflict, match=r'conflict with "kubectl-edit": \.spec\.predictor\.minReplicas'
        ):
            services.apply(second, force=False)
        taken = services.apply(second)
        assert taken["spec"]["predictor"] == second["spec"]["predictor"]
        writes = len(fake.history[KEY])
        again = services.apply(second)
        assert again["metadata"]["resourceVersion"] == taken["metadata"]["resourceVersion"]
        assert len(fake.history[KEY]) == writes
        # Shared ownership: an Update manager set the canary share, handoff applies the same value
        # (no conflict, both own it); handoff leaving it out drops its claim only, and the field
        # stays, the other manager's. (ServiceClient.apply then removes it: see the deploy tests.)
        freeze = {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
        send(api, freeze, MERGE, fieldManager="kubectl-patch")
        dark = isvc.manifest(settings, release, canary=0)
        shared = send(api, dark, APPLY, fieldManager="handoff", force="true")
        assert owners_of(shared, "spec", "predictor", "canaryTrafficPercent") == {"handoff", "kubectl-patch"}
        left = send(api, second, APPLY, fieldManager="handoff", force="true")
        assert left["spec"]["predictor"]["canaryTrafficPercent"] == 0
        assert left["metadata"]["generation"] == shared["metadata"]["generation"]
        assert owners_of(left, "spec", "predictor", "canaryTrafficPercent") == {"kubectl-patch"}
        # ServiceClient.apply removes it by a JSON patch that tests the value first: a value set
        # since the apply (here 5) is not removed, the patch fails whole.
        share = isvc_manifest.DROPPABLE[0]
        stale = isvc_manifest.removing({"spec": {"predictor": {"canaryTrafficPercent": 5}}}, [share])
        with pytest.raises(Exception, match="422"):
            send(api, stale, JSON_PATCH, fieldManager="handoff")
        cleared = services.apply(second)
        assert "canaryTrafficPercent" not in cleared["spec"]["predictor"]
        assert cleared["metadata"]["generation"] == left["metadata"]["generation"] + 1


@pytest.mark.unit
def test_creating_by_apply_needs_the_create_permission(default_project: Path) -> None:
    """An apply that creates is authorized as a create too, as the API server does: the step's
    Role keeps `create` on InferenceServices for the first deploy."""
    settings = Project.load(default_project).settings
    config = isvc.manifest(settings, isvc.Release(MODEL, "1", "ab" * 32, "s3://models/triton"))
    role, binding = yaml.safe_load_all((TEMPLATE / "manifests/base/rbac-pipeline.yaml").read_text())
    for obj in (role, binding):
        obj["metadata"]["namespace"] = NAMESPACE
    rules = [{**r, "verbs": [v for v in r["verbs"] if v != "create"]} for r in role["rules"]]
    with fake_kube() as fake:
        fake.caller = fake_rbac.service_account(NAMESPACE, "handoff-pipeline")
        fake.apply({**role, "rules": rules}, binding)
        services = isvc.ServiceClient(NAMESPACE, MODEL, fake.api_client(), retry_s=POLL_S)
        with pytest.raises(HandoffError, match=r"could not create .*HTTP 403: .* cannot create resource"):
            services.create(config)
        fake.apply(role)
        assert services.create(config) is not None


@pytest.mark.local
def test_every_write_is_a_server_side_apply_by_handoff(
    registered: Registered, servers: dict[str, str]
) -> None:
    """The deploy creates, rolls out and promotes by server-side apply under the field manager
    `handoff` (the create without force, so someone else's service is not taken over); what other
    managers put on the service stays, and what handoff applied and then dropped (the canary share)
    goes. (A JSON patch follows an apply only where another manager kept what handoff dropped.)"""
    with fake_kube(KServe(serving(servers))) as fake:
        deploy(registered, fake, "1")
        edit = {"metadata": {"labels": {"example.com/team": "ml"}, "annotations": {"example.com/owner": "x"}}}
        send(fake.api_client(), edit, MERGE, fieldManager="kubectl-edit")
        deploy(registered, fake, "2")
        obj, history = stored(fake), fake.history[KEY]
    applies = [(p, t, q) for p, t, q in fake.patches if q.get("fieldManager") != "kubectl-edit"]
    forced = (PATH, APPLY, {"fieldManager": "handoff", "force": "true"})
    assert applies == [(PATH, APPLY, {"fieldManager": "handoff"}), forced, forced]  # create, canary, promote
    assert not [method for method, _ in fake.requests if method in ("POST", "PUT")]
    assert obj["metadata"]["labels"]["example.com/team"] == "ml"
    assert obj["metadata"]["annotations"]["example.com/owner"] == "x"
    assert history[-2]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    owners = {(m["manager"], m["operation"]) for m in obj["metadata"]["managedFields"]}
    assert owners == {("handoff", "Apply"), ("kubectl-edit", "Update")}


def owners_of(obj: dict[str, Any], *path: str) -> set[str]:
    """The managers whose managedFields include the field at ``path``."""
    found = set()
    for entry in obj["metadata"]["managedFields"]:
        node = entry["fieldsV1"]
        for key in path:
            node = node.get(f"f:{key}")
            if node is None:
                break
        else:
            found.add(entry["manager"])
    return found


@pytest.mark.local
def test_a_promotion_gives_all_traffic_even_when_another_manager_set_the_canary_share(
    registered: Registered, servers: dict[str, str]
) -> None:
    """Someone froze the traffic with `kubectl patch` (canaryTrafficPercent 0, an Update manager's
    field). The next deploy starts dark, applying the same 0: shared ownership, so the promotion's
    apply alone only drops handoff's claim and the field stays. The deploy removes it (a merge
    patch) and waits for the traffic it asked for, not the share the live spec still shows."""
    with fake_kube(KServe(serving(servers))) as fake:
        deploy(registered, fake, "1")
        freeze = {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
        send(fake.api_client(), freeze, MERGE, fieldManager="kubectl-patch")
        assert owners_of(stored(fake), "spec", "predictor", "canaryTrafficPercent") == {"kubectl-patch"}
        result = deploy(registered, fake, "2")
        obj, history = stored(fake), fake.history[KEY]
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    traffic = obj["status"]["components"]["predictor"]["traffic"]
    assert [(t["revisionName"], t["percent"]) for t in traffic] == [(f"{MODEL}-predictor-00002", 100)]
    assert result.url == servers["2"]
    states = [(version_of(h), h["spec"]["predictor"].get("canaryTrafficPercent")) for h in history]
    assert states[-2:] == [("2", 0), ("2", None)]
    assert fake.patches[-1] == (PATH, JSON_PATCH, {"fieldManager": "handoff"})  # what removed it


@pytest.mark.local
def test_marks_another_manager_also_set_are_cleared_by_the_next_deploy(
    registered: Registered, servers: dict[str, str]
) -> None:
    """``never-served`` and ``rollback-to`` written by another manager (an older handoff's merge
    patch, `kubectl annotate`): handoff's apply leaves them out, which alone does not remove them.
    A never-served mark left behind would make every later deploy a first deploy (no canary, a
    failure left for inspection instead of rolled back), so the deploy removes them."""
    with fake_kube(KServe(serving(servers))) as fake:
        deploy(registered, fake, "1")
        marks = {isvc.NEVER_SERVED_KEY: "true", isvc.ROLLBACK_KEY: "{}"}
        send(fake.api_client(), {"metadata": {"annotations": marks}}, MERGE, fieldManager="kubectl-annotate")
        deploy(registered, fake, "2")
        obj = stored(fake)
    assert version_of(obj) == "2"
    assert not set(marks) & set(obj["metadata"]["annotations"])
    assert "kubectl-annotate" not in {m["manager"] for m in obj["metadata"]["managedFields"]}


@pytest.mark.local
def test_a_rollback_restores_handoffs_fields_and_leaves_other_managers_alone(
    registered: Registered, servers: dict[str, str]
) -> None:
    """A platform team's tolerations on the predictor are theirs: the rollback record holds what
    handoff applied, so restoring version 1 does not take them over (with a value from before the
    rollout), and the next deploy, which leaves them out, keeps them."""
    first_tolerations = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    later_tolerations = [*first_tolerations, {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]

    def url_for(obj: dict[str, Any]) -> str:
        if version_of(obj) == "2" and "canaryTrafficPercent" in obj["spec"]["predictor"]:
            # The platform team changes its tolerations while version 2 is a canary.
            tolerations = {"spec": {"predictor": {"tolerations": later_tolerations}}}
            send(fake.api_client(), tolerations, MERGE, fieldManager="platform")
            return servers["1"]  # version 2's revision is up with the wrong weights: rolled back
        return servers[version_of(obj)]

    kserve = KServe(url_for)
    with fake_kube(kserve) as fake:
        deploy(registered, fake, "1")
        send(
            fake.api_client(),
            {"spec": {"predictor": {"tolerations": first_tolerations}}},
            MERGE,
            fieldManager="platform",
        )
        with pytest.raises(HandoffError, match="rolled back: version 1's spec is restored"):
            deploy(registered, fake, "2")
        rolled_back = stored(fake)
        canary_record = next(
            h["metadata"]["annotations"][isvc.ROLLBACK_KEY]
            for h in fake.history[KEY]
            if isvc.ROLLBACK_KEY in h["metadata"]["annotations"]
        )
        kserve.url_for = serving(servers)
        deploy(registered, fake, "2")
        obj = stored(fake)
    assert "tolerations" not in canary_record  # what version 2's canary recorded: handoff's fields
    assert rolled_back["spec"]["predictor"]["tolerations"] == later_tolerations
    assert owners_of(rolled_back, "spec", "predictor", "tolerations") == {"platform"}
    assert obj["spec"]["predictor"]["tolerations"] == later_tolerations
    assert owners_of(obj, "spec", "predictor", "tolerations") == {"platform"}


@pytest.mark.unit
def test_a_rollback_record_holds_the_fields_handoff_applied(default_project: Path) -> None:
    """``Served.of`` reads handoff's fields from ``managedFields`` as the API server writes them
    (``.`` markers, list-map items by key): KServe's defaults and other managers' fields are left
    out, the fields the next apply takes over are kept, and a service handoff never applied to
    (an older handoff's merge patches) is recorded whole, as before."""
    settings = _with_runtime(Project.load(default_project).settings, "kserve")
    body = isvc.manifest(settings, isvc.Release(MODEL, "1", "ab" * 32, "s3://models/triton"))
    predictor = body["spec"]["predictor"]
    live = copy.deepcopy(body)
    live_predictor = live["spec"]["predictor"]
    live_predictor["tolerations"] = [{"key": "gpu", "operator": "Exists"}]  # the platform team's
    live_predictor["model"]["env"].append({"name": "PLATFORM", "value": "1"})  # theirs too
    live_predictor["model"]["name"] = "kserve-container"  # KServe's default
    live_predictor["minReplicas"] = 3  # someone's `kubectl edit`: theirs now

    def tree(value: Any) -> dict[str, Any]:  # FieldsV1 as the API server writes it
        if isinstance(value, dict):
            return {f"f:{k}": tree(v) for k, v in value.items()}
        if isinstance(value, list) and value and all(isinstance(i, dict) and "name" in i for i in value):
            items = {f"k:{json.dumps({'name': i['name']}, separators=(',', ':'))}": tree(i) for i in value}
            return {k: {".": {}, **v} for k, v in items.items()}
        return {}

    handoffs = copy.deepcopy(predictor)
    del handoffs["minReplicas"]
    fields = {"f:metadata": tree(body["metadata"]), "f:spec": {"f:predictor": {".": {}, **tree(handoffs)}}}
    live["metadata"]["managedFields"] = [
        {"manager": "handoff", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": fields},
        {"manager": "kubectl-edit", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {}},
    ]
    assert isvc.Served.of(live).predictor == handoffs
    assert isvc.Served.of(live, predictor).predictor == {**predictor, "minReplicas": 3}
    del live["metadata"]["managedFields"][0]
    assert isvc.Served.of(live).predictor == live_predictor


# --- the rollout's state machine, without an API server ----------------------------------------


class MemoryServices:
    """One InferenceService held in memory, for the state machine alone: an apply replaces what
    handoff manages (all of the object, here) and moves the generation when the spec changes."""

    namespace, name = NAMESPACE, MODEL
    what = f"InferenceService {NAMESPACE}/{MODEL}"
    deployment_name = f"{MODEL}-predictor"

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.applied: list[dict[str, Any]] = []

    def say(self, message: str) -> None:
        pass

    def get(self) -> dict[str, Any] | None:
        return copy.deepcopy(self.obj)

    def create(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return self._apply(config)

    def update(self, decide: Callable[[dict[str, Any]], Any]) -> tuple[Any, dict[str, Any]]:
        decision = decide(copy.deepcopy(self.obj))
        return decision, self._apply(decision.config)

    def pods(self, selector: str) -> list[Any]:
        return []

    def deployment(self) -> Any:
        return None

    def _apply(self, config: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(copy.deepcopy(config))
        generation = self.obj["metadata"]["generation"] if self.obj else 0
        generation += int(self.obj is None or self.obj["spec"] != config["spec"])
        self.obj = copy.deepcopy({**config, "metadata": {**config["metadata"], "generation": generation}})
        return copy.deepcopy(self.obj)


@dataclass
class ScriptedWatch:
    """KServe as the state machine sees it: each version's spec Ready at a URL naming the version,
    unless ``fails`` says why it will not be."""

    services: MemoryServices
    fails: dict[str, str] = field(default_factory=dict)

    def pods(self) -> list[Any]:
        return []

    def ready(
        self, generation: int, timeout_s: float, before: isvc.Before, canary: int | None
    ) -> dict[str, Any]:
        obj = self.services.get()
        assert obj is not None and obj["metadata"]["generation"] == generation
        if version_of(obj) in self.fails:
            raise isvc.RolloutFailed(self.fails[version_of(obj)])
        return {**obj, "status": {"url": f"http://version-{version_of(obj)}"}}

    def observed(self, generation: int, timeout_s: float, before: isvc.Before, canary: int | None) -> bool:
        return True


def smoke_of(passes: bool) -> Callable[[str], SmokeResult]:
    return lambda url: SmokeResult(passes and url == "http://version-2", "the smoke test", 1.0, 0.0)


def release(version: str) -> isvc.Release:
    return isvc.Release(MODEL, version, version * 64, "s3://models/triton")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("canary_percent", "fails", "passes", "phase", "applied"),
    [
        (10, {}, True, isvc.Phase.SERVING, [("2", 10), ("2", None)]),  # canary, promoted
        (10, {}, False, isvc.Phase.ROLLED_BACK, [("2", 10), ("1", 0)]),  # restored, traffic pinned to 1
        (10, {"2": "crash loop"}, True, isvc.Phase.ROLLED_BACK, [("2", 10), ("1", 0)]),
        (0, {}, False, isvc.Phase.ROLLED_BACK, [("2", None), ("1", None)]),  # all at once: no pin
    ],
)
def test_the_rollout_state_machine_runs_without_an_api_server(
    default_project: Path,
    canary_percent: int,
    fails: dict[str, str],
    passes: bool,
    phase: isvc.Phase,
    applied: list[tuple[str, int | None]],
) -> None:
    """The rollout's decisions (canary, promotion, what a rollback restores and whether it pins the
    traffic) on an in-memory service and a scripted KServe: no HTTP, no controller threads."""
    base = Project.load(default_project).settings
    kserve = base.serving.kserve.model_copy(update={"canary_percent": canary_percent})
    settings = base.model_copy(update={"serving": base.serving.model_copy(update={"kserve": kserve})})
    services = MemoryServices()
    services.create(isvc.manifest(settings, release("1")))
    first, services.applied = services.get(), []
    run = isvc.RolloutRun(services, ScriptedWatch(services, fails), settings, release("2"))
    if phase is isvc.Phase.SERVING:
        result = run.run(smoke_of(passes))
        assert (result.url, result.canary_percent, result.generation) == ("http://version-2", 10, 3)
    else:
        with pytest.raises(HandoffError, match="rolled back: version 1's spec is restored"):
            run.run(smoke_of(passes))
    assert run.phase is phase
    assert [
        (version_of(c), c["spec"]["predictor"].get("canaryTrafficPercent")) for c in services.applied
    ] == applied
    if phase is isvc.Phase.ROLLED_BACK:  # version 1's spec and annotations again, nothing of the rollout
        after = services.get()
        assert after is not None and after["metadata"]["annotations"] == first["metadata"]["annotations"]
        pinned = {
            **first["spec"]["predictor"],
            **({"canaryTrafficPercent": 0} if applied[-1][1] == 0 else {}),
        }
        assert after["spec"]["predictor"] == pinned


@pytest.mark.unit
def test_the_state_machine_leaves_a_failed_first_deploy_and_undoes_nothing_it_did_not_change(
    default_project: Path,
) -> None:
    settings = Project.load(default_project).settings
    services = MemoryServices()
    run = isvc.RolloutRun(services, ScriptedWatch(services, {"1": "crash loop"}), settings, release("1"))
    with pytest.raises(HandoffError, match="crash loop; nothing served before this deploy"):
        run.run(smoke_of(True))
    assert run.phase is isvc.Phase.LEFT
    assert services.get()["metadata"]["annotations"][isvc.NEVER_SERVED_KEY] == "true"
    # A redeploy of the spec that is there changes nothing, so a failure undoes nothing.
    services = MemoryServices()
    services.create(isvc.manifest(settings, release("1")))
    run = isvc.RolloutRun(services, ScriptedWatch(services, {"1": "crash loop"}), settings, release("1"))
    with pytest.raises(HandoffError, match="this deploy changed nothing, so nothing was rolled back"):
        run.run(smoke_of(True))
    assert run.phase is isvc.Phase.UNCHANGED and len(services.applied) == 2  # the create, the same again
