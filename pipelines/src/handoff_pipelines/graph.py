"""The one pipeline graph: train → export → optimize → evaluate → register → deploy (if register promoted).

``cluster_plan`` is the graph as every engine runs it on a cluster: which step waits for which,
what each one asks for, which are retried and which must never come from a cache. The KFP
pipeline (``build_pipeline``, also run by kfp.local) and the Argo WorkflowTemplate
(``handoff_pipelines.argo``) both read it, so a change here changes both, and the tests hold each
compiled graph to it.

``build_pipeline`` binds the wrappers to the project's image, so the same graph compiles for a
cluster and runs under kfp.local, where the image is not used and the steps run in this Python.

KFP reads the pipeline's annotations at definition time, so this module keeps them as real types
(no ``from __future__ import annotations``).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from handoff import __version__
from handoff.contract import TaskType
from handoff.kube.images import pull_policy
from handoff.settings import IMAGE_ENV, TRACKING_URI_ENV, ClusterSettings, Toleration, TrainingSettings
from handoff_pipelines import PIPELINE_NAME, STEPS, components, regression_components

# handoff.kube.train_job.WORKSPACE and RUN_AS_USER; kept as literals so building the graph does
# not import the kubernetes client (a test checks they agree).
WORKSPACE_MOUNT = "/workspace"
RUN_AS_USER = 10001
# Retries start after 30 s, then 60 s, 120 s, ...: long enough for a node or an API to come back.
RETRY_BACKOFF_S = 30
RETRY_BACKOFF_FACTOR = 2
# How long after its first attempt a step may still be retried (KFP and Argo count from the first
# attempt's start). The train step's window is training.job.timeout_s: it may run for hours.
RETRY_WINDOW_S = 3600
# Scratch space (volume name, mount path): the pods' root filesystem is read-only (HOME is /tmp
# in the image), and torch's DataLoader workers share batches through /dev/shm.
TMP_VOLUME = ("tmp", "/tmp")
SHM_VOLUME = ("dshm", "/dev/shm")


@dataclass(frozen=True)
class StepPlan:
    """One step as every engine runs it on a cluster."""

    name: str
    after: tuple[str, ...]  # the steps whose outputs it reads (or whose gate it waits for)
    cpu: str  # requests = limits: a step's speed (and evaluate's latency numbers) must not vary
    memory: str
    retry_window_s: int  # 0: not safe to retry; else cluster.retries, within this many seconds
    side_effects: bool  # writes outside the pipeline (registry, serving): never served from a cache
    gated: bool = False  # runs only when register promoted the run's version to champion
    gpus: int = 0
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Toleration, ...] = ()
    shared_memory: bool = False  # a memory-backed /dev/shm
    # One attempt's deadline (the pod's activeDeadlineSeconds); 0: only the run's (cluster.timeout_s).
    deadline_s: int = 0


def cluster_plan(training: TrainingSettings) -> tuple[StepPlan, ...]:
    """The graph on a cluster, in step order (``handoff_pipelines.STEPS``).

    The train step gets handoff.yaml's ``training`` resources and placement when it trains in its
    own pod; with ``training.nodes > 1`` it only launches and watches the job (which gets them),
    so it asks for little. Retry-safe: train (a retried step re-attaches to its job), export,
    optimize and evaluate (pure), register (the same sha256 gives the same version). Deploy is not: it moves
    traffic and rolls back on its own.
    """
    if training.distributed_job:
        train = StepPlan(
            "train",
            (),
            "1",
            "2Gi",
            training.job.timeout_s,
            side_effects=False,
            deadline_s=training.job.timeout_s,
        )
    else:
        train = StepPlan(
            "train",
            (),
            training.cpu,
            training.memory,
            training.job.timeout_s,
            side_effects=False,
            gpus=training.gpus,
            node_selector=tuple(sorted(training.node_selector.items())),
            tolerations=tuple(training.tolerations),
            shared_memory=True,
            deadline_s=training.job.timeout_s,
        )
    return (
        train,
        StepPlan("export", ("train",), "1", "4Gi", RETRY_WINDOW_S, side_effects=False),
        # 2 CPUs, as evaluate: it times every candidate form the way evaluate times the chosen one.
        StepPlan("optimize", ("export",), "2", "4Gi", RETRY_WINDOW_S, side_effects=False),
        StepPlan("evaluate", ("train", "optimize"), "2", "4Gi", RETRY_WINDOW_S, side_effects=False),
        StepPlan(
            "register", ("train", "optimize", "evaluate"), "1", "2Gi", RETRY_WINDOW_S, side_effects=True
        ),
        StepPlan("deploy", ("register",), "1", "2Gi", 0, side_effects=True, gated=True),
    )


def description(contract_sha256: str) -> str:
    """What the compiled pipelines say they are; the contract's hash shows a changed contract in a diff."""
    text = f"Train, export, optimize, evaluate, register and deploy model.py (ml-template {__version__})."
    return text + (f" Contract sha256 {contract_sha256}." if contract_sha256 else "")


