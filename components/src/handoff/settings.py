"""Platform settings of a project (``handoff.yaml``): where things run, not what the model is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from handoff.k8s_names import Dns1123Label, InferenceServiceName
from handoff.yaml_files import FieldError, StrictModel, load_yaml_model

SETTINGS_FILE = "handoff.yaml"
# The MLflow a compiled pipeline's pods use (cluster.mlflow_tracking_uri). Not MLflow's own
# MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that one into the process environment, so
# it would carry one project's registry into the next project run by the same process.
TRACKING_URI_ENV = "HANDOFF_MLFLOW_TRACKING_URI"
# The image a compiled pipeline runs in, set on every step: register records it (``handoff.image``)
# and a multi-node train step runs its job's nodes in it instead of handoff.yaml's ``image`` (a
# tag), so a pipeline compiled against a digest stays on it.
IMAGE_ENV = "HANDOFF_IMAGE"
# Where the project image keeps the project's files (its Dockerfile's WORKDIR): the pipeline's
# `project_dir` on a cluster.
PROJECT_DIR_IN_IMAGE = "/app"


class MlflowSettings(StrictModel):
    # A relative sqlite path is resolved against the project folder, so every step and the
    # researcher's own `mlflow ui` see the same registry whatever their working directory.
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = Field(min_length=1)


# A Kubernetes resource quantity ("500m", "2", "16Gi"), checked here rather than by the API server.
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")]
# An environment variable name as Kubernetes accepts it (C identifier style, as shells use).
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class KServeSettings(StrictModel):
    """Serving on a cluster: the KServe InferenceService `handoff deploy` creates in ``namespace``."""

    # triton: NVIDIA Triton serves the ONNX model from the Triton model-repository layout that
    # export writes (the default); kserve: the project's KServe Python runtime (ServingRuntime in
    # manifests/), the same server as local runs.
    runtime: Literal["triton", "kserve"] = "triton"
    # The runtime's image tag, pinned so a cluster upgrade never changes the server under a model.
    runtime_version: str = Field(default="24.12-py3", min_length=1)
    # A new version gets this share of traffic until its smoke test passes, then all of it;
    # 0 sends all traffic at once. The first version always takes all traffic.
    canary_percent: int = Field(default=10, ge=0, le=99)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=3, ge=1)
    # Per predictor replica: requests, also used as limits.
    cpu: Quantity = "1"
    memory: Quantity = "2Gi"
    gpus: int = Field(default=0, ge=0)
    # How long a new revision may take to be Ready at its new generation.
    ready_timeout_s: float = Field(default=600, gt=0)
    # The predictor's ServiceAccount (manifests/ creates it with no API access): give it the
    # model storage's credentials (S3, GCS) as KServe expects them.
    service_account: Dns1123Label | None = "handoff-serving"

    @model_validator(mode="after")
    def _replicas_in_order(self) -> KServeSettings:
        if self.max_replicas < self.min_replicas:
            raise FieldError(
                ("max_replicas",),
                f"max_replicas ({self.max_replicas}) must be at least min_replicas ({self.min_replicas})",
            )
        return self


class BatchingSettings(StrictModel):
    """Server-side dynamic batching of the local model server (and the handoff-onnx runtime)."""

    # Rows one model run may hold; requests waiting while the model runs are run together up
    # to this many. 1 turns batching off.
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    # How long a batch is held open for more requests; 0: a lone request runs at once.
    max_wait_ms: float = Field(default=0, ge=0, le=1000)


class ServingSettings(StrictModel):
    # Local serving (`make run`): the KServe Python model server on this machine.
    host: str = "127.0.0.1"
    # 0 picks a free port; the chosen one is printed and written to the run summary.
    port: int = Field(default=8080, ge=0, le=65535)
    ready_timeout_s: float = Field(default=60, gt=0)
    # Larger request bodies are answered 413 without being read (a compressed body counts at
    # its decoded size).
    max_request_mib: float = Field(default=16, gt=0)
    # Request bodies held at once, all requests together; past it a request is answered 503 with
    # Retry-After, so a burst of big requests cannot take the server past its memory limit.
    max_inflight_mib: float = Field(default=64, gt=0)
    # Connections served at once; more are answered 503 (uvicorn's limit_concurrency).
    max_concurrency: int = Field(default=256, ge=1)
    # A connection that has not sent a request's headers within this long is closed.
    header_timeout_s: float = Field(default=10, gt=0)
    # On SIGTERM: stop accepting, finish every request already received, exit 0 within this long
    # (the serving pod's terminationGracePeriodSeconds leaves room for it).
    shutdown_grace_s: float = Field(default=20, gt=0, le=600)
    batching: BatchingSettings = BatchingSettings()
    kserve: KServeSettings = KServeSettings()


class SecretEnv(StrictModel):
    """An environment variable every pipeline pod reads from a Kubernetes Secret key.

    Credentials (an MLflow token, S3 keys) reach the steps this way only: never as pipeline
    parameters, which KFP and Argo store and show in their UIs.
    """

    name: EnvName
    secret: Dns1123Label
    key: str = Field(min_length=1, pattern=r"^[-._a-zA-Z0-9]+$")


class ClusterSettings(StrictModel):
    """Where and as whom the compiled pipelines run (`handoff compile`, `handoff submit`)."""

    # The Kubeflow Pipelines API (`handoff submit --target kfp`), e.g. https://kfp.example.com.
    kfp_endpoint: str | None = None
    # The Argo Server (`handoff submit --target argo`), e.g. https://argo.example.com:2746.
    argo_server: str | None = None
    # The pipeline pods' ServiceAccount (manifests/ creates it with least-privilege RBAC).
    service_account: Dns1123Label = "handoff-pipeline"
    # The MLflow the pods use (a tracking server); null keeps mlflow.tracking_uri.
    mlflow_tracking_uri: str | None = None
    secret_env: list[SecretEnv] = Field(default_factory=list)
    # Retries of the steps that are safe to retry (train resumes, export/evaluate are pure,
    # register is idempotent on the model's sha256), with exponential backoff.
    retries: int = Field(default=2, ge=0, le=10)
    # The whole run's deadline: Argo stops the workflow then, and on KFP (no run deadline) no
    # step's pod runs longer. Two days: a run that has not finished by then is stuck.
    timeout_s: int = Field(default=2 * 24 * 3600, gt=0)


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
    # Set on one node too, the step keeps its resumable state there instead of in its MLflow run.
    workspace_claim: Dns1123Label | None = None
    # Give up (and delete the job) after this long.
    timeout_s: int = Field(default=24 * 3600, gt=0)


class TrainingSettings(StrictModel):
    # Overrides applied to model.py's Config (field name -> value) for pipeline runs.
    overrides: dict[str, object] = Field(default_factory=dict)
    # Nodes × GPUs per node. nodes > 1 runs training as a job of its own (see `job`); one node
    # stays a plain pipeline step, under torchrun with one process per GPU when gpus > 1.
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


class OptimizeSettings(StrictModel):
    """How `handoff optimize` calibrates static int8 (what it may serve is the contract's
    ``slo.optimize``)."""

    # ONNX Runtime's calibration methods: min/max of the activations, or a histogram's entropy or
    # percentile (slower, and better when a few outliers stretch the range).
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # Training-split items the activations' ranges are measured on, spread evenly over the split.
    calibration_samples: int = Field(default=256, ge=1, le=100_000)


class MonitoringSettings(StrictModel):
    """The model server's payload log (a sample of requests and responses) and where
    `handoff monitor`, which compares it with the served version's reference profile, reports."""

    # Share of answered requests kept (0 turns the log off). Sampling costs the request a queue
    # put; the writing happens on a thread of its own.
    sample_rate: float = Field(default=1.0, ge=0, le=1)
    # The store's size: past it the oldest files are deleted, so a busy model cannot fill a disk.
    max_mib: float = Field(default=256, gt=0)
    # A folder or an object-store URI; null keeps it in this machine's state folder
    # (payloads/<model>). Set, the cluster's InferenceService sends every request and response
    # to the namespace's payload collector (KServe's logger, manifests/monitoring/), which writes
    # each model under its root: so on a cluster it is <the collector's store>/<model name>.
    store: str | None = Field(default=None, min_length=1)
    # Where `handoff monitor` pushes its drift gauges when run as a pipeline step on a cluster
    # (a Prometheus Pushgateway, e.g. http://pushgateway.monitoring:9091); null: none pushed.
    pushgateway: str | None = Field(default=None, pattern=r"^https?://")


