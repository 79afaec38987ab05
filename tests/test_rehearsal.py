"""The cluster run, rehearsed on this machine with the parts a cluster uses (``make rehearse``).

Every step runs in the project image built from its own Dockerfile, as uid 10001 with a read-only
root filesystem (so a read-only project folder), no capabilities and scratch space in tmpfs,
through both engines: the compiled Argo WorkflowTemplate pod by pod (``rehearsal.argo_runner``)
and the KFP pipeline with kfp's own DockerRunner (``rehearsal.kfp_docker``). The registry is a
real ``mlflow server`` whose artifacts are ``s3://`` objects in SeaweedFS; secrets reach the pods
as Secret references; the deploy step talks to the fake API server, whose KServe controller
starts the real predictor: KServe's storage initializer pulls the registered ``storageUri`` from
S3 and the ``handoff-onnx`` ServingRuntime's container serves it.

The tests run in order and share one registry: a first Argo run (its training, two processes
under torchrun as ``training.gpus: 2`` asks, killed mid-epoch once and resumed by the retry from
the state it stored in S3 through MLflow) makes the first champion, and its model is the very
one an uninterrupted run of the same container makes; a KFP run of a retrained model (two
processes too) replaces it through the real server; a run whose contract asks for more than the
model reaches deploys nothing, on each engine.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient

from handoff.kube import inference_service as isvc
from handoff.project import Project
from handoff_pipelines.compiled import ARGO_FILE, compile_project

from .conftest import edit_yaml, generate
from .fake_kube import FakeKube, KServe, fake_kube
from .rehearsal.argo_runner import ArgoRunner, S3Bucket, WorkflowRun
from .rehearsal.containers import ContainerSpec, Finished, Mount
from .rehearsal.fixtures import SUMMARY, RehearsalImages
from .rehearsal.kfp_docker import KfpRun, run_project
from .rehearsal.podman import Podman
from .rehearsal.predictor import Predictor, start_predictor
from .rehearsal.s3 import S3
from .rehearsal.tracking_server import TrackingServer

pytestmark = [pytest.mark.rehearsal, pytest.mark.slow]

MODEL = "digits-classifier"
SECRET = "object-store"  # the namespace's Secret with the S3 credentials and endpoint
KUBECONFIG = "/var/run/handoff-rehearsal/kubeconfig"


@dataclass
class Cluster:
    """What the rehearsal's runs share: the project, the services, the fake API server and the
    predictors its KServe controller started."""

    project: Path
    podman: Podman
    images: RehearsalImages
    s3: S3
    tracking: TrackingServer
    fake: FakeKube
    work: Path
    predictors: list[Predictor] = field(default_factory=list)

    @property
    def secrets(self) -> dict[str, dict[str, str]]:
        return {SECRET: self.s3.env()}

    @property
    def kubelet_env(self) -> dict[str, str]:
        """What every pod gets from the kubelet (the API server's address), and the kubeconfig the
        fake API server is reached with (it speaks plain HTTP, so no in-cluster token)."""
        port = self.fake.url.rsplit(":", 1)[1]
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
            "KUBECONFIG": KUBECONFIG,
        }

    @property
    def kubelet_mounts(self) -> tuple[Mount, ...]:
        return (Mount(self.work / "kubeconfig", KUBECONFIG),)

    def image(self) -> str:
        """The project image as the project folder now is (rebuilt when a file changed), by digest."""
        built = self.images.project(self.project)
        return f"{built.ref.rsplit(':', 1)[0]}@{self.podman.image_digest(built.ref)}"

    def registry(self) -> MlflowClient:
        # Both URIs: another test in this process may have left MLflow's registry URI set.
        return MlflowClient(tracking_uri=self.tracking.url, registry_uri=self.tracking.url)

    def champion(self) -> str:
        return self.registry().get_model_version_by_alias(MODEL, "champion").version

    def service(self) -> dict[str, Any]:
        return self.fake.get("inferenceservices", Project.load(self.project).settings.namespace, MODEL)

    def start_predictor(self, obj: dict[str, Any]) -> str:
        """The fake KServe controller's revision: the real storage initializer and runtime."""
        predictor = start_predictor(
            self.podman,
            platform_image=self.images.platform.ref,
            storage_initializer_image=self.images.storage_initializer.ref,
            s3=self.s3,
            work_dir=self.work / "predictors",
            predictor=obj["spec"]["predictor"],
        )
        self.predictors.append(predictor)
        return predictor.url


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    podman: Podman,
    rehearsal_images: RehearsalImages,
    s3: S3,
    tracking_server: TrackingServer,
) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("rehearsal")
    project = generate(work / "projects")

    def cluster_settings(settings: dict[str, Any]) -> None:
        settings["cluster"].update(
            mlflow_tracking_uri=tracking_server.url,
            secret_env=[{"name": name, "secret": SECRET, "key": name} for name in sorted(s3.env())],
        )
        settings["serving"]["kserve"].update(runtime="kserve")  # handoff-onnx: Triton has no image here

    edit_yaml(project / "handoff.yaml", cluster_settings)
    holder = Cluster(project, podman, rehearsal_images, s3, tracking_server, FakeKube(), work)
    with fake_kube(KServe(holder.start_predictor)) as fake:
        holder.fake = fake
        (work / "kubeconfig").write_text(yaml.safe_dump(kubeconfig(fake.url, Project.load(project))))
        (work / "kubeconfig").chmod(0o644)
        try:
            yield holder
        finally:
            for predictor in holder.predictors:
                predictor.stop()


