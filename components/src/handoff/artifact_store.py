"""Whether a cluster run can reach the registry and the model files it keeps.

A pipeline pod cannot use a sqlite file or a local folder: its project folder is read-only, every
pod has its own file system, and KServe's storage initializer downloads the registered model in
yet another pod. So on a cluster the tracking URI must be a server, and the experiment's artifact
root a store KServe's storage initializer reads. Both are checked before any work: compile checks
the setting, the pipeline's first step (and ``handoff doctor``) the server's artifact root.
"""

from __future__ import annotations

import re

from mlflow.tracking import MlflowClient

from handoff.errors import HandoffError
from handoff.project import Project
from handoff.settings import SETTINGS_FILE
from handoff.step_entry import in_cluster

TRACKING_FIELD = "cluster.mlflow_tracking_uri"
# What KServe's storage initializer downloads from (kserve_storage.Storage.download): object
# stores, HTTP(S), HDFS and PersistentVolumeClaims. MLflow's Azure Blob URIs (wasbs://) are read
# as their https:// form (handoff.kube.inference_service.storage_uri).
KSERVE_READABLE = ("s3://", "gs://", "https://", "hdfs://", "webhdfs://", "pvc://")
AZURE_BLOB = re.compile(r"^wasbs?://[^@/]+@[^/]+\.blob\.core\.windows\.net(/|$)")
SERVER_FIX = (
    "run the tracking server with artifacts in object storage (`mlflow server --default-artifact-root "
    "s3://<bucket>/ --no-serve-artifacts`, or gs://, Azure Blob, pvc://)"
)


def kserve_readable(uri: str) -> bool:
    """Whether KServe's storage initializer can download from ``uri``."""
    return uri.startswith(KSERVE_READABLE) or AZURE_BLOB.match(uri) is not None


def check_cluster_tracking(project: Project) -> str:
    """The tracking URI the pipeline's pods get; refused unless it is a server they can all reach."""
    uri = project.settings.cluster.mlflow_tracking_uri
    if not uri:
        problem = "is not set, so the pods would each use a sqlite file in their read-only image"
    elif not uri.startswith(("http://", "https://", "databricks")):
        problem = f"is {uri}, a store on one machine that no pod can share"
    else:
        return uri
    raise HandoffError(
        f"{problem}: set it to the MLflow tracking server the pipeline's pods reach "
        "(e.g. http://mlflow.mlflow.svc.cluster.local:5000)",
        file=project.root / SETTINGS_FILE,
        field=TRACKING_FIELD,
    )


def check_artifact_root(client: MlflowClient, project: Project) -> str:
    """The experiment's artifact root, refused unless KServe's storage initializer reads it.

    Checked by the pipeline's first step, before any training: a server that keeps artifacts
    itself (``mlflow-artifacts:/``) or on its own disk (``file://``) would only fail in deploy.
    """
    name = project.settings.mlflow.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise HandoffError(f"the MLflow experiment {name!r} does not exist on {client.tracking_uri}")
    root = str(experiment.artifact_location)
    if kserve_readable(root):
        return root
    raise HandoffError(
        f"the tracking server {client.tracking_uri} stores experiment {name!r}'s artifacts at {root}, "
        f"where KServe's storage initializer cannot download the registered model from: {SERVER_FIX}, "
        "or create the experiment with an artifact location there",
        file=project.root / SETTINGS_FILE,
        field=TRACKING_FIELD,
    )


def check_before_training(project: Project) -> None:
    """In a cluster's pod (``in_cluster``), refuse a registry whose artifacts KServe cannot fetch
    before any training starts; elsewhere (a local run, a laptop) there is nothing to check."""
    if not in_cluster():
        return
    from handoff.tracking import use_tracking

    check_artifact_root(use_tracking(project), project)
