"""The pipeline's train step: train in the step's own pod (on all its GPUs), or on N nodes as a
training-operator job.

``training`` in handoff.yaml decides. One node trains right here: with ``gpus > 1`` as that many
processes under torchrun (one per GPU, data parallel), else in this process. More nodes launch a
TrainJob (or legacy PyTorchJob) and wait for it. Local runs (``LOCAL_RUN_ENV``: kfp.local, `make
run`) always train on this machine, one process per GPU it has (one process where it has fewer
than two, and they say so): a laptop has no cluster to launch into, and the result is the same
model.

Where resumable state lives so that a retried step (a new pod) resumes instead of starting over:
the workspace claim when handoff.yaml names one (``training.job.workspace_claim``, mounted in the
step's pod), else the MLflow run's artifacts, found by ``run_key`` (``handoff.resume_store``).
Local runs keep it beside the checkpoint, as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from handoff.errors import HandoffError
from handoff.project import Project
from handoff.settings import IMAGE_ENV, SETTINGS_FILE
from handoff.step_entry import LOCAL_RUN_ENV
from handoff.steps.train import PREEMPTED_EXIT_CODE, Preempted, TrainResult, train

# handoff.kube.train_job.WORKSPACE: where the train step's pod mounts training.job.workspace_claim
# (a literal here so a single-node step does not import the kubernetes client).
WORKSPACE = Path("/workspace")


def train_step(
    project_dir: Path | str,
    checkpoint: Path | str,
    *,
    run_key: str,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
) -> TrainResult:
    """Train, on this machine or on the cluster; ``run_key`` (the pipeline run's id, the same for
    every attempt of the step) names the job and finds an earlier attempt's state."""
    project = Project.load(project_dir)
    training = project.settings.training
    if training.distributed_job and not under_torchrun():
        if local_run():
            print(
                f"training.nodes = {training.nodes} applies on a cluster; "
                "this local run trains on this machine",
                file=sys.stderr,
                flush=True,
            )
        else:
            from handoff.kube.train_job import train_on_cluster

            record = train_on_cluster(
                in_this_image(project), checkpoint, run_key=run_key, project_dir_in_image=str(project_dir)
            )
            return TrainResult(**{**record, "checkpoint": str(checkpoint)})
    return _on_this_node(project, project_dir, checkpoint, run_key, overrides, fresh)


def local_run() -> bool:
    """Whether the local runner (kfp.local) runs this step: no cluster, no remote state."""
    return bool(os.environ.get(LOCAL_RUN_ENV))


def under_torchrun() -> bool:
    """Whether torchrun (or a training-operator job's node) started this process as one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def train_on_this_node(
    project_dir: Path | str,
    checkpoint: Path | str,
    *,
    run_key: str = "",
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
) -> TrainResult:
    """``handoff train``: train here, one process per GPU (``training.gpus``) under torchrun.

    With a ``run_key`` outside local runs, state goes where a retried step's new pod finds it
    (the workspace claim, or the MLflow run's artifacts). Already one rank of torchrun (a
    multi-node job's node): train as that rank.
    """
    project = Project.load(project_dir)
    return _on_this_node(project, project_dir, checkpoint, run_key, overrides, fresh)


def _on_this_node(
    project: Project,
    project_dir: Path | str,
    checkpoint: Path | str,
    run_key: str,
    overrides: dict[str, Any] | None,
    fresh: bool,
) -> TrainResult:
    training = project.settings.training
    state_dir: Path | None = None
    if run_key and not local_run() and training.job.workspace_claim:
        from handoff.kube.train_job import job_name

        state_dir = WORKSPACE / job_name(project.settings.project, run_key) / "train-state"
        run_key = ""  # the claim outlives the pod: nothing to keep elsewhere
    elif local_run():
        run_key = ""  # local runs keep state beside the checkpoint, as they always have
    kwargs: dict[str, Any] = {
        "overrides": overrides,
        "fresh": fresh,
        "state_dir": state_dir,
        "run_key": run_key,
    }
    if under_torchrun():  # one rank of a job's node: torchrun already started one per GPU
        return train(project_dir, checkpoint, **kwargs)
    processes = processes_for(training.gpus)
    if processes <= 1:
        return train(project_dir, checkpoint, **kwargs)
    return train_with_torchrun(project_dir, checkpoint, processes, **kwargs)


def processes_for(gpus: int) -> int:
    """Training processes on this node: one per GPU handoff.yaml asks for (gloo on CPUs where the
    node has no CUDA, as the rehearsal runs it); in a local run, one per GPU this machine has, up
    to that (a laptop without two GPUs trains in one process, and says so)."""
    if gpus <= 1:
        return 1
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not local_run():
        if 0 < visible < gpus:  # NCCL takes one GPU per process
            raise HandoffError(
                f"{gpus} training processes need {gpus} GPUs, but this pod sees {visible}: the node "
                "must give the step what it requests (nvidia.com/gpu), or lower training.gpus",
                file=SETTINGS_FILE,
                field="training.gpus",
            )
        return gpus
    here = min(gpus, visible)
    if here < 2:
        print(
            f"training.gpus = {gpus} applies on a cluster (torchrun, {gpus} processes); this local run "
            "trains in one process (this machine has fewer than 2 GPUs)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return here


# --- one process per GPU, under torchrun ------------------------------------------------------------


def torchrun_command(processes: int, spec: Path) -> list[str]:
    """torchrun on this node alone (``--standalone``: rendezvous on a free local port), each rank
    running :func:`worker` with the arguments in ``spec``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        __name__,
        str(spec),
    ]


