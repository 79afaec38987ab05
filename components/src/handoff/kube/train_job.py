"""Multi-node training as a training-operator job: build it, launch it, wait for it, say why it failed.

One node trains inside the pipeline's train step. N nodes × G GPUs need a gang of pods that start
together and find each other, which is what Kubeflow Trainer's ``TrainJob`` (v2, current) and the
legacy training-operator ``PyTorchJob`` (v1) provide. Every node runs ``torchrun -m handoff train``:
under a TrainJob, torchrun reads the ``PET_*`` variables Trainer injects (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``); under a
PyTorchJob, the nodes meet by c10d rendezvous at the master's ``MASTER_ADDR``. Either way each
node runs exactly what ``torchrun --nproc-per-node 2`` runs on a laptop.

The job's name is derived from the pipeline run, so a retried train step re-attaches to its job
instead of starting a second one. The nodes write to a shared ReadWriteMany volume: a restarted
node resumes from the newest checkpoint there, and the step copies the trained model from it.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from handoff.errors import HandoffError
from handoff.files import read_json
from handoff.kube.client import api_client, api_error, describe, reason
from handoff.kube.images import pull_policy
from handoff.labels import labels
from handoff.project import Project
from handoff.settings import TrainingSettings

# Where the shared volume is mounted, in the nodes and in the train step's own pod.
WORKSPACE = PurePosixPath("/workspace")
# Who owns the TrainJob's runtime patch (Trainer keys patches by manager).
PATCH_MANAGER = "handoff.dev/train-step"
# The non-root user every pod runs as (the platform image creates it).
RUN_AS_USER = 10001


@dataclass(frozen=True)
class JobKind:
    """One training-operator API: where its objects live and how their status reads."""

    group: str
    version: str
    plural: str
    kind: str
    succeeded: str  # the condition type that means the job finished well
    pod_label: str  # the label its pods carry with the job's name

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


TRAINJOB = JobKind(
    "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "Complete", "jobset.sigs.k8s.io/jobset-name"
)
PYTORCHJOB = JobKind(
    "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "Succeeded", "training.kubeflow.org/job-name"
)
JOB_KINDS = {"trainjob": TRAINJOB, "pytorchjob": PYTORCHJOB}


# Operators derive longer names from the job's (JobSet pods "<job>-node-0-<i>-<5 chars>", PyTorchJob
# services "<job>-worker-<i>"), which must stay DNS labels of at most 63 characters.
JOB_NAME_MAX = 37


def job_name(project: str, run_key: str) -> str:
    """A stable RFC 1035 name per (project, pipeline run): what makes a retried step re-attach."""
    digest = hashlib.sha256(f"{project}\0{run_key}".encode()).hexdigest()[:10]
    stem = project[: JOB_NAME_MAX - len("train--") - len(digest)].rstrip("-")
    return f"train-{stem}-{digest}"


@dataclass(frozen=True)
class JobFiles:
    """The job's folder on the shared volume, as a path under some mount point."""

    root: PurePosixPath | Path

    @property
    def checkpoint(self) -> PurePosixPath | Path:
        return self.root / "checkpoint.pt"

    @property
    def record(self) -> PurePosixPath | Path:
        return self.root / "record.json"


def node_command(kind: JobKind, name: str, project_dir: str, training: TrainingSettings) -> list[str]:
    """torchrun around ``python -m handoff train``, writing to the job's folder on the volume."""
    files = JobFiles(WORKSPACE / name)
    step = ["-m", "handoff", "train", "--project", project_dir]
    step += ["--checkpoint", str(files.checkpoint), "--record", str(files.record)]
    if kind is TRAINJOB:  # nodes, ranks and the master all come from Trainer's PET_* variables
        return ["torchrun", *step]
    # training-operator v1 sets MASTER_ADDR/MASTER_PORT on every replica; Kubernetes expands
    # $(VAR) in a container's command from its environment.
    return [
        "torchrun",
        f"--nnodes={training.nodes}",
        f"--nproc-per-node={max(1, training.gpus)}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)",
        f"--rdzv-id={name}",
        *step,
    ]


def _resources(training: TrainingSettings) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": training.cpu, "memory": training.memory}
    if training.gpus:
        amounts["nvidia.com/gpu"] = training.gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _volumes(claim: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The shared workspace, plus scratch and shared memory (the root filesystem is read-only)."""
    volumes = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # DataLoader workers, NCCL
    ]
    mounts = [
        {"name": "workspace", "mountPath": str(WORKSPACE)},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]


def _pod_spec(training: TrainingSettings, container: dict[str, Any]) -> dict[str, Any]:
    """A node's pod: ``container`` plus the shared volume, security and placement from handoff.yaml."""
    volumes, mounts = _volumes(training.job.workspace_claim or "")
    spec: dict[str, Any] = {
        "securityContext": _pod_security(),
        "volumes": volumes,
        "containers": [{**container, "volumeMounts": mounts, "securityContext": _container_security()}],
    }
    if training.node_selector:
        spec["nodeSelector"] = dict(training.node_selector)
    if training.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in training.tolerations]
    return spec


