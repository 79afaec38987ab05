"""The cluster rehearsal's parts, each proved on its own: real containers (podman), the images,
S3 (SeaweedFS), the tracking server and KServe's storage initializer and predictor.

What a user of the rehearsal relies on: the project image runs as the pipeline's pods run (uid
10001, read-only root, no capabilities); MLflow artifacts land in the bucket as ``s3://`` URIs;
KServe's storage initializer downloads a registered model folder from there; and the
``handoff-onnx`` runtime, started as its manifest says, serves that model over V2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime
import pytest
import requests
from mlflow.tracking import MlflowClient

from handoff.contract import CONTRACT_FILE
from handoff.files import sha256_of
from handoff.kube import inference_service as isvc
from handoff.project import Project
from handoff.triton import TRITON_DIR, layout_digest, write_layout

from .conftest import mlflow_state_restored
from .rehearsal.containers import ContainerSpec
from .rehearsal.podman import Podman
from .rehearsal.predictor import start_predictor, storage_initializer
from .rehearsal.s3 import S3
from .rehearsal.tracking_server import TrackingServer

if TYPE_CHECKING:  # imported by pytest as a plugin (below), not before it
    from .rehearsal.fixtures import RehearsalImages

pytestmark = [pytest.mark.rehearsal, pytest.mark.slow]

MODEL = "digits-classifier"  # the default project's contract name
# What the pipeline's pods declare (pipelines' pod specs): uid/gid 10001, read-only root file
# system, every capability dropped, no privilege escalation, an emptyDir at /tmp.
POD = ContainerSpec(
    image="",
    user=10001,
    group=10001,
    read_only=True,
    cap_drop=("ALL",),
    no_new_privileges=True,
    tmpfs={"/tmp": "1Gi"},
    cpus="1",
    memory="2Gi",
    network="none",  # nothing is fetched at run time
)
# Run inside the pod: who am I, what may I do, where may I write.
PROBE = """
import json, os, pathlib
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())

def writable(folder):
    try:
        pathlib.Path(folder, "probe").write_text("x")
    except OSError:
        return False
    return True

print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "capabilities": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "seccomp": status["Seccomp"].strip(),
    "writable": {folder: writable(folder) for folder in ("/", "/app", "/opt/handoff", "/tmp")},
}))
"""


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ for the block (boto3 and MLflow read their settings there)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def files(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def triton_root(default_project: Path, default_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Triton repository export writes (triton/<model>/{contract.yaml,config.pbtxt,1/model.onnx})."""
    project = Project.load(default_project)
    out = tmp_path_factory.mktemp("export")
    return write_layout(project.contract, default_project / CONTRACT_FILE, default_onnx, out)


@dataclass(frozen=True)
class Logged:
    run_id: str
    triton_uri: str  # the repository root's artifact URI, as register records it
    download_uri: str  # the registered version's, from the registry


@pytest.fixture(scope="module")
def logged(tracking_server: TrackingServer, triton_root: Path) -> Logged:
    """The Triton repository logged into a run through the tracking server, as register logs it,
    and registered as a model version."""
    with mlflow_state_restored(), environment(tracking_server.env()):
        client = MlflowClient(tracking_uri=tracking_server.url, registry_uri=tracking_server.url)
        experiment = client.create_experiment(f"rehearsal-{uuid.uuid4().hex[:8]}")
        run_id = client.create_run(experiment).info.run_id
        artifact_path = f"{TRITON_DIR}/{layout_digest(triton_root)[:16]}"
        client.log_artifacts(run_id, str(triton_root), artifact_path)
        client.set_terminated(run_id)
        triton_uri = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        name = f"{MODEL}-{uuid.uuid4().hex[:8]}"
        client.create_registered_model(name)
        version = client.create_model_version(name, source=triton_uri, run_id=run_id)
        download_uri = client.get_model_version_download_uri(name, version.version)
    return Logged(run_id=run_id, triton_uri=triton_uri, download_uri=download_uri)


def test_the_project_image_runs_handoff_check_as_the_pipeline_pods_run(
    podman: Podman, rehearsal_images: RehearsalImages, default_project: Path
) -> None:
    image = rehearsal_images.project(default_project)
    pod = replace(POD, image=image.ref)

    probe = podman.run(replace(pod, command=["python", "-c", PROBE]), timeout_s=120)
    assert probe.exit_code == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert (seen["uid"], seen["gid"]) == (10001, 10001)
    assert int(seen["capabilities"], 16) == 0 and seen["no_new_privs"] == "1"
    assert seen["seccomp"] == "2"  # a filter: the engine's default profile (RuntimeDefault)
    # Only the emptyDir is writable: not the root, not the project, not the platform's venv.
    assert seen["writable"] == {"/": False, "/app": False, "/opt/handoff": False, "/tmp": True}

    check = podman.run(replace(pod, command=["handoff", "check"]), timeout_s=300)
    assert check.exit_code == 0, check.stdout[-3000:] + check.stderr[-3000:]


