"""Platform settings of a project (``handoff.yaml``): where things run, not what the model is."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from handoff.k8s_names import Dns1123Label
from handoff.yaml_files import StrictModel, load_yaml_model

SETTINGS_FILE = "handoff.yaml"


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


class TrainingSettings(StrictModel):
    # Overrides applied to model.py's Config (field name -> value) for pipeline runs.
    overrides: dict[str, object] = Field(default_factory=dict)
    gpus: int = Field(default=0, ge=0)
    # Resumable state every N optimizer steps (and at every epoch end); 0 = epoch ends only.
    checkpoint_every_steps: int = Field(default=50, ge=0)
    # bf16 (or fp16 + loss scaling) autocast on GPUs; CPUs always train in fp32.
    mixed_precision: bool = True
    # torch.compile the model (GPU runs of minutes and more; compiling costs tens of seconds).
    compile: bool = False
    # channels-last memory format: faster convolutions on GPUs with tensor cores.
    channels_last: bool = False


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