def place_training(task: Any, training: TrainingSettings) -> None:
    """What the train step needs from handoff.yaml's ``training`` beyond its plan.

    More than one node: the step only launches and watches the job and mounts the ReadWriteMany
    volume it shares with the job's nodes at ``WORKSPACE_MOUNT``. The job's nodes run the step's
    own image (``IMAGE_ENV``, which ``on_cluster`` sets on every step): the very build the pipeline
    was compiled for (by digest from CI), not the tag in the image's handoff.yaml. One node with a
    workspace claim mounts it too: its resumable state outlives the pod there (without one, it is
    kept in the MLflow run's artifacts). Settings refuse nodes > 1 without a claim.
    """
    claim = training.job.workspace_claim
    if claim is not None:
        kubernetes.mount_pvc(task, pvc_name=claim, mount_path=WORKSPACE_MOUNT)


def on_cluster(task: Any, step: StepPlan, cluster: ClusterSettings, image: str) -> None:
    """A KFP task in ``image`` as ``step`` and handoff.yaml's ``cluster`` say (kfp-kubernetes for
    pod settings).

    The pod and container security settings KFP v2 has no API for (seccomp, privilege
    escalation, capabilities, read-only root) come from the KFP backend and from the namespace's
    Pod Security "restricted" level, which rejects pods without them.
    """
    task.set_cpu_request(step.cpu).set_cpu_limit(step.cpu)
    task.set_memory_request(step.memory).set_memory_limit(step.memory)
    if step.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(step.gpus)
    for key, value in step.node_selector:
        kubernetes.add_node_selector(task, key, value)
    for toleration in step.tolerations:
        kubernetes.add_toleration(task, **toleration.model_dump(exclude_none=True))
    if step.retry_window_s and cluster.retries:
        task.set_retry(
            num_retries=cluster.retries,
            backoff_duration=f"{RETRY_BACKOFF_S}s",
            backoff_factor=float(RETRY_BACKOFF_FACTOR),
            backoff_max_duration=f"{step.retry_window_s}s",
        )
    # KFP has no run deadline: each step's pod gets its own, train's one attempt, the others the run's.
    kubernetes.set_timeout(task, step.deadline_s or cluster.timeout_s)
    if step.side_effects:
        # KFP would skip a step whose image, command and inputs it has seen before; these must
        # happen every time. The others may be cached: their key holds the image, and train's
        # inputs hold the run's id, so no run reuses another run's training (or what follows it).
        task.set_caching_options(enable_caching=False)
    # The image the step runs in, by the reference it was compiled with: register records it on the
    # version (handoff.image), a multi-node train step runs its job's nodes in it.
    task.set_env_variable(name=IMAGE_ENV, value=image)
    # A tag is resolved again at each start, a digest pulled once per node (handoff.kube.images).
    kubernetes.set_image_pull_policy(task, pull_policy(image))
    if cluster.mlflow_tracking_uri:
        task.set_env_variable(name=TRACKING_URI_ENV, value=cluster.mlflow_tracking_uri)
    for secret in cluster.secret_env:  # Secret references: the values never enter the pipeline
        kubernetes.use_secret_as_env(
            task, secret_name=secret.secret, secret_key_to_env={secret.key: secret.name}
        )
    kubernetes.set_security_context(
        task, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, run_as_non_root=True
    )
    kubernetes.empty_dir_mount(task, volume_name=TMP_VOLUME[0], mount_path=TMP_VOLUME[1])
    if step.shared_memory:
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME[0], mount_path=SHM_VOLUME[1], medium="Memory")