def test_an_mlflow_client_logs_artifacts_through_the_tracking_server_into_the_bucket(
    logged: Logged, s3: S3, triton_root: Path
) -> None:
    assert logged.triton_uri.startswith("s3://mlflow/"), logged.triton_uri
    assert logged.download_uri == logged.triton_uri  # the registry hands out the same s3:// location
    stored = sorted(s3.list(logged.triton_uri))
    expected = sorted(f"{logged.triton_uri}/{name}" for name in files(triton_root))
    assert stored == expected
    onnx = f"{logged.triton_uri}/{MODEL}/1/model.onnx"
    assert s3.read(onnx) == (triton_root / MODEL / "1" / "model.onnx").read_bytes()


def test_the_storage_initializer_downloads_the_model_folder_and_needs_the_keys(
    podman: Podman,
    rehearsal_images: RehearsalImages,
    s3: S3,
    logged: Logged,
    triton_root: Path,
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "mnt-models"
    model_dir.mkdir()
    model_dir.chmod(0o777)  # an emptyDir
    image = rehearsal_images.storage_initializer.ref
    uri = f"{logged.triton_uri}/{MODEL}"

    download = podman.run(storage_initializer(image, uri, model_dir, s3, user=10001), timeout_s=120)
    assert download.exit_code == 0, download.stdout[-2000:] + download.stderr[-3000:]
    assert files(model_dir) == files(triton_root / MODEL)

    wrong = S3(s3.endpoint_url, s3.access_key, "not-the-secret")
    elsewhere = tmp_path / "refused"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    refused = podman.run(storage_initializer(image, uri, elsewhere, wrong, user=10001), timeout_s=120)
    assert refused.exit_code != 0 and files(elsewhere) == {}
    assert "S3 error [403]" in refused.stderr, refused.stderr[-3000:]


def test_the_handoff_onnx_predictor_serves_the_registered_model_over_v2(
    podman: Podman,
    rehearsal_images: RehearsalImages,
    s3: S3,
    logged: Logged,
    default_project: Path,
    default_onnx: Path,
    tmp_path: Path,
    rehearsal_timings: dict[str, float],
) -> None:
    # The InferenceService deploy would create for this version on the project's own runtime.
    settings = Project.load(default_project).settings
    kserve = settings.serving.kserve.model_copy(update={"runtime": "kserve"})
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"kserve": kserve})})
    release = isvc.Release(MODEL, "1", sha256_of(default_onnx), logged.triton_uri)
    predictor = isvc.manifest(settings, release)["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == f"{logged.triton_uri}/{MODEL}"

    with start_predictor(
        podman,
        predictor=predictor,
        platform_image=rehearsal_images.platform.ref,
        storage_initializer_image=rehearsal_images.storage_initializer.ref,
        s3=s3,
        work_dir=tmp_path,
    ) as served:
        rehearsal_timings["predictor: storage initializer download"] = served.download_s
        rehearsal_timings["predictor: container start to ready"] = served.ready_s
        assert served.model_name == MODEL
        # The container runs as the ServingRuntime and the InferenceService say.
        container = podman.inspect(served.container)
        host = container["HostConfig"]
        assert container["Config"]["User"] == "10001:10001"
        assert host["ReadonlyRootfs"] and host["SecurityOpt"] == ["no-new-privileges"]
        assert (host["NanoCpus"], host["Memory"]) == (10**9, 2 * 2**30)  # cpu "1", memory 2Gi
        tmp = host["Tmpfs"]["/tmp"].split(",")  # the emptyDir: 256Mi, empty, executable
        assert "size=256m" in tmp and "tmpcopyup" not in tmp and "noexec" not in tmp, tmp
        assert {mount["Destination"]: mount["RW"] for mount in container["Mounts"]} == {"/mnt/models": False}
        inputs = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
        body = {
            "inputs": [
                {"name": "image", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": inputs.ravel().tolist()}
            ]
        }
        answer = requests.post(served.infer_url, json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        (output,) = answer.json()["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [3, 10])
        expected = onnxruntime.InferenceSession(str(default_onnx)).run(None, {"image": inputs})[0]
        np.testing.assert_allclose(np.asarray(output["data"]).reshape(3, 10), expected, rtol=1e-5, atol=1e-5)
        # The contract is enforced in the container too.
        bad = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
        assert requests.post(served.infer_url, json=bad, timeout=30).status_code == 400


def test_docker_clients_run_containers_through_podmans_api(
    podman: Podman, docker_host: str, rehearsal_images: RehearsalImages
) -> None:
    """What kfp.local's DockerRunner does, through the ``docker`` SDK and DOCKER_HOST."""
    import docker

    base = rehearsal_images.base.ref
    pinned = f"{base.rsplit(':', 1)[0]}@{podman.image_digest(base)}"  # by digest, as pods pin images
    client = docker.DockerClient(base_url=docker_host)
    try:
        container = client.containers.run(
            pinned,
            ["python", "-c", "import os; print(os.getuid(), os.getgid())"],
            user="10001:10001",
            read_only=True,
            cap_drop=["ALL"],
            network_mode="none",
            detach=True,
        )
        try:
            assert container.wait(timeout=60)["StatusCode"] == 0
            assert container.logs().decode().split() == ["10001", "10001"]
        finally:
            container.remove(force=True)
    finally:
        client.close()