def trainjob_manifest(project: Project, name: str, project_dir: str) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob on the ``torch-distributed`` style runtime."""
    settings, training = project.settings, project.settings.training
    # Trainer fills in image, command, resources and env from `trainer`; the patch adds the rest.
    pod_spec = _pod_spec(training, {"name": "node"})
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels(project.settings.project, "train"),
        },
        "spec": {
            # Trainer stops the job itself past the step's timeout, even if the step is gone.
            "activeDeadlineSeconds": training.job.timeout_s,
            "runtimeRef": {"name": training.job.runtime},
            "trainer": {
                "image": settings.image,
                "command": node_command(TRAINJOB, name, project_dir, training),
                "numNodes": training.nodes,
                "numProcPerNode": max(1, training.gpus),
                "resourcesPerNode": _resources(training),
                "env": list(ENV),
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": "node", "template": {"spec": {"template": {"spec": pod_spec}}}}
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def pytorchjob_manifest(project: Project, name: str, project_dir: str) -> dict[str, Any]:
    """The same job for training-operator v1: one Master and nodes − 1 Workers."""
    settings, training = project.settings, project.settings.training
    container = {
        "name": "pytorch",  # the container name training-operator v1 looks for
        "image": settings.image,
        # A tag is resolved again at every node's start, so no node runs a stale cached build.
        "imagePullPolicy": pull_policy(settings.image),
        "command": node_command(PYTORCHJOB, name, project_dir, training),
        "env": list(ENV),
        "resources": _resources(training),
    }
    pod_spec = _pod_spec(training, container)
    # The nodes train and write to the volume; they never call the API server, so they carry no
    # token. (A TrainJob's runtime patch has no such field: its nodes run as the namespace's
    # `default` account, which mounts none in the platform manifests.)
    pod_spec["automountServiceAccountToken"] = False

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod_spec}}

    specs = {"Master": replicas(1)}
    if training.nodes > 1:
        specs["Worker"] = replicas(training.nodes - 1)
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels(project.settings.project, "train"),
        },
        "spec": {
            "nprocPerNode": str(max(1, training.gpus)),
            "runPolicy": {
                "cleanPodPolicy": "None",  # keep finished pods: their logs say what happened
                "backoffLimit": 3,
                "activeDeadlineSeconds": training.job.timeout_s,
            },
            "pytorchReplicaSpecs": specs,
        },
    }


def job_manifest(project: Project, name: str, project_dir: str) -> dict[str, Any]:
    """The job for ``training.job.api`` in handoff.yaml."""
    build = trainjob_manifest if project.settings.training.job.api == "trainjob" else pytorchjob_manifest
    return build(project, name, project_dir)


# --- launching and waiting ----------------------------------------------------------------------


@dataclass(frozen=True)
class JobStatus:
    finished: bool
    failed: bool
    summary: str  # the newest condition, "Type: reason: message"


def job_status(kind: JobKind, obj: dict[str, Any]) -> JobStatus:
    """Read the job's conditions: finished when the success or ``Failed`` condition is True."""
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    failed = next((c for c in conditions if c.get("type") == "Failed"), None)
    done = next((c for c in conditions if c.get("type") == kind.succeeded), None)
    newest = failed or done or (conditions[-1] if conditions else None)
    summary = "Pending: no conditions yet"
    if newest:
        summary = ": ".join(p for p in (newest.get("type"), newest.get("reason"), newest.get("message")) if p)
    return JobStatus(finished=bool(failed or done), failed=failed is not None, summary=summary)


class TransientApiError(Exception):
    """The API server could not answer this time (restarting, overloaded, unreachable)."""


MAX_POLL_FAILURES = 30