def train_with_torchrun(
    project_dir: Path | str, checkpoint: Path | str, processes: int, **kwargs: Any
) -> TrainResult:
    """Train as ``processes`` ranks; rank 0's result is the step's.

    SIGTERM (preemption) is passed to torchrun, which passes it to every rank: they save state
    and exit with ``PREEMPTED_EXIT_CODE``, and so does this process. Each rank writes how it
    ended to a file (torchrun itself exits 1 for any failure), so a user's error in model.py is
    reported with its own message and a preemption keeps its exit code.
    """
    with tempfile.TemporaryDirectory(prefix="handoff-ranks-") as folder:
        outcomes = Path(folder)
        spec = outcomes / "spec.json"
        arguments = {"project_dir": str(project_dir), "checkpoint": str(checkpoint), **kwargs}
        arguments["state_dir"] = None if kwargs.get("state_dir") is None else str(kwargs["state_dir"])
        spec.write_text(json.dumps({"train": arguments, "outcomes": str(outcomes)}))
        print(f"handoff: training as {processes} processes (torchrun)", file=sys.stderr, flush=True)
        # The step's stdout is its record: the ranks' output goes to stderr.
        process = subprocess.Popen(torchrun_command(processes, spec), stdout=_stderr_fd())
        terminated: list[bool] = []
        previous = _forward_sigterm(process, terminated)
        try:
            code = process.wait()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return _result(outcomes, code, processes, terminated=bool(terminated))


def _stderr_fd() -> int:
    """This process's stderr as a file descriptor (2 where sys.stderr is not a file, e.g. captured)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return 2


def _forward_sigterm(process: subprocess.Popen[bytes], terminated: list[bool]) -> Any:
    """Pass SIGTERM on to torchrun (the main thread only can handle signals; else leave it)."""

    def forward(signum: int, frame: Any) -> None:
        terminated.append(True)
        process.send_signal(signal.SIGTERM)

    try:
        return signal.signal(signal.SIGTERM, forward)
    except ValueError:
        return None


def _result(outcomes: Path, code: int, processes: int, *, terminated: bool) -> TrainResult:
    """Rank 0's record; else, in this order: a rank's error in the user's project, a platform
    bug, a preemption (this step was sent SIGTERM, or every rank was), or ranks that died
    without a word (torchrun then stops the others with SIGTERM: that is no preemption)."""
    ended = {path.stem: json.loads(path.read_text()) for path in sorted(outcomes.glob("rank-*.json"))}
    if code == 0 and "result" in ended.get("rank-0", {}):
        return TrainResult(**ended["rank-0"]["result"])
    for outcome in ended.values():
        if "error" in outcome:
            error = outcome["error"]
            raise HandoffError(error["detail"], file=error["file"], field=error["field"])
    for rank, outcome in ended.items():
        if "unexpected" in outcome:
            raise RuntimeError(f"{rank}: {outcome['unexpected']} (its traceback is in the step's log above)")
    preempted = [outcome["preempted"] for outcome in ended.values() if "preempted" in outcome]
    if terminated or len(preempted) == processes:
        if not preempted:  # SIGTERM before the ranks could handle it (still starting): nothing to save
            preempted = ["SIGTERM while the training processes were starting; run the step again"]
            print(f"handoff: train preempted: {preempted[0]}", file=sys.stderr, flush=True)
        raise Preempted(preempted[0])  # else rank 0 has said so in the log
    silent = sorted(set(range(processes)) - {int(rank.split("-")[1]) for rank in ended})
    raise HandoffError(
        f"the training process of rank {', '.join(map(str, silent))} ended without saying why (torchrun "
        f"exited with code {code}): killed, e.g. for memory? See the step's log, and training.memory in "
        "handoff.yaml"
    )


def worker(spec_path: str) -> int:
    """One rank under torchrun: train, and write how it ended to ``rank-<RANK>.json``."""
    spec = json.loads(Path(spec_path).read_text())
    outcome_file = Path(spec["outcomes"]) / f"rank-{os.environ.get('RANK', '0')}.json"
    outcome: dict[str, Any]
    code = 0
    try:
        result = train(**spec["train"])
        outcome = {"result": dataclasses.asdict(result)}
    except Preempted as exc:
        outcome, code = {"preempted": exc.message}, PREEMPTED_EXIT_CODE
    except HandoffError as exc:
        # Not printed here: the step reports it (once, however many ranks raised it).
        outcome, code = {"error": {"detail": exc.detail, "file": exc.file, "field": exc.field}}, 2
    except Exception as exc:  # noqa: BLE001 - a platform bug: its traceback goes to the log
        traceback.print_exc()
        outcome, code = {"unexpected": f"{type(exc).__name__}: {exc}"}, 1
    outcome_file.write_text(json.dumps(outcome))
    return code


def in_this_image(project: Project) -> Project:
    """The project with the image the pipeline put this step in (``IMAGE_ENV``), if it said one."""
    image = os.environ.get(IMAGE_ENV)
    if not image:
        return project
    return dataclasses.replace(project, settings=project.settings.model_copy(update={"image": image}))


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