def pod_placer(
    plan: Sequence[StepPlan], image: str, pod_labels: dict[str, str] | None, cluster: ClusterSettings | None
) -> Callable[[Any, str], Any]:
    """``on_pods(task, step)``: the task's pod labelled with ``pod_labels`` and, with ``cluster``,
    placed as ``plan`` says for ``step`` (``on_cluster``); the task back, for chaining."""
    plans = {step.name: step for step in plan}

    def on_pods(task: Any, step: str) -> Any:
        for key, value in sorted((pod_labels or {}).items()):
            kubernetes.add_pod_label(task, key, value)
        if cluster is not None:
            on_cluster(task, plans[step], cluster, image)
        return task

    return on_pods


def component_maker(image: str) -> Callable[[Callable[..., Any]], Any]:
    """A KFP component of a plain function, run in ``image``."""

    def component(function: Callable[..., Any]) -> Any:
        # install_kfp_package=False: the image (and a local venv) already has kfp and handoff;
        # installing at run time would make every step slower and less reproducible.
        return dsl.component(function, base_image=image, install_kfp_package=False)

    return component


def build_pipeline(
    image: str,
    training: TrainingSettings | None = None,
    contract_sha256: str = "",
    pod_labels: dict[str, str] | None = None,
    cluster: ClusterSettings | None = None,
    task_type: TaskType = "classification",
) -> Callable[..., Any]:
    """The KFP pipeline for a project whose steps run in ``image``.

    ``training`` and ``cluster`` place every step on a cluster (``cluster_plan``, ``on_cluster``)
    and ``pod_labels`` go on every step's pod; local runs leave them out: kfp.local runs every
    step in this Python, with no pods, and ignores what it cannot apply. ``contract_sha256`` and
    the template version go into the description. ``task_type`` (the contract's) picks the
    wrappers: a regression project's evaluate step shows a residual plot where a classification
    project's shows its confusion matrix (``regression_components``).
    """
    on_pods = pod_placer(cluster_plan(training or TrainingSettings()), image, pod_labels, cluster)
    component = component_maker(image)

    wrappers = regression_components if task_type == "regression" else components

    def wrapper(step: str) -> Callable[..., Any]:
        return getattr(wrappers, step, None) or getattr(components, step)

    train, export, optimize, evaluate, register, deploy = (component(wrapper(s)) for s in STEPS)

    @dsl.pipeline(name=PIPELINE_NAME, description=description(contract_sha256))
    def handoff(project_dir: str) -> None:
        # The run's id names a multi-node training job, so a retried step re-attaches to it.
        trained = on_pods(train(project_dir=project_dir, run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "train")
        if training is not None:
            place_training(trained, training)
        exported = on_pods(
            export(project_dir=project_dir, checkpoint=trained.outputs["checkpoint"]), "export"
        )
        optimized = on_pods(
            optimize(project_dir=project_dir, onnx_model=exported.outputs["onnx_model"]), "optimize"
        )
        evaluated = on_pods(
            evaluate(
                project_dir=project_dir,
                onnx_model=optimized.outputs["served_model"],
                training=trained.outputs["record"],
            ),
            "evaluate",
        )
        registered = on_pods(
            register(
                project_dir=project_dir,
                onnx_model=optimized.outputs["served_model"],
                evaluation=evaluated.outputs["record"],
                report=evaluated.outputs["report"],
                training=trained.outputs["record"],
            ),
            "register",
        )
        # Register promotes only when the gate passed and no other run promoted meanwhile: what it
        # promoted is what is deployed.
        with dsl.If(registered.outputs["Output"] == True, name="promoted"):  # noqa: E712
            on_pods(deploy(project_dir=project_dir, registration=registered.outputs["record"]), "deploy")

    return handoff
