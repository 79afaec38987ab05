"""The one pipeline graph: train → export → evaluate → register → deploy (if the gate passed).

``build_pipeline`` binds the wrappers to the project's image, so the same graph compiles for a
cluster and runs under kfp.local, where the image is not used and the steps run in this Python.

KFP reads the pipeline's annotations at definition time, so this module keeps them as real types
(no ``from __future__ import annotations``).
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl, kubernetes

from handoff import __version__
from handoff.settings import IMAGE_ENV, TrainingSettings
from handoff_pipelines import PIPELINE_NAME, STEPS, components

# handoff.kube.train_job.WORKSPACE; kept as a literal so building the graph does not import the
# kubernetes client (a test checks the two agree).
WORKSPACE_MOUNT = "/workspace"


def place_training(task: Any, training: TrainingSettings, image: str) -> None:
    """Where the train step runs on a cluster, from handoff.yaml's ``training``.

    One node: the step trains in its own pod, so it gets the CPUs, memory, GPUs, node selector
    and tolerations. More: the step only launches and watches the job (which gets them), mounts
    the ReadWriteMany volume it shares with the job's nodes at ``WORKSPACE_MOUNT``, and passes
    its own image (``IMAGE_ENV``) so the nodes run the very build the pipeline was compiled for
    (by digest from CI), not the tag in the image's handoff.yaml.
    """
    if training.distributed_job:
        kubernetes.mount_pvc(task, pvc_name=training.job.workspace_claim or "", mount_path=WORKSPACE_MOUNT)
        task.set_env_variable(name=IMAGE_ENV, value=image)
        return
    task.set_cpu_request(training.cpu).set_cpu_limit(training.cpu)
    task.set_memory_request(training.memory).set_memory_limit(training.memory)
    if training.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(training.gpus)
    for key, value in sorted(training.node_selector.items()):
        kubernetes.add_node_selector(task, key, value)
    for toleration in training.tolerations:
        kubernetes.add_toleration(task, **toleration.model_dump(exclude_none=True))


def build_pipeline(
    image: str,
    training: TrainingSettings | None = None,
    contract_sha256: str = "",
    pod_labels: dict[str, str] | None = None,
) -> Callable[..., Any]:
    """The KFP pipeline for a project whose steps run in ``image``.

    ``training`` places the train step on a cluster (see ``place_training``) and ``pod_labels``
    go on every step's pod; local runs leave both out: kfp.local runs every step in this Python,
    with no pods. ``contract_sha256`` and the template version go into the description, so a
    changed contract.yaml or template shows in the compiled pipeline's diff.
    """
    description = f"Train, export, evaluate, register and deploy model.py (ml-template {__version__})."
    if contract_sha256:
        description += f" contract.yaml sha256 {contract_sha256}."

    def on_pods(task: Any) -> Any:
        for key, value in sorted((pod_labels or {}).items()):
            kubernetes.add_pod_label(task, key, value)
        return task

    def component(function: Callable[..., Any]) -> Any:
        # install_kfp_package=False: the image (and a local venv) already has kfp and handoff;
        # installing at run time would make every step slower and less reproducible.
        return dsl.component(function, base_image=image, install_kfp_package=False)

    train, export, evaluate, register, deploy = (component(getattr(components, s)) for s in STEPS)

    @dsl.pipeline(name=PIPELINE_NAME, description=description)
    def handoff(project_dir: str) -> None:
        # The run's id names a multi-node training job, so a retried step re-attaches to it.
        trained = on_pods(train(project_dir=project_dir, run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
        if training is not None:
            place_training(trained, training, image)
        exported = on_pods(export(project_dir=project_dir, checkpoint=trained.outputs["checkpoint"]))
        evaluated = on_pods(
            evaluate(
                project_dir=project_dir,
                onnx_model=exported.outputs["onnx_model"],
                training=trained.outputs["record"],
            )
        )
        registered = on_pods(
            register(
                project_dir=project_dir,
                onnx_model=exported.outputs["onnx_model"],
                evaluation=evaluated.outputs["record"],
                report=evaluated.outputs["report"],
                training=trained.outputs["record"],
            )
        )
        with dsl.If(evaluated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
            on_pods(deploy(project_dir=project_dir, registration=registered.outputs["record"]))

    return handoff
