"""The predictor KServe would start for an InferenceService on the ``handoff-onnx`` runtime.

KServe turns an InferenceService into a pod of two steps, and this module runs both as containers:

1. the storage initializer (an init container: KServe's own code, see images.py) downloads the
   ``storageUri`` into the ``kserve-provision-location`` emptyDir at ``/mnt/models``; here that
   emptyDir is a host folder (mode 0777, as the kubelet creates one);
2. the ServingRuntime's container starts with that folder mounted read-only at ``/mnt/models``.

The runtime container is read from ``manifests/base/serving-runtime.yaml`` at run time (image,
command, args, env, securityContext, resources limits, volumes, ports, probes), so the rehearsal
runs what the cluster would, not a copy. Only its image is swapped: the manifest names the
platform image in a registry; here it is the platform image built locally.

Networking: the runtime listens on 0.0.0.0:8080 (fixed in its args), so it runs on podman's
bridge network with 8080 published on a free 127.0.0.1 port (a Service in front of a pod, in
effect); podman's netavark bridge works here as root. The storage initializer runs on the host
network to reach the S3 gateway on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from .containers import ContainerSpec, Finished, Mount
from .podman import Podman, RehearsalError, free_port, http_status
from .s3 import S3

TEMPLATE = Path(__file__).resolve().parents[2]
SERVING_RUNTIME = TEMPLATE / "manifests" / "base" / "serving-runtime.yaml"
RUNTIME_NAME = "handoff-onnx"
MODELS_PATH = "/mnt/models"  # where KServe mounts the storage initializer's download
PLATFORM_IMAGE_NAME = "ml-handoff"  # the manifest's image, replaced by the local platform image
# KServe's default ClusterStorageContainer (the storage initializer's container) limits.
STORAGE_INITIALIZER_LIMITS = {"cpu": "1", "memory": "1Gi"}


@dataclass(frozen=True)
class Probe:
    """The runtime container's readiness probe (httpGet): where the kubelet asks, and from when."""

    path: str
    port: int
    initial_delay_s: float = 0.0

    @classmethod
    def from_manifest(cls, probe: Mapping[str, Any], where: str) -> Probe:
        http = probe.get("httpGet")
        if not http:
            raise RehearsalError(f"{where}: only httpGet readiness probes are rehearsed, got {dict(probe)}")
        return cls(http["path"], int(http["port"]), float(probe.get("initialDelaySeconds", 0)))


@dataclass(frozen=True)
class RuntimeContainer:
    """The ServingRuntime's container as a :class:`ContainerSpec` (without the model and port),
    and what the kubelet would do with it."""

    spec: ContainerSpec
    container_port: int
    readiness: Probe
    run_as_non_root: bool  # the kubelet refuses to start it as uid 0


