"""Run a KFP pipeline with kfp.local's own ``DockerRunner``, every step a podman container set up as
its pod would be.

kfp.local is KFP's engine here: it walks the compiled graph (conditions, retries, artifact
passing) and hands each step to ``kfp.local.docker_task_handler.run_docker_container`` through the
``docker`` SDK, which talks to podman's Docker-compatible API (``Podman.service()``). For the
duration of a run that one function is replaced (``_docker_steps``, restored afterwards) with a
version that runs the same container the way a cluster would, because kfp.local's own:

* runs containers with ``auto_remove=True``: podman answers the SDK's calls on a removed container
  with 500 "no such container" (Docker: 404), which kfp.local does not catch, and it reads a
  container that vanished as exit 0, so a failed step would be logged as SUCCESS. Here containers
  are kept until ``wait()`` has given the exit status, then removed;
* ignores what KFP's backend and the namespace give a pod: the kfp-kubernetes settings
  (``use_secret_as_env``, ``empty_dir_mount``, ``set_security_context``), the step's CPU and
  memory limits, and the pod security (uid 10001, read-only root, no capabilities, no privilege
  escalation). Here they are read from the compiled pipeline (IR and platform spec) and applied.

Environment, as a pod gets it: the task's env (``set_env_variable``), the values of its Secret
references (from the ``secrets`` the caller passes; a missing Secret or key fails the step before
its container starts, as Kubernetes' CreateContainerConfigError does) and ``extra_env``, what the
cluster adds around the pipeline (KUBERNETES_SERVICE_HOST/PORT, MLFLOW_S3_ENDPOINT_URL, ...).

    with podman.service() as docker_host:
        run = run_pipeline(pipeline, {"project_dir": "/app"}, docker_host=docker_host,
                           pipeline_root=tmp / "root", secrets={"mlflow": {"token": "..."}})
    assert run.status == "SUCCESS", run.log
"""

from __future__ import annotations

import codecs
import contextlib
import io
import itertools
import json
import os
import re
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from google.protobuf import json_format

from .containers import Mount
from .podman import bytes_flag, quantity

if TYPE_CHECKING:
    import docker

    from handoff.project import Project

SUCCESS, FAILURE = "SUCCESS", "FAILURE"
# The uid/gid every project step runs as (graph.RUN_AS_USER, set with kfp-kubernetes); a task whose
# platform spec names no security context gets it too, as the namespace's policy would demand.
DEFAULT_USER = "10001:10001"
# A step whose container runs longer than this is killed and reported as failed.
STEP_TIMEOUT_S = 3600.0
# emptyDir-like scratch: writable and executable (a lightweight component writes its module to
# a mktemp folder and imports it), and empty (podman would copy the image's files in otherwise).
SCRATCH_OPTIONS = "rw,exec,nosuid,nodev,notmpcopyup"
# Every KFP Python component starts with `mktemp -d`: it cannot start without a writable /tmp, and
# every project step declares one (graph.TMP_VOLUME); the rehearsal gives it to every step.
ALWAYS_SCRATCH = ("/tmp",)
# Over the Docker API podman mounts writable tmpfs on these under a read-only root (its CLI's
# --read-only-tmpfs, which the API cannot turn off); a pod's root has none. Read-only tmpfs in
# their place, filled from the image (tmpcopyup), leave them as the image has them, unwritable.
PODMAN_READ_ONLY_TMPFS = ("/run", "/var/tmp")
LABEL = "handoff-rehearsal.kfp-run"  # on every container a run starts: `podman ps -a --filter label=...`
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PIPELINE_STATUS = re.compile(r"Pipeline \S+ finished with status (SUCCESS|FAILURE)")


class StepConfigError(RuntimeError):
    """A step's container could not be configured (its pod would not start); the message says why."""


