"""The pipeline graph for Argo Workflows: a WorkflowTemplate built with hera from ``graph.cluster_plan``.

Every step is a container template in the project image that runs ``python -m handoff <step>``,
the command a researcher runs by hand; nothing is installed at run time. Steps hand files on as
Argo artifacts, kept in the namespace's default artifact repository (the workflow controller's
``artifactRepository``, or the namespace's ``artifact-repositories`` ConfigMap): each step is its
own pod, so the train pod can sit on a GPU node and the others anywhere, a retried step fetches
its inputs again, and every model, report and record can be downloaded from the Argo UI. A
shared volume would tie the pods to one node (ReadWriteOnce) or need ReadWriteMany storage.

Small values travel as parameters read from the steps' records with ``jsonpath``: the MLflow run
of the training, and the version register registered and whether it promoted it to champion.
Argo's ``when`` takes only simple tags (expression tags there are unsupported and fail at random),
so the promotion crosses into a one-step template as a parameter, and its ``when`` tests that:
deploy runs only for the version this run promoted (a failed gate, or another run's promotion
meanwhile, leaves it unpromoted).
The exit handler prints how the run ended and writes it as its pod's termination message; each
failed step records its own error there too, which Argo shows as the failed node's message.

Nothing is cached (no ``memoize``): every run trains, as on KFP, whose train step takes the run's
id. Here the train step's ``--run-key`` is the workflow's uid (the same for every retry of the
step and for ``argo retry``): a retried train pod, on a new disk, resumes from the state the
earlier attempt stored in its MLflow run (or on ``training.job.workspace_claim``, mounted then).
Pods run as the image's non-root user with a read-only root filesystem, scratch space in
emptyDirs, no privilege escalation, no capabilities and the runtime's seccomp profile: what the
namespace's Pod Security "restricted" level admits. Argo's own init and wait containers take
their security context from the workflow controller's ``executor`` configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hera.workflows import (
    DAG,
    Artifact,
    Container,
    Env,
    Parameter,
    Resources,
    RetryStrategy,
    SecretEnv,
    Step,
    Steps,
    Task,
    WorkflowTemplate,
)
from hera.workflows import models as m

from handoff.errors import HandoffError
from handoff.kube.images import pull_policy
from handoff.labels import labels
from handoff.project import Project
from handoff.settings import IMAGE_ENV, PROJECT_DIR_IN_IMAGE, SETTINGS_FILE, TRACKING_URI_ENV
from handoff_pipelines import PIPELINE_NAME, STEPS
from handoff_pipelines.graph import (
    RETRY_BACKOFF_FACTOR,
    RETRY_BACKOFF_S,
    RUN_AS_USER,
    SHM_VOLUME,
    TMP_VOLUME,
    WORKSPACE_MOUNT,
    StepPlan,
    cluster_plan,
    description,
)

EXIT_HANDLER = "outcome"
GATE_TEMPLATE = "deploy-if-promoted"
PROJECT_DIR = "project-dir"
# Pods go when the run succeeds; a failed run keeps them (and their logs) until the workflow goes:
# a day after success, a week after failure.
POD_GC = m.PodGC(strategy="OnWorkflowSuccess")
TTL = m.TTLStrategy(seconds_after_success=24 * 3600, seconds_after_failure=7 * 24 * 3600)
WORKSPACE_VOLUME = "workspace"  # training.job.workspace_claim, when handoff.yaml names one
IN, OUT = "/tmp/inputs", "/tmp/outputs"  # under the /tmp emptyDir: the root filesystem is read-only


@dataclass(frozen=True)
class Handed:
    """A file or folder one step writes and later steps read: its artifact name and file name."""

    name: str
    file: str

    @property
    def produced(self) -> str:
        return f"{OUT}/{self.file}"

    @property
    def consumed(self) -> str:
        return f"{IN}/{self.file}"


CHECKPOINT = Handed("checkpoint", "checkpoint.pt")
ONNX_MODEL = Handed("onnx-model", "onnx")
SERVED_MODEL = Handed("served-model", "optimized")  # optimize's chosen form, laid out as export's folder
EVALUATION = Handed("evaluation", "evaluation.json")
REPORT = Handed("report", "report")
# The records whose fields later steps take as parameters: each step writes its own file (``--record``),
# which the wait container reads after the step exits (``valueFrom.path``), as it does artifacts.
# Never the step's stdout (``outputs.result``): a line printed there by anything the step runs
# would break the JSON that deploy's parameters are read from.
RECORDS = {"train": f"{OUT}/train.json", "register": f"{OUT}/register.json"}

# What each step reads from earlier steps: artifacts (from which step) and parameters (an
# expression over earlier steps' outputs). Together with the arguments below, this is the CLI
# side of what components.py does for KFP.
CONSUMES: dict[str, list[tuple[Handed, str]]] = {
    "train": [],
    "export": [(CHECKPOINT, "train")],
    "optimize": [(ONNX_MODEL, "export")],
    "evaluate": [(SERVED_MODEL, "optimize")],
    "register": [(SERVED_MODEL, "optimize"), (EVALUATION, "evaluate"), (REPORT, "evaluate")],
    "deploy": [],
}
PRODUCES: dict[str, list[Handed]] = {
    "train": [CHECKPOINT],
    "export": [ONNX_MODEL],
    "optimize": [SERVED_MODEL],
    "evaluate": [EVALUATION, REPORT],
    "register": [],
    "deploy": [],
}
RUN_ID = "{{=jsonpath(tasks.train.outputs.parameters.record, '$.mlflow_run_id')}}"
PARAMETERS: dict[str, dict[str, str]] = {
    "train": {},
    "export": {},
    "optimize": {},
    "evaluate": {"run-id": RUN_ID},
    "register": {"run-id": RUN_ID},
    # Register's record names the version it registered and whether it promoted it.
    "deploy": {
        "promoted": "{{=jsonpath(tasks.register.outputs.parameters.record, '$.promoted')}}",
        "version": "{{=jsonpath(tasks.register.outputs.parameters.record, '$.version')}}",
    },
}


RUN_KEY = ["--run-key", "{{workflow.uid}}"]


def step_arguments(step: str) -> list[str]:
    """``python -m handoff <step>``'s options (see ``handoff <step> --help``)."""
    project = ["--project", f"{{{{workflow.parameters.{PROJECT_DIR}}}}}"]
    run_id = ["--run-id", "{{inputs.parameters.run-id}}"]
    return {
        # The workflow's uid is the same for every attempt (and `argo retry`) of a run and new
        # for every run: a retried train pod finds its run's state by it.
        "train": [*project, "--checkpoint", CHECKPOINT.produced, "--record", RECORDS["train"], *RUN_KEY],
        "export": [*project, "--checkpoint", CHECKPOINT.consumed, "--out", ONNX_MODEL.produced],
        "optimize": [*project, "--model-dir", ONNX_MODEL.consumed, "--out", SERVED_MODEL.produced],
        "evaluate": [
            *project,
            "--model-dir",
            SERVED_MODEL.consumed,
            "--out",
            EVALUATION.produced,
            "--report",
            REPORT.produced,
            *run_id,
        ],
        "register": [
            *project,
            "--model-dir",
            SERVED_MODEL.consumed,
            "--evaluation",
            EVALUATION.consumed,
            "--report",
            REPORT.consumed,
            *run_id,
            "--record",
            RECORDS["register"],
        ],
        "deploy": [*project, "--version", "{{inputs.parameters.version}}", "--champion-only"],
    }[step]