def kubeconfig(server: str, project: Project) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "rehearsal", "cluster": {"server": server}}],
        "users": [{"name": "pipeline", "user": {"token": "rehearsal"}}],
        "contexts": [
            {
                "name": "rehearsal",
                "context": {
                    "cluster": "rehearsal",
                    "user": "pipeline",
                    "namespace": project.settings.namespace,
                },
            }
        ],
        "current-context": "rehearsal",
    }


STORED = re.compile(r"training state at step (\d+) stored in .* \(([\d.]+) MiB in ([\d.]+) s\)")
RESUMED = re.compile(r"resuming from \S+: epoch (\d+), step (\d+)")


def killing_train_once(podman: Podman) -> Callable[[ContainerSpec, float], Finished]:
    """``Podman.run``, except that the first train pod is killed (SIGKILL: a node lost) in the
    middle of training, once it has stored a state where the retry's new pod can find it."""
    killed: list[str] = []

    def kill_mid_training(name: str, done: threading.Event) -> None:
        while not done.wait(0.1):
            logs = podman.call("logs", name, check=False)
            if STORED.search(logs.stdout + logs.stderr):  # progress goes to stderr
                podman.call("kill", name, check=False)
                killed.append(name)
                return

    def run(spec: ContainerSpec, timeout_s: float) -> Finished:
        if not (spec.name and "-train-" in spec.name and not killed):
            return podman.run(spec, timeout_s)
        done = threading.Event()
        watcher = threading.Thread(target=kill_mid_training, args=(spec.name, done), daemon=True)
        watcher.start()
        try:
            return podman.run(spec, timeout_s)
        finally:
            done.set()
            watcher.join()

    return run


def run_argo(
    cluster: Cluster, *, run_container: Callable[[ContainerSpec, float], Finished] | None = None
) -> WorkflowRun:
    out = cluster.work / "compiled"
    compile_project(cluster.project, out, image=cluster.image(), targets=("argo",))
    template = yaml.safe_load((out / ARGO_FILE).read_text())
    runner = ArgoRunner(
        run_container=run_container or cluster.podman.run,
        store=S3Bucket(cluster.s3.client(), "pipelines"),
        workdir=cluster.work / "argo",
        secrets=cluster.secrets,
        backoff_scale=0.02,
        extra_env=cluster.kubelet_env,
        extra_mounts=cluster.kubelet_mounts,
    )
    return runner.run(template)


BODY = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.25] * 64}]}


def infer(url: str) -> np.ndarray:
    """The served model's answer (V2) to one image of the default contract."""
    response = requests.post(f"{url}/v2/models/{MODEL}/infer", json=BODY, timeout=30)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"][0]["data"])


def explain(run: WorkflowRun) -> str:
    """Each node's phase, and the output of the pods that failed (the assertion's message)."""
    lines = [f"workflow {run.name}: {run.phase} {run.message}"]
    for name, node in run.nodes.items():
        lines.append(f"  {name}: {node.phase} {node.message}")
        for attempt in node.attempts:
            if attempt.phase != "Succeeded":
                lines.append(f"    {attempt.pod}: {attempt.message}\n{attempt.stderr[-3000:]}")
    return "\n".join(lines)


def served(cluster: Cluster) -> tuple[str, str]:
    """The version the InferenceService serves and its storageUri."""
    obj = cluster.service()
    return obj["metadata"]["annotations"][isvc.VERSION_KEY], obj["spec"]["predictor"]["model"]["storageUri"]