@dataclass(frozen=True)
class ContainerRun:
    """One container a run started, as podman reported it (``inspect``) before it was removed."""

    task: str
    name: str
    image: str
    command: tuple[str, ...]
    user: str
    read_only: bool
    cap_drop: tuple[str, ...]
    security_opt: tuple[str, ...]
    tmpfs: Mapping[str, str]
    nano_cpus: int
    memory: int  # bytes; 0: no limit
    network_mode: str
    env_keys: tuple[str, ...]  # names only: values may be secrets
    mounts: tuple[str, ...]  # destinations of the bind mounts
    exit_code: int
    timed_out: bool


@dataclass
class TaskRun:
    """What one task did: its status, its output artifacts (name -> path) and its own output."""

    name: str
    status: str  # SUCCESS or FAILURE (tasks that never ran are not listed)
    exit_code: int | None  # None: its container never started (the reason is in ``error``)
    outputs: dict[str, Path] = field(default_factory=dict)
    log: str = ""
    error: str | None = None
    attempts: int = 1  # more than one: kfp.local retried it (the task's retry policy)


@dataclass
class KfpRun:
    """A pipeline run: the pipeline's status, each task's, their ``record`` artifacts and the log."""

    status: str  # SUCCESS or FAILURE, as kfp.local ended the pipeline
    tasks: dict[str, TaskRun]
    records: dict[str, dict[str, Any]]  # task -> its JSON `record` output artifact, where it wrote one
    log: str  # kfp.local's log with every container's output, in order
    pipeline_root: Path
    containers: list[ContainerRun]
    run_id: str  # the value of LABEL on this run's containers


# -- what the compiled pipeline asks of each step -------------------------------------------------


@dataclass(frozen=True)
class StepConfig:
    """One executor's pod settings, from the pipeline's IR and kfp-kubernetes platform spec."""

    env: Mapping[str, str]  # from its Secret references: env name -> value
    missing: tuple[str, ...]  # Secret references that cannot be resolved (the step must fail)
    user: str
    tmpfs: Mapping[str, str]
    nano_cpus: int | None
    mem_limit: int | None


def _executor_label(pipeline_spec: dict[str, Any], task: str) -> str:
    # kfp.local names a task's folder after its component ("comp-<task>" -> "<task>").
    component = pipeline_spec.get("components", {}).get(f"comp-{task}")
    if component is None or "executorLabel" not in component:
        raise StepConfigError(f"the compiled pipeline has no component comp-{task} with an executor")
    return str(component["executorLabel"])


def step_config(
    pipeline_spec: dict[str, Any],
    platform_spec: dict[str, Any],
    task: str,
    secrets: Mapping[str, Mapping[str, str]],
    default_user: str = DEFAULT_USER,
) -> StepConfig:
    """What a cluster would give ``task``'s container beyond its image, command and env."""
    label = _executor_label(pipeline_spec, task)
    executor = pipeline_spec["deploymentSpec"]["executors"][label]
    kube = platform_spec.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
    pod = kube.get("executors", {}).get(label, {})

    env: dict[str, str] = {}
    missing: list[str] = []
    for reference in pod.get("secretAsEnv", []):
        name = reference.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant")
        name = name or reference.get("secretName")
        if not name:
            raise StepConfigError(f"task {task}: a Secret named by a pipeline parameter cannot be rehearsed")
        for key_to_env in reference.get("keyToEnv", []):
            key, variable = key_to_env["secretKey"], key_to_env["envVar"]
            if name not in secrets:
                if not reference.get("optional"):
                    missing.append(f'secret "{name}" not found (for {variable})')
            elif key not in secrets[name]:
                if not reference.get("optional"):
                    missing.append(f'couldn\'t find key {key} in Secret "{name}" (for {variable})')
            else:
                env[variable] = secrets[name][key]

    context = pod.get("securityContext", {})
    user = default_user
    if "runAsUser" in context:
        user = str(context["runAsUser"]) + (f":{context['runAsGroup']}" if "runAsGroup" in context else "")

    resources = executor.get("container", {}).get("resources", {})
    cpu, memory = resources.get("resourceCpuLimit"), resources.get("resourceMemoryLimit")
    nano_cpus = int(quantity(cpu) * 1_000_000_000) if cpu else None
    mem_limit = int(quantity(memory)) if memory else None

    tmpfs = dict.fromkeys(ALWAYS_SCRATCH, SCRATCH_OPTIONS)
    for volume in pod.get("emptyDirMounts", []):
        options = SCRATCH_OPTIONS
        # A memory-backed emptyDir without sizeLimit may grow to the pod's memory limit.
        size = volume.get("sizeLimit") or (memory if volume.get("medium") == "Memory" else None)
        if size:
            options += f",size={bytes_flag(size)}"
        tmpfs[volume["mountPath"]] = options
    for path in PODMAN_READ_ONLY_TMPFS:
        tmpfs.setdefault(path, "ro")
    return StepConfig(env, tuple(missing), user, tmpfs, nano_cpus, mem_limit)