def security(context: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A container securityContext as ContainerSpec fields (what podman can express, or an error)."""
    unsupported = [
        key
        for key in ("privileged", "seLinuxOptions", "windowsOptions", "appArmorProfile")
        if context.get(key)
    ]
    if context.get("procMount", "Default") != "Default":
        unsupported.append("procMount")
    if unsupported:
        raise RehearsalError(f"{where}: securityContext {', '.join(unsupported)} is not rehearsed")
    if context.get("capabilities", {}).get("add"):
        raise RehearsalError(f"{where}: securityContext.capabilities.add is not rehearsed")
    fields: dict[str, Any] = {}
    if "runAsUser" in context:
        fields["user"] = int(context["runAsUser"])
    if "runAsGroup" in context:
        fields["group"] = int(context["runAsGroup"])
    if "readOnlyRootFilesystem" in context:
        fields["read_only"] = bool(context["readOnlyRootFilesystem"])
    if "allowPrivilegeEscalation" in context:
        fields["no_new_privileges"] = not context["allowPrivilegeEscalation"]
    if "capabilities" in context:
        fields["cap_drop"] = tuple(context["capabilities"].get("drop", ()))
    if "seccompProfile" in context:
        fields["seccomp"] = context["seccompProfile"]["type"]
    return fields


def load_runtime(platform_image: str, manifest: Path = SERVING_RUNTIME) -> RuntimeContainer:
    """The ``handoff-onnx`` runtime's container from its manifest, on ``platform_image``."""
    runtime = yaml.safe_load(manifest.read_text())
    if runtime.get("kind") != "ServingRuntime" or runtime["metadata"]["name"] != RUNTIME_NAME:
        raise RehearsalError(f"{manifest}: expected the ServingRuntime {RUNTIME_NAME!r}")
    (container,) = runtime["spec"]["containers"]
    where = f"{manifest.name}: containers[{container['name']}]"
    name = container["image"].rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    if name != PLATFORM_IMAGE_NAME:
        raise RehearsalError(
            f"{where}: image {container['image']} is not the platform image ({PLATFORM_IMAGE_NAME})"
        )
    env = {}
    for variable in container.get("env", []):
        if "value" not in variable:
            raise RehearsalError(f"{where}: env {variable['name']} uses valueFrom, which is not rehearsed")
        env[variable["name"]] = str(variable["value"])
    volumes = {volume["name"]: volume for volume in runtime["spec"].get("volumes", [])}
    tmpfs = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None or "emptyDir" not in volume:
            raise RehearsalError(
                f"{where}: volume {mount['name']} is not an emptyDir; only emptyDirs are rehearsed"
            )
        tmpfs[mount["mountPath"]] = str((volume["emptyDir"] or {}).get("sizeLimit", ""))
    limits = container.get("resources", {}).get("limits", {})
    (port,) = [int(p["containerPort"]) for p in container.get("ports", [])]
    if not container.get("readinessProbe"):
        raise RehearsalError(f"{where}: no readinessProbe; the rehearsal waits for it")
    readiness = Probe.from_manifest(container["readinessProbe"], where)
    if readiness.port != port:  # only the container port is published
        raise RehearsalError(
            f"{where}: the readiness probe asks port {readiness.port}, the container has {port}"
        )
    context = container.get("securityContext", {})
    spec = ContainerSpec(
        image=platform_image,
        command=list(container.get("command", [])),
        args=[str(arg) for arg in container.get("args", [])],
        env=env,
        tmpfs=tmpfs,
        cpus=str(limits["cpu"]) if "cpu" in limits else None,
        memory=str(limits["memory"]) if "memory" in limits else None,
        workdir=container.get("workingDir"),
        **security(context, where),
    )
    return RuntimeContainer(spec, port, readiness, bool(context.get("runAsNonRoot")))


@dataclass
class Predictor:
    """A running predictor: the V2 endpoint on 127.0.0.1, and how long each step took."""

    url: str  # http://127.0.0.1:<port>, the runtime's 8080
    model_name: str  # the contract's name, which the runtime serves under
    container: str
    model_dir: Path  # the host side of /mnt/models
    podman: Podman
    download: Finished  # the storage initializer's exit code and output
    download_s: float
    ready_s: float  # container start to readiness probe success
    stopped: bool = field(default=False, init=False)

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"

    def logs(self) -> str:
        return self.podman.logs(self.container)

    def stop(self) -> None:
        """Stop the runtime (SIGTERM, as a pod's deletion does), remove it and its emptyDir."""
        if not self.stopped:
            self.podman.stop(self.container, grace_s=10)
            shutil.rmtree(self.model_dir, ignore_errors=True)
            self.stopped = True

    def __enter__(self) -> Predictor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def storage_initializer(
    image: str,
    storage_uri: str,
    model_dir: Path,
    s3: S3,
    *,
    user: int | None,
    group: int | None = None,
    seccomp: str = "RuntimeDefault",
    name: str | None = None,
) -> ContainerSpec:
    """KServe's storage-initializer init container: ``<storageUri> /mnt/models``, with the S3
    credentials KServe injects from the service account's secret, the pod's user and seccomp, and
    what Pod Security "restricted" (enforced by the namespace) demands of every container."""
    return ContainerSpec(
        image=image,
        args=[storage_uri, MODELS_PATH],
        env=s3.env(),
        user=user,
        group=group,
        cap_drop=("ALL",),
        no_new_privileges=True,
        seccomp=seccomp,
        mounts=(Mount(model_dir, MODELS_PATH, read_only=False),),
        cpus=STORAGE_INITIALIZER_LIMITS["cpu"],
        memory=STORAGE_INITIALIZER_LIMITS["memory"],
        network="host",  # S3 listens on 127.0.0.1
        name=name,
    )


def start_predictor(
    podman: Podman,
    *,
    storage_uri: str | None = None,
    platform_image: str,
    storage_initializer_image: str,
    s3: S3,
    work_dir: Path,
    predictor: Mapping[str, Any] | None = None,
    manifest: Path = SERVING_RUNTIME,
    timeout_s: float = 180.0,
) -> Predictor:
    """Download ``storage_uri`` with the storage initializer, start the runtime, wait until ready.

    ``predictor`` is optionally the InferenceService's ``spec.predictor`` (see
    ``handoff.kube.inference_service.predictor_spec``): its ``model.storageUri`` is the default
    ``storage_uri``, its pod securityContext applies to both containers, and its model's resources
    and securityContext override the runtime's, as KServe merges them. Without it, the pod runs
    as the runtime's container says. The caller stops the predictor (``with`` or ``stop()``).
    """
    runtime = load_runtime(platform_image, manifest)
    spec, pod_security = _merge_predictor(runtime, predictor or {}, manifest)
    storage_uri = storage_uri or (predictor or {}).get("model", {}).get("storageUri")
    if not storage_uri or not storage_uri.startswith("s3://"):
        raise RehearsalError(f"storageUri {storage_uri!r}: the rehearsal's storage is S3 (s3://bucket/key)")
    suffix = uuid.uuid4().hex[:8]
    model_dir = work_dir / f"mnt-models-{suffix}"
    model_dir.mkdir(parents=True)
    model_dir.chmod(0o777)  # an emptyDir: writable by whichever uid the pod runs as

    started = time.monotonic()
    initializer = storage_initializer(
        storage_initializer_image,
        storage_uri,
        model_dir,
        s3,
        user=pod_security.get("user", spec.user),
        group=pod_security.get("group"),
        seccomp=pod_security.get("seccomp", "RuntimeDefault"),
        name=f"rehearsal-storage-initializer-{suffix}",
    )
    download = podman.run(initializer, timeout_s=timeout_s)
    download_s = time.monotonic() - started
    if download.exit_code != 0:
        raise RehearsalError(
            f"the storage initializer could not download {storage_uri} (exit {download.exit_code}):\n"
            f"{download.stdout[-2000:]}{download.stderr[-3000:]}"
        )

    from handoff.contract import load_contract

    model_name = load_contract(model_dir).name  # as the runtime's prologue does
    host_port = free_port()
    served = replace(
        spec,
        mounts=(*spec.mounts, Mount(model_dir, MODELS_PATH, read_only=True)),
        network="bridge",
        ports={runtime.container_port: host_port},
        name=f"rehearsal-predictor-{suffix}",
    )
    started = time.monotonic()
    container = podman.start(served)
    result = Predictor(
        url=f"http://127.0.0.1:{host_port}",
        model_name=model_name,
        container=container,
        model_dir=model_dir,
        podman=podman,
        download=download,
        download_s=download_s,
        ready_s=0.0,
    )
    try:
        _wait_ready(result, runtime, timeout_s)
    except BaseException:
        result.stop()
        raise
    result.ready_s = time.monotonic() - started
    return result


def _merge_predictor(
    runtime: RuntimeContainer, predictor: Mapping[str, Any], manifest: Path
) -> tuple[ContainerSpec, dict[str, Any]]:
    """The runtime container with the InferenceService's overrides; the pod-level security fields."""
    model = predictor.get("model", {})
    name = model.get("runtime", RUNTIME_NAME)
    if name != RUNTIME_NAME:
        raise RehearsalError(f"the predictor uses runtime {name!r}; only {RUNTIME_NAME!r} is rehearsed")
    pod = predictor.get("securityContext", {})
    pod_fields = security(pod, "predictor.securityContext")
    fields = dict(runtime.spec.__dict__)
    # Pod-level settings apply where the container sets nothing (Kubernetes' precedence) ...
    defaults = {"user": None, "group": None, "seccomp": "RuntimeDefault"}
    for key, value in pod_fields.items():
        if key in defaults and fields.get(key) == defaults[key]:
            fields[key] = value
    # ... and KServe merges the InferenceService's model container over the runtime's.
    model_context = model.get("securityContext", {})
    fields.update(security(model_context, "predictor.model.securityContext"))
    env = dict(fields["env"])  # KServe merges env by name, the InferenceService's value winning
    for variable in model.get("env", []):
        if "value" not in variable:
            raise RehearsalError(
                f"predictor.model: env {variable['name']} uses valueFrom, which is not rehearsed"
            )
        env[variable["name"]] = str(variable["value"])
    fields["env"] = env
    limits = model.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        fields["cpus"] = str(limits["cpu"])
    if "memory" in limits:
        fields["memory"] = str(limits["memory"])
    non_root = runtime.run_as_non_root or pod.get("runAsNonRoot") or model_context.get("runAsNonRoot")
    if non_root and fields.get("user") in (None, 0):
        # The kubelet would refuse to start it; say so rather than run it as the image's user.
        raise RehearsalError(f"{manifest.name}: runAsNonRoot is set, but no non-zero runAsUser is")
    return ContainerSpec(**fields), pod_fields


def _wait_ready(predictor: Predictor, runtime: RuntimeContainer, timeout_s: float) -> None:
    """Until the readiness probe's URL answers 200; fail at once if the container exits.

    Polled faster than the probe's periodSeconds so the measured start-to-ready is the server's
    own time, not the kubelet's cadence; the deadline is ``timeout_s`` (a pod that never becomes
    ready is never sent traffic, which a test reads as a failure).
    """
    probe = runtime.readiness
    time.sleep(probe.initial_delay_s)
    url = f"{predictor.url}{probe.path}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_status(url, timeout_s=2) == 200:
            return
        if not predictor.podman.running(predictor.container):
            raise RehearsalError(
                f"the {RUNTIME_NAME} container exited before {probe.path} answered 200; its output:\n"
                f"{predictor.logs()[-4000:]}"
            )
        time.sleep(0.2)
    raise RehearsalError(
        f"{url} did not answer 200 within {timeout_s:.0f} s; the {RUNTIME_NAME} container's output:\n"
        f"{predictor.logs()[-4000:]}"
    )