def uninterrupted(cluster: Cluster, spec: ContainerSpec) -> tuple[dict[str, Any], Path, float]:
    """The train pod's container run again, as another pipeline run (another run key) would run
    it, uninterrupted: its record, its checkpoint and how long the container took."""
    args = list(spec.args)
    args[args.index("--run-key") + 1] = str(uuid.uuid4())
    outputs = cluster.work / "uninterrupted"
    outputs.mkdir(mode=0o777)
    outputs.chmod(0o777)  # an emptyDir, writable by the pod's user
    mounts = [m for m in spec.mounts if m.target not in ("/tmp/outputs", "/dev/termination-log")]
    reference = dataclasses.replace(
        spec,
        args=args,
        mounts=(*mounts, Mount(outputs, "/tmp/outputs", read_only=False)),
        name=f"uninterrupted-{uuid.uuid4().hex[:8]}",
    )
    started = time.monotonic()
    finished = cluster.podman.run(reference, 1800)
    assert finished.exit_code == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout), outputs / "checkpoint.pt", time.monotonic() - started


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of the weights that differ in any bit between two checkpoints."""
    first, second = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


def test_argo_runs_every_pod_as_compiled_resumes_a_killed_training_and_serves_from_s3(
    cluster: Cluster,
) -> None:
    # Long enough a training that the kill lands in the middle of it, with state every 10 steps
    # (an epoch is 23): the retry resumes mid-epoch. Two GPUs: torchrun runs two processes (gloo).
    edit_yaml(
        cluster.project / "handoff.yaml",
        lambda s: s["training"].update(overrides={"epochs": 20}, gpus=2, checkpoint_every_steps=10),
    )
    run = run_argo(cluster, run_container=killing_train_once(cluster.podman))
    assert run.phase == "Succeeded", explain(run)
    train = run["train"]
    assert len(train.attempts) == 2 and train.attempts[0].exit_code == 137  # killed, then retried
    killed, retry = train.attempts
    assert "handoff: training as 2 processes (torchrun)" in killed.stderr
    stored = [int(m[1]) for m in STORED.finditer(killed.stderr)]
    resumed = json.loads(train.outputs.parameters["record"])
    assert resumed["world_size"] == 2 and 0 < resumed["resumed_from_step"] < resumed["steps"]
    # The retry's pod has a new disk: it fetched what the killed pod stored (the kill came once a
    # state was stored; more may have been stored before it landed) and resumed from it.
    assert resumed["resumed_from_step"] >= stored[0]
    assert (
        f"fetched training state step-{resumed['resumed_from_step']:09d}.pt from MLflow run" in retry.stderr
    )
    assert f"step {resumed['resumed_from_step']}" in RESUMED.search(retry.stderr)[0]  # type: ignore[index]
    assert retry.spec is not None
    reference, reference_checkpoint, reference_s = uninterrupted(cluster, retry.spec)
    assert reference["resumed_from_step"] == 0 and reference["steps"] == resumed["steps"]
    (outputs,) = [m.source for m in retry.spec.mounts if m.target == "/tmp/outputs"]
    assert same_tensors(outputs / "checkpoint.pt", reference_checkpoint) == []  # bit for bit
    uploads = [float(m[3]) for m in STORED.finditer(killed.stderr + retry.stderr)]
    SUMMARY.append(
        f"argo train: killed once step {stored[0]}'s state was stored, resumed from step "
        f"{resumed['resumed_from_step']}, same weights as uninterrupted; {len(uploads)} state uploads "
        f"({STORED.search(retry.stderr)[2]} MiB) to S3, median {statistics.median(uploads):.2f} s, "  # type: ignore[index]
        f"max {max(uploads):.2f} s; the retry trained {resumed['seconds']:.0f} s, uninterrupted "
        f"{reference['seconds']:.0f} s (its container {reference_s:.0f} s)"
    )
    for name in ("train", "export", "optimize", "evaluate", "register"):
        spec = run[name].attempts[-1].spec
        assert spec is not None and (spec.user, spec.read_only, spec.cap_drop) == (10001, True, ("ALL",))
    registered = json.loads(run["register"].outputs.parameters.get("record", "{}"))  # what deploy read
    assert registered["promoted"] and registered["promotion"] == "promoted: the first champion"
    deployed = json.loads(run["deploy[0].deploy"].outputs.result or "{}")
    assert (deployed["target"], deployed["version"], deployed["smoke_passed"]) == ("cluster", "1", True)
    version, storage_uri = served(cluster)
    assert version == "1" and storage_uri.startswith("s3://mlflow/") and storage_uri.endswith(f"/{MODEL}")
    assert cluster.registry().get_model_version_download_uri(MODEL, "1").startswith("s3://mlflow/")
    assert infer(cluster.predictors[-1].url).shape == (10,)
    SUMMARY.append(f"argo: {run.name} {run.phase} in {run.duration_s:.0f} s; serving v1 from {storage_uri}")
    platform = cluster.images.platform.ref
    SUMMARY.append(f"platform image {platform} ({cluster.podman.image_digest(platform)})")
    SUMMARY.append(f"project image {run['train'].attempts[-1].spec.image}")  # type: ignore[union-attr]


def run_kfp(cluster: Cluster, docker_host: str) -> KfpRun:
    return run_project(
        Project.load(cluster.project),
        cluster.image(),
        docker_host=docker_host,
        pipeline_root=cluster.work / f"kfp-{len(list(cluster.work.glob('kfp-*')))}",
        secrets=cluster.secrets,
        extra_env=cluster.kubelet_env,
        extra_mounts=cluster.kubelet_mounts,
    )


def explain_kfp(run: KfpRun) -> str:
    return "\n".join(
        [f"kfp: {run.status}"]
        + [
            f"  {name}: {task.status} {task.error or ''}\n{task.log[-3000:]}"
            for name, task in run.tasks.items()
        ]
    )


def test_kfp_replaces_the_champion_through_the_real_server(cluster: Cluster, docker_host: str) -> None:
    before = infer(cluster.predictors[-1].url)
    edit_yaml(
        cluster.project / "handoff.yaml",
        lambda s: s["training"].update(overrides={"epochs": 30}, checkpoint_every_steps=50),
    )
    run = run_kfp(cluster, docker_host)
    assert run.status == "SUCCESS", explain_kfp(run)
    assert all(c.user == "10001:10001" and c.read_only for c in run.containers)
    assert run.records["train"]["world_size"] == 2  # training.gpus: 2, through the KFP wrapper
    registered, deployed = run.records["register"], run.records["deploy"]
    assert (registered["version"], registered["promoted"]) == ("2", True)
    assert registered["promotion"] == "promoted: replaced v1"
    assert (deployed["target"], deployed["version"], deployed["smoke_passed"]) == ("cluster", "2", True)
    assert cluster.champion() == "2"
    version, storage_uri = served(cluster)
    assert version == "2" and storage_uri.startswith("s3://mlflow/")
    after = infer(cluster.predictors[-1].url)  # the new revision's predictor, started from S3
    assert not np.allclose(before, after)
    SUMMARY.append(f"kfp: {run.run_id} {run.status}; serving v2 from {storage_uri}")


def test_a_failed_gate_deploys_nothing_on_either_engine(cluster: Cluster, docker_host: str) -> None:
    serving = cluster.service()["metadata"]["generation"]
    edit_yaml(cluster.project / "contract.yaml", lambda c: c["slo"].update(min_metrics={"accuracy": 0.9999}))
    # A model of its own under the edited contract (a version is the model and its contract); two
    # epochs, because the gate fails whatever they learn.
    edit_yaml(
        cluster.project / "handoff.yaml", lambda s: s["training"].update(overrides={"epochs": 2}, gpus=0)
    )
    argo = run_argo(cluster)
    assert argo.phase == "Succeeded", explain(argo)  # a failed gate is an outcome, not an error
    assert argo["deploy[0].deploy"].phase == "Skipped"
    promotion = json.loads(argo["register"].outputs.parameters.get("record", "{}"))["promotion"]
    assert promotion.startswith("not promoted: the gate failed: accuracy "), promotion
    kfp = run_kfp(cluster, docker_host)
    assert kfp.status == "SUCCESS", explain_kfp(kfp)
    assert "deploy" not in kfp.tasks and kfp.records["register"]["promoted"] is False
    gates = [v.tags["handoff.gate"] for v in cluster.registry().search_model_versions(f"name='{MODEL}'")]
    assert sorted(gates) == ["failed", "passed", "passed"]  # both runs made v3, a challenger
    assert cluster.champion() == "2" and cluster.service()["metadata"]["generation"] == serving
    SUMMARY.append("gate failed on both engines: registered as challengers, nothing deployed")