# The exit handler: one line saying how the run ended, in its log and as its pod's termination
# message (handoff.step_entry writes it). It never fails the workflow.
OUTCOME_PROGRAM = """\
import sys
from handoff.step_entry import write_termination_message
name, status, seconds = sys.argv[1:4]
line = f"handoff: workflow {name} {status} after {float(seconds):.0f} s"
print(line)
write_termination_message(line)
"""


def container_security() -> m.SecurityContext:
    return m.SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=m.Capabilities(drop=["ALL"]),
    )


def pod_security() -> m.PodSecurityContext:
    return m.PodSecurityContext(
        run_as_non_root=True,
        run_as_user=RUN_AS_USER,
        run_as_group=RUN_AS_USER,
        fs_group=RUN_AS_USER,
        seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
    )


def resources(cpu: str, memory: str, gpus: int = 0) -> Resources:
    return Resources(
        cpu_request=cpu,
        cpu_limit=cpu,
        memory_request=memory,
        memory_limit=memory,
        gpus=gpus or None,
    )


def mounts(step: StepPlan | None) -> list[m.VolumeMount]:
    found = [m.VolumeMount(name=TMP_VOLUME[0], mount_path=TMP_VOLUME[1])]
    if step is not None and step.shared_memory:
        found.append(m.VolumeMount(name=SHM_VOLUME[0], mount_path=SHM_VOLUME[1]))
    return found


