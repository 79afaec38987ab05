"""The pipeline's train step: train in the step's own pod, or on N nodes as a training-operator job.

``training.nodes`` in handoff.yaml decides. One node trains right here (the step's pod has the
GPUs); more launch a TrainJob (or legacy PyTorchJob) and wait for it. Local runs always train on
this machine: a laptop has no cluster to launch into, and the result is the same model.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from handoff.project import Project
from handoff.settings import IMAGE_ENV
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

    record = train_on_cluster(
        in_this_image(project), checkpoint, run_key=run_key, project_dir_in_image=str(project_dir)
    )
    return TrainResult(**{**record, "checkpoint": str(checkpoint)})


def in_this_image(project: Project) -> Project:
    """The project with the image the pipeline put this step in (``IMAGE_ENV``), if it said one."""
    image = os.environ.get(IMAGE_ENV)
    if not image:
        return project
    return dataclasses.replace(project, settings=project.settings.model_copy(update={"image": image}))
