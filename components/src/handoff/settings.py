"""Platform settings of a project (``handoff.yaml``): where things run, not what the model is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from handoff.k8s_names import Dns1123Label
from handoff.yaml_files import FieldError, StrictModel, load_yaml_model

SETTINGS_FILE = "handoff.yaml"
# The image a compiled pipeline runs in, set on its multi-node train step: the job's nodes run it
# instead of handoff.yaml's ``image`` (a tag), so a pipeline compiled against a digest stays on it.
IMAGE_ENV = "HANDOFF_IMAGE"
# Where the project image keeps the project's files (its Dockerfile's WORKDIR): the pipeline's
# `project_dir` on a cluster.
PROJECT_DIR_IN_IMAGE = "/app"


class MlflowSettings(StrictModel):
    # A relative sqlite path is resolved against the project folder, so every step and the
    # researcher's own `mlflow ui` see the same registry whatever their working directory.
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = Field(min_length=1)


class ServingSettings(StrictModel):
    host: str = "127.0.0.1"
    # 0 picks a free port; the chosen one is printed and written to the run summary.
    port: int = Field(default=8080, ge=0, le=65535)
    ready_timeout_s: float = Field(default=60, gt=0)


# A Kubernetes resource quantity ("500m", "2", "16Gi"), checked here rather than by the API server.
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")]


class Toleration(StrictModel):
    """A pod toleration, e.g. for the taint a cloud puts on its GPU node pools."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class JobSettings(StrictModel):
    """How a multi-node train step runs: as a training-operator job the step launches and waits for."""

    # trainjob: Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1); pytorchjob: the legacy
    # training-operator v1 (kubeflow.org/v1) for clusters that have not moved yet.
    api: Literal["trainjob", "pytorchjob"] = "trainjob"
    # The ClusterTrainingRuntime a TrainJob references (Trainer ships torch-distributed).
    runtime: Dns1123Label = "torch-distributed"
    # A ReadWriteMany PersistentVolumeClaim mounted by the train step and by every node: the
    # nodes write checkpoints and the trained model there, and a retried job resumes from them.
    workspace_claim: Dns1123Label | None = None
    # Give up (and delete the job) after this long.
    timeout_s: int = Field(default=24 * 3600, gt=0)


class TrainingSettings(StrictModel):
    # Overrides applied to model.py's Config (field name -> value) for pipeline runs.
    overrides: dict[str, object] = Field(default_factory=dict)
    # Nodes × GPUs per node. nodes > 1 runs training as a job of its own (see `job`); one node
    # stays a plain pipeline step.
    nodes: int = Field(default=1, ge=1)
    gpus: int = Field(default=0, ge=0)
    # Per node (or for the single-node step): requests, also used as limits.
    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    # Where GPU nodes are: e.g. {cloud.google.com/gke-accelerator: nvidia-l4}, and their taints.
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    job: JobSettings = JobSettings()
    # Resumable state every N optimizer steps (and at every epoch end); 0 = epoch ends only.
    checkpoint_every_steps: int = Field(default=50, ge=0)
    # bf16 (or fp16 + loss scaling) autocast on GPUs; CPUs always train in fp32.
    mixed_precision: bool = True
    # torch.compile the model (GPU runs of minutes and more; compiling costs tens of seconds).
    compile: bool = False
    # channels-last memory format: faster convolutions on GPUs with tensor cores.
    channels_last: bool = False

    @model_validator(mode="after")
    def _multi_node_needs_a_workspace(self) -> TrainingSettings:
        if self.nodes > 1 and self.job.workspace_claim is None:
            raise FieldError(
                ("job", "workspace_claim"),
                f"training on {self.nodes} nodes needs a ReadWriteMany PersistentVolumeClaim shared by "
                "the train step and the nodes: set training.job.workspace_claim to its name",
            )
        return self

    @property
    def distributed_job(self) -> bool:
        """Whether the train step launches a training-operator job instead of training itself."""
        return self.nodes > 1


class Settings(StrictModel):
    project: Dns1123Label
    template_version: str
    orchestrator: str = Field(pattern=r"^(kfp|argo|both)$")
    image: str = Field(min_length=1)
    namespace: Dns1123Label
    mlflow: MlflowSettings
    serving: ServingSettings = ServingSettings()
    training: TrainingSettings = TrainingSettings()

    def tracking_uri(self, project_dir: Path) -> str:
        """The MLflow tracking URI with a relative sqlite path made absolute under the project."""
        uri = self.mlflow.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str((project_dir / uri[len(prefix) :]).resolve())
        return uri


def load_settings(project_dir: Path) -> Settings:
    return load_yaml_model(project_dir / SETTINGS_FILE, Settings)