def _workspace_mounts(project: Project, step: StepPlan) -> list[m.VolumeMount]:
    """training.job.workspace_claim, in the train step: its resumable state outlives the pod there."""
    if step.name != "train" or not project.settings.training.job.workspace_claim:
        return []
    return [m.VolumeMount(name=WORKSPACE_VOLUME, mount_path=WORKSPACE_MOUNT)]


def _retry(step: StepPlan, retries: int) -> RetryStrategy | None:
    if not (step.retry_window_s and retries):
        return None
    # Always: a preempted or evicted pod is an Argo "error", not a "failure", and must be retried too.
    return RetryStrategy(
        limit=retries,
        retry_policy="Always",
        backoff=m.Backoff(
            duration=f"{RETRY_BACKOFF_S}s",
            factor=m.IntOrString(RETRY_BACKOFF_FACTOR),
            max_duration=f"{step.retry_window_s}s",
        ),
    )


def env(project: Project) -> list[Env | SecretEnv]:
    cluster = project.settings.cluster
    # The image the step runs in, as compiled (a digest from CI): register records it (handoff.image).
    variables: list[Env | SecretEnv] = [Env(name=IMAGE_ENV, value=project.settings.image)]
    if cluster.mlflow_tracking_uri:
        variables.append(Env(name=TRACKING_URI_ENV, value=cluster.mlflow_tracking_uri))
    # Secret references: the values never enter the workflow, its parameters or the Argo UI.
    variables += [SecretEnv(name=s.name, secret_name=s.secret, secret_key=s.key) for s in cluster.secret_env]
    return variables


def _step_template(project: Project, step: StepPlan) -> Container:
    inputs: list[Artifact | Parameter] = [
        Artifact(name=handed.name, path=handed.consumed) for handed, _ in CONSUMES[step.name]
    ]
    inputs += [Parameter(name=name) for name in PARAMETERS[step.name] if name != "promoted"]
    outputs: list[Artifact | Parameter] = [
        Artifact(name=handed.name, path=handed.produced) for handed in PRODUCES[step.name]
    ]
    if step.name in RECORDS:
        outputs.append(Parameter(name="record", value_from=m.ValueFrom(path=RECORDS[step.name])))
    return Container(
        name=step.name,
        image=project.settings.image,
        image_pull_policy=pull_policy(project.settings.image),
        command=["python", "-m", "handoff", step.name],
        args=step_arguments(step.name),
        env=env(project),
        resources=resources(step.cpu, step.memory, step.gpus),
        security_context=container_security(),
        volume_mounts=mounts(step) + _workspace_mounts(project, step),
        node_selector=dict(step.node_selector) or None,
        tolerations=[m.Toleration(**t.model_dump(exclude_none=True)) for t in step.tolerations] or None,
        retry_strategy=_retry(step, project.settings.cluster.retries),
        active_deadline_seconds=step.deadline_s or None,  # one attempt's; the run's is the workflow's
        inputs=inputs or None,
        outputs=outputs or None,
    )