class JobClient:
    """The few API calls a train step makes, with errors that name the job."""

    def __init__(self, kind: JobKind, namespace: str, api: client.ApiClient):
        self.kind, self.namespace = kind, namespace
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def _call(self, action: str, name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except ApiException as exc:
            raise api_error(exc, action, describe(self.kind.kind, self.namespace, name)) from None

    def create_or_attach(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the job; if it exists (a retried step), return that one. Second item: created."""
        k, name = self.kind, manifest["metadata"]["name"]
        try:
            created = self.objects.create_namespaced_custom_object(
                k.group, k.version, self.namespace, k.plural, manifest
            )
            return created, True
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, "create", describe(k.kind, self.namespace, name)) from None
        return self.get(name), False

    def get(self, name: str) -> dict[str, Any]:
        """The job as the API server has it; TransientApiError when trying again may help."""
        k, ns = self.kind, self.namespace
        try:
            return self.objects.get_namespaced_custom_object(k.group, k.version, ns, k.plural, name)
        except ApiException as exc:
            if (exc.status or 0) >= 500 or exc.status == 429:
                raise TransientApiError(reason(exc)) from None
            raise api_error(exc, "read", describe(k.kind, ns, name)) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientApiError(f"API server unreachable: {exc}") from None

    def delete(self, name: str) -> None:
        k = self.kind
        self._call(
            "delete",
            name,
            lambda: self.objects.delete_namespaced_custom_object(
                k.group, k.version, self.namespace, k.plural, name, propagation_policy="Foreground"
            ),
        )

    def pod_failures(self, name: str) -> list[str]:
        """What the job's failed containers said (their termination message, or exit code)."""
        selector = f"{self.kind.pod_label}={name}"
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        except ApiException:
            return []  # the job's own condition is still reported
        found = []
        for pod in pods.items:
            for status in pod.status.container_statuses or []:
                state, waiting = status.state.terminated, status.state.waiting
                if state is None and status.last_state is not None:
                    state = status.last_state.terminated
                if state is not None and state.exit_code:
                    said = (state.message or "").strip() or f"exit code {state.exit_code} ({state.reason})"
                    found.append(f"pod {pod.metadata.name}: {said}")
                elif waiting is not None and waiting.reason == "CrashLoopBackOff":
                    found.append(f"pod {pod.metadata.name}: crash-looping ({waiting.message or ''})")
        return found


def wait_for_job(
    jobs: JobClient,
    name: str,
    *,
    timeout_s: float,
    poll_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll until the job succeeds; raise with its failure reason, or delete it on timeout.

    Polling (not a watch) keeps working across API server restarts and expired watches, and a
    poll every few seconds costs nothing next to a training run. Transient failures (5xx, 429,
    no connection) are retried for up to ``MAX_POLL_FAILURES`` polls in a row.
    """
    deadline = clock() + timeout_s
    what = describe(jobs.kind.kind, jobs.namespace, name)
    last, failures = "", 0
    while True:
        try:
            obj = jobs.get(name)
        except TransientApiError as exc:
            failures += 1
            if failures >= MAX_POLL_FAILURES:
                message = f"gave up on {what} after {failures} failed polls in a row: {exc}"
                raise HandoffError(message) from None
            print(f"{what}: poll failed ({exc}); retrying", file=sys.stderr, flush=True)
            sleep(poll_s)
            continue
        failures = 0
        status = job_status(jobs.kind, obj)
        if status.summary != last:
            print(f"{what}: {status.summary}", flush=True)
            last = status.summary
        if status.failed:
            details = "; ".join(jobs.pod_failures(name))
            raise HandoffError(f"{what} failed: {status.summary}" + (f"; {details}" if details else ""))
        if status.finished:
            return obj
        if clock() >= deadline:
            jobs.delete(name)
            raise HandoffError(
                f"{what} did not finish within training.job.timeout_s = {timeout_s:g} s "
                f"(last status: {status.summary}); the job was deleted"
            )
        sleep(poll_s)


def train_on_cluster(
    project: Project,
    checkpoint: Path | str,
    *,
    run_key: str,
    project_dir_in_image: str,
    workspace: Path = Path(str(WORKSPACE)),
    api: client.ApiClient | None = None,
    poll_s: float = 10.0,
) -> dict[str, Any]:
    """Launch (or re-attach to) this run's job, wait for it, copy its model to ``checkpoint``.

    Returns the nodes' training record. ``workspace`` is where this pod mounts the shared volume.
    """
    training = project.settings.training
    kind = JOB_KINDS[training.job.api]
    name = job_name(project.settings.project, run_key)
    jobs = JobClient(kind, project.settings.namespace, api or api_client())
    _, created = jobs.create_or_attach(job_manifest(project, name, project_dir_in_image))
    print(
        f"{'created' if created else 're-attached to'} {describe(kind.kind, jobs.namespace, name)}: "
        f"{training.nodes} nodes × {max(1, training.gpus)} processes",
        file=sys.stderr,
        flush=True,
    )
    wait_for_job(jobs, name, timeout_s=training.job.timeout_s, poll_s=poll_s)
    files = JobFiles(workspace / name)
    if not Path(files.checkpoint).is_file() or not Path(files.record).is_file():
        raise HandoffError(
            f"{kind.kind} {name} succeeded but left no {files.checkpoint} / {files.record}: is "
            f"training.job.workspace_claim ({training.job.workspace_claim}) mounted at {WORKSPACE} "
            "in the train step and ReadWriteMany?"
        )
    shutil.copyfile(files.checkpoint, checkpoint)
    return read_json(Path(files.record))
