"""The pipeline's train step: train in the step's own pod, or on N nodes as a training-operator job.

``training.nodes`` in handoff.yaml decides. One node trains right here (the step's pod has the
GPUs); more launch a TrainJob (or legacy PyTorchJob) and wait for it. Local runs always train on
this machine: a laptop has no cluster to launch into, and the result is the same model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from handoff.project import Project
from handoff.step_entry import LOCAL_RUN_ENV
from handoff.steps.train import TrainResult, train


def train_step(project_dir: Path | str, checkpoint: Path | str, *, run_key: str) -> TrainResult:
    """Train, on this machine or on the cluster; ``run_key`` (the pipeline run's id) names the job."""
    project = Project.load(project_dir)
    training = project.settings.training
    if not training.distributed_job:
        return train(project_dir, checkpoint)
    if os.environ.get(LOCAL_RUN_ENV):
        print(
            f"training.nodes = {training.nodes} applies on a cluster; this local run trains on this machine",
            file=sys.stderr,
            flush=True,
        )
        return train(project_dir, checkpoint)
    from handoff.kube.train_job import train_on_cluster

    record = train_on_cluster(project, checkpoint, run_key=run_key, project_dir_in_image=str(project_dir))
    return TrainResult(**{**record, "checkpoint": str(checkpoint)})