def _task_arguments(step: str) -> list[m.Artifact | Parameter]:
    artifacts = [
        m.Artifact(name=handed.name, from_=f"{{{{tasks.{source}.outputs.artifacts.{handed.name}}}}}")
        for handed, source in CONSUMES[step]
    ]
    return [*artifacts, *(Parameter(name=name, value=value) for name, value in PARAMETERS[step].items())]


def check_argo_target(project: Project) -> None:
    """Refuse what the Argo target cannot run, naming the setting."""
    nodes = project.settings.training.nodes
    if nodes > 1:
        raise HandoffError(
            f"{nodes} nodes train as a Kubeflow TrainJob that the Kubeflow Pipelines train step launches; "
            "the Argo WorkflowTemplate trains in one pod: compile with --target kfp (orchestrator: kfp), "
            "or set training.nodes to 1",
            file=project.root / SETTINGS_FILE,
            field="training.nodes",
        )


def workflow_template(project: Project) -> WorkflowTemplate:
    """The project's WorkflowTemplate, named after the project, in its namespace."""
    check_argo_target(project)
    settings = project.settings
    plan = cluster_plan(settings.training)
    assert tuple(step.name for step in plan) == STEPS
    volumes = [
        m.Volume(name=TMP_VOLUME[0], empty_dir=m.EmptyDirVolumeSource()),
        m.Volume(name=SHM_VOLUME[0], empty_dir=m.EmptyDirVolumeSource(medium="Memory")),
    ]
    if settings.training.job.workspace_claim:
        claim = m.PersistentVolumeClaimVolumeSource(claim_name=settings.training.job.workspace_claim)
        volumes.append(m.Volume(name=WORKSPACE_VOLUME, persistent_volume_claim=claim))
    with WorkflowTemplate(
        name=settings.project,
        namespace=settings.namespace,
        labels=labels(settings.project),
        annotations={"workflows.argoproj.io/description": description(project.contract.sha256)},
        entrypoint=PIPELINE_NAME,
        on_exit=EXIT_HANDLER,
        service_account_name=settings.cluster.service_account,
        arguments=[Parameter(name=PROJECT_DIR, value=PROJECT_DIR_IN_IMAGE)],
        pod_metadata=m.Metadata(labels=labels(settings.project)),
        security_context=pod_security(),
        volumes=volumes,
        active_deadline_seconds=settings.cluster.timeout_s,
        pod_gc=POD_GC,
        ttl_strategy=TTL,
    ) as template:
        # The graph first (templates are referenced by name), then what each node runs.
        with DAG(name=PIPELINE_NAME):
            for step in plan:
                Task(
                    name=step.name,
                    template=GATE_TEMPLATE if step.gated else step.name,
                    dependencies=list(step.after) or None,
                    arguments=_task_arguments(step.name) or None,
                )
        with Steps(name=GATE_TEMPLATE, inputs=[Parameter(name="promoted"), Parameter(name="version")]):
            Step(
                name="deploy",
                template="deploy",
                when="{{inputs.parameters.promoted}} == true",
                arguments=[Parameter(name="version", value="{{inputs.parameters.version}}")],
            )
        for step in plan:
            _step_template(project, step)
        exit_handler(settings.image)
    return template


def exit_handler(image: str) -> Container:
    """The workflow's onExit template (inside a WorkflowTemplate's context): one line saying how
    the run ended."""
    return Container(
        name=EXIT_HANDLER,
        image=image,
        image_pull_policy=pull_policy(image),
        command=["python", "-c", OUTCOME_PROGRAM],
        args=["{{workflow.name}}", "{{workflow.status}}", "{{workflow.duration}}"],
        resources=resources("100m", "256Mi"),
        security_context=container_security(),
        volume_mounts=mounts(None),
    )


def workflow_template_dict(project: Project) -> dict[str, Any]:
    """The WorkflowTemplate as the Argo server and ``kubectl`` take it."""
    return workflow_template(project).to_dict()