def _task_env_names(pipeline_spec: dict[str, Any]) -> dict[str, str]:
    """Every env name a task sets in the IR -> the executor that sets it."""
    executors = pipeline_spec.get("deploymentSpec", {}).get("executors", {})
    return {
        variable["name"]: label
        for label, executor in executors.items()
        for variable in executor.get("container", {}).get("env", [])
    }


# -- the replacement for kfp.local's run_docker_container ----------------------------------------


def _executor_input(command: Sequence[str]) -> dict[str, Any]:
    """The ``--executor_input`` JSON kfp.local filled into a Python component's command."""
    for flag, value in itertools.pairwise(command):
        if flag == "--executor_input":
            parsed: dict[str, Any] = json.loads(value)
            return parsed
    raise StepConfigError("only Python components (with --executor_input) can be rehearsed")


def _output_paths(executor_input: dict[str, Any]) -> dict[str, Path]:
    artifacts = executor_input.get("outputs", {}).get("artifacts", {})
    return {name: Path(spec["artifacts"][0]["uri"]) for name, spec in artifacts.items() if spec["artifacts"]}


@dataclass
class _Steps:
    """State shared by the replaced run_docker_container during one run (tasks may run in threads)."""

    pipeline_spec: dict[str, Any]
    platform_spec: dict[str, Any]
    secrets: Mapping[str, Mapping[str, str]]
    extra_env: Mapping[str, str]
    extra_mounts: Sequence[Mount]
    user: str  # for tasks whose platform spec names no security context
    network_mode: str
    step_timeout_s: float
    run_id: str
    tasks: dict[str, TaskRun] = field(default_factory=dict)
    containers: list[ContainerRun] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_docker_container(
        self,
        client: docker.DockerClient,
        image: str,
        command: list[str],
        volumes: dict[str, Any],
        **container_run_args: Any,
    ) -> int:
        """kfp.local's run_docker_container (same image check, logs, exit status) as a pod runs it."""
        from kfp.local import docker_task_handler

        executor_input = _executor_input(command)
        task = Path(executor_input["outputs"]["outputFile"]).parent.name
        with self.lock:
            previous = self.tasks.get(task)
            record = TaskRun(task, FAILURE, None, _output_paths(executor_input))
            record.attempts = previous.attempts + 1 if previous else 1
            self.tasks[task] = record
        try:
            config = step_config(self.pipeline_spec, self.platform_spec, task, self.secrets, self.user)
            if config.missing:
                raise StepConfigError(f"CreateContainerConfigError: {'; '.join(config.missing)}")
        except StepConfigError as error:
            record.error = str(error)
            print(f"task {task}: {error}")
            return 1

        image = docker_task_handler.add_latest_tag_if_not_present(image=image)
        known = (
            ref for found in client.images.list() for ref in found.tags + found.attrs.get("RepoDigests", [])
        )
        if image not in known:
            # No registry is reachable: a pull could only fail, later and less clearly.
            record.error = f"ErrImageNeverPull: image {image!r} is not in podman's storage"
            print(f"task {task}: {record.error}")
            return 1
        print(f"Found image {image!r}\n")

        task_env = dict(container_run_args.pop("environment", None) or {})
        mounts = dict(volumes)
        for mount in self.extra_mounts:
            mounts[str(mount.source)] = {"bind": mount.target, "mode": "ro" if mount.read_only else "rw"}
        name = f"kfp-{task}-{self.run_id}-{record.attempts}"
        container = client.containers.run(
            image=image,
            command=command,
            name=name,
            detach=True,
            stdout=True,
            stderr=True,
            volumes=mounts,
            auto_remove=False,  # see the module docstring: removed below, after wait()
            environment={**self.extra_env, **task_env, **config.env},
            user=config.user,
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            tmpfs=dict(config.tmpfs),
            network_mode=self.network_mode,
            labels={LABEL: self.run_id, f"{LABEL}.task": task},
            **({"nano_cpus": config.nano_cpus} if config.nano_cpus else {}),
            **({"mem_limit": config.mem_limit} if config.mem_limit else {}),
            **container_run_args,
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(Exception):
                container.kill()

        watchdog = threading.Timer(self.step_timeout_s, kill)
        watchdog.start()
        try:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            output = []
            for chunk in container.logs(stream=True, follow=True):
                text = decoder.decode(chunk)
                output.append(text)
                print(text, end="")
            exit_code = int(container.wait()["StatusCode"])
            container.reload()
            attrs = container.attrs
        finally:
            watchdog.cancel()
            container.remove(force=True)
        record.log = "".join(output)
        record.exit_code = exit_code
        if timed_out.is_set():
            record.error = f"killed after {self.step_timeout_s:.0f} s"
            print(f"task {task}: {record.error}")
            exit_code = exit_code or 137
        record.status = SUCCESS if exit_code == 0 else FAILURE
        host = attrs["HostConfig"]
        environment = attrs["Config"].get("Env") or []
        with self.lock:
            self.containers.append(
                ContainerRun(
                    task=task,
                    name=name,
                    image=image,
                    command=tuple(command),
                    user=attrs["Config"].get("User", ""),
                    read_only=bool(host.get("ReadonlyRootfs")),
                    cap_drop=tuple(host.get("CapDrop") or ()),
                    security_opt=tuple(host.get("SecurityOpt") or ()),
                    tmpfs=dict(host.get("Tmpfs") or {}),
                    nano_cpus=int(host.get("NanoCpus") or 0),
                    memory=int(host.get("Memory") or 0),
                    network_mode=str(host.get("NetworkMode", "")),
                    env_keys=tuple(sorted(variable.split("=", 1)[0] for variable in environment)),
                    mounts=tuple(sorted(mount["Destination"] for mount in attrs.get("Mounts") or ())),
                    exit_code=exit_code,
                    timed_out=timed_out.is_set(),
                )
            )
        return exit_code


# -- running --------------------------------------------------------------------------------------


class _Tee(io.TextIOBase):
    """Everything kfp.local prints (its log and the containers' output), kept and passed on."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.kept = io.StringIO()
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.kept.write(text)
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _kfp_local(steps: _Steps, docker_host: str, pipeline_root: Path) -> Iterator[None]:
    """kfp.local set up for this run, and put back as it was afterwards: DOCKER_HOST (read by
    ``docker.from_env()``), kfp.local's configuration, and its run_docker_container."""
    from kfp import local
    from kfp.local import config, docker_task_handler

    saved_host, saved_config = os.environ.get("DOCKER_HOST"), config.LocalExecutionConfig.instance
    original: Callable[..., int] = docker_task_handler.run_docker_container
    os.environ["DOCKER_HOST"] = docker_host
    docker_task_handler.run_docker_container = steps.run_docker_container
    try:
        local.init(runner=local.DockerRunner(), pipeline_root=str(pipeline_root), raise_on_error=False)
        with warnings.catch_warnings():
            # kfp.local says limits have no effect; here they do (step_config applies them).
            warnings.filterwarnings(
                "ignore",
                message=r"Task .*: settings \[(?:'(?:cpu|memory)_(?:limit|request)'(?:, )?)+\] have no",
            )
            yield
    finally:
        docker_task_handler.run_docker_container = original
        config.LocalExecutionConfig.instance = saved_config
        if saved_host is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved_host


def run_pipeline(
    pipeline: Any,
    arguments: Mapping[str, Any],
    *,
    docker_host: str,
    pipeline_root: Path,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
    extra_env: Mapping[str, str] | None = None,
    extra_mounts: Sequence[Mount] = (),
    default_user: str = DEFAULT_USER,
    network_mode: str = "host",  # the rehearsal's services listen on 127.0.0.1
    step_timeout_s: float = STEP_TIMEOUT_S,
) -> KfpRun:
    """Run ``pipeline`` (a ``@dsl.pipeline`` function) with kfp.local's DockerRunner over
    ``docker_host``; every step in its image as its pod would run (see the module docstring).

    ``secrets``: Secret name -> key -> value, for the tasks' ``use_secret_as_env`` references.
    ``extra_env`` may not name a variable a task sets itself: the rehearsal would then run
    something other than what was compiled (change the pipeline's settings instead).
    ``pipeline_root`` (absolute; created) is mounted read-write into every container at the same
    path, so it is made writable for the steps' uid.
    """
    pipeline_spec = json_format.MessageToDict(pipeline.pipeline_spec)
    platform_spec = json_format.MessageToDict(pipeline.platform_spec)
    clashes = sorted(set(extra_env or {}) & set(_task_env_names(pipeline_spec)))
    if clashes:
        raise ValueError(f"extra_env sets {', '.join(clashes)}, which the compiled pipeline's tasks set")
    pipeline_root = pipeline_root.resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    pipeline_root.chmod(0o777)  # the steps run as uid 10001, kfp.local as this user
    steps = _Steps(
        pipeline_spec=pipeline_spec,
        platform_spec=platform_spec,
        secrets=secrets or {},
        extra_env=dict(extra_env or {}),
        extra_mounts=tuple(extra_mounts),
        user=default_user,
        network_mode=network_mode,
        step_timeout_s=step_timeout_s,
        run_id=uuid.uuid4().hex[:10],
    )
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee), _kfp_local(steps, docker_host, pipeline_root):
        pipeline(**arguments)
    log = tee.kept.getvalue()
    ended = _PIPELINE_STATUS.findall(_ANSI.sub("", log))
    failed = any(task.status != SUCCESS for task in steps.tasks.values())
    status = FAILURE if failed or not ended or ended[-1] != SUCCESS else SUCCESS
    records = {
        task.name: json.loads(task.outputs["record"].read_text())
        for task in steps.tasks.values()
        if "record" in task.outputs and task.outputs["record"].is_file()
    }
    return KfpRun(status, steps.tasks, records, log, pipeline_root, steps.containers, steps.run_id)


def project_pipeline(project: Project, image: str) -> Any:
    """The project's KFP pipeline as ``handoff compile`` builds it (``compiled.compile_kfp``) for
    ``image``: its steps' resources, retries, Secret references, labels and security context."""
    from handoff.labels import labels
    from handoff_pipelines.graph import build_pipeline

    return build_pipeline(
        image=image,
        training=project.settings.training,
        contract_sha256=project.contract.sha256,
        pod_labels=labels(project.settings.project),
        cluster=project.settings.cluster,
        task_type=project.contract.task_type,
    )


def run_project(project: Project, image: str, **options: Any) -> KfpRun:
    """``run_pipeline`` for the project's pipeline in ``image``, ``project_dir`` where the image has
    the project (``handoff.settings.PROJECT_DIR_IN_IMAGE``); ``options`` as for ``run_pipeline``."""
    from handoff.settings import PROJECT_DIR_IN_IMAGE

    return run_pipeline(project_pipeline(project, image), {"project_dir": PROJECT_DIR_IN_IMAGE}, **options)
