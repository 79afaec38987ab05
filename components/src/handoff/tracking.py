"""MLflow set-up shared by the steps that write to the tracking server or registry."""

from __future__ import annotations

import os

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from handoff.project import Project

# Registry aliases: every registered version is the newest `challenger`; `champion` is what
# serves and what the next model must not fall behind.
CHALLENGER = "challenger"
CHAMPION = "champion"


def use_tracking(project: Project) -> MlflowClient:
    """Point MLflow at the project's store and make sure its experiment exists.

    With a local store the experiment's artifacts go to ``<project>/mlartifacts`` rather than
    the working directory of whichever process happened to create it first.
    """
    # Steps run in short-lived processes on machines that may have no network: no telemetry.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A model's files are fetched in a blink: a progress bar per fetch only buries the command's
    # own lines (handoff deploy, handoff ab), in a terminal and in a pod's log alike.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = project.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = project.settings.mlflow.experiment
    if client.get_experiment_by_name(name) is None:
        location = None
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            location = (project.root / "mlartifacts").as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # Another step created it at the same moment; that one is as good.
            if client.get_experiment_by_name(name) is None:
                raise
    mlflow.set_experiment(name)
    return client


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist yet.

    Any other registry error (unreachable server, locked database) is raised: it must never
    read as "no champion" and let a model through.
    """
    try:
        return str(client.get_model_version_by_alias(name, alias).version)  # int on sqlite
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