class Settings(StrictModel):
    project: InferenceServiceName
    template_version: str
    orchestrator: str = Field(pattern=r"^(kfp|argo|both)$")
    image: str = Field(min_length=1)
    namespace: Dns1123Label
    mlflow: MlflowSettings
    serving: ServingSettings = ServingSettings()
    training: TrainingSettings = TrainingSettings()
    optimize: OptimizeSettings = OptimizeSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    cluster: ClusterSettings = ClusterSettings()

    @model_validator(mode="after")
    def _run_outlasts_training(self) -> Settings:
        run_s, train_s = self.cluster.timeout_s, self.training.job.timeout_s
        if run_s <= train_s:
            raise FieldError(
                ("cluster", "timeout_s"),
                f"the whole run's deadline ({run_s} s) must be longer than one training attempt "
                f"(training.job.timeout_s, {train_s} s): raise cluster.timeout_s or lower "
                "training.job.timeout_s",
            )
        return self

    def tracking_uri(self, project_dir: Path) -> str:
        """The MLflow tracking URI, a relative sqlite path made absolute under the project.

        ``TRACKING_URI_ENV`` wins when set: compiled pipelines set it on every pod from
        ``cluster.mlflow_tracking_uri``, since a pod cannot use the project's sqlite file (its
        project folder is read-only and not shared between steps).
        """
        uri = os.environ.get(TRACKING_URI_ENV) or self.mlflow.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str((project_dir / uri[len(prefix) :]).resolve())
        return uri


def load_settings(project_dir: Path) -> Settings:
    return load_yaml_model(project_dir / SETTINGS_FILE, Settings)
