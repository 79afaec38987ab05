"""The trainer on real processes: torchrun data parallel (gloo), SIGKILL/SIGTERM and resume,
a retried step on a new disk resuming from its MLflow run, and one process per GPU in the step."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from handoff.step_entry import LOCAL_RUN_ENV
from handoff.steps.train_launch import train_step

from .conftest import HANDOFF, edit_yaml, handoff, mlflow_state_restored, replace_in

pytestmark = pytest.mark.local

TRAIN = ["train", "--set", "epochs=2"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=atol, rtol=0), name


def record(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(result.stdout[result.stdout.index("{\n") :])


def slow_steps(project: Path, every: int, seconds: float = 0.05) -> None:
    """A pause in every loss() call and frequent state, so a test can interrupt training mid-epoch."""
    replace_in(
        project / "model.py",
        "    _, target = batch\n    return F.cross_entropy",
        f"    _, target = batch\n    __import__('time').sleep({seconds})\n    return F.cross_entropy",
    )
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(checkpoint_every_steps=every))


def start_and_wait_for_state(
    project: Path, min_step: int, *args: str, pattern: str = "checkpoint.pt.state/step-*.pt"
) -> subprocess.Popen[str]:
    """``handoff train`` started, once a state file at ``min_step`` or later matches ``pattern``."""
    process = subprocess.Popen(
        [HANDOFF, *TRAIN, *args], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if any(int(p.stem.split("-")[1]) >= min_step for p in project.glob(pattern)):
            return process
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no state at step >= {min_step} appeared: {process.communicate()}")


def two_gpus(project: Path, **training: object) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(gpus=2, **training))


def test_torchrun_two_processes_match_one_process(project: Path, tmp_path: Path) -> None:
    single = record(handoff(*TRAIN, cwd=project))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # rendezvous on a free local port
            "--nproc-per-node",
            "2",
            "-m",
            "handoff",
            "train",
            "--checkpoint",
            "ddp.pt",
            "--set",
            "epochs=2",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ddp = record(result)
    assert result.stdout.count('"world_size": 2') == 1  # one record, from rank 0
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"]
    assert ddp["val_metrics"]["accuracy"] == pytest.approx(single["val_metrics"]["accuracy"], abs=1e-6)
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    # Two ranks on half batches each, gradients averaged: the same optimisation as one process.
    assert_same_weights(project / "checkpoint.pt", project / "ddp.pt", atol=1e-5)


def test_sigkill_then_rerun_resumes_to_the_same_weights(project: Path, tmp_path: Path) -> None:
    reference = Path(shutil.copytree(project, tmp_path / "reference"))
    slow_steps(project, every=5)
    slow_steps(reference, every=5)
    uninterrupted = record(handoff(*TRAIN, cwd=reference))

    process = start_and_wait_for_state(project, min_step=10)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    resumed = record(handoff(*TRAIN, cwd=project))
    assert 10 <= resumed["resumed_from_step"] < uninterrupted["steps"]
    assert resumed["steps"] == uninterrupted["steps"]
    assert_same_weights(project / "checkpoint.pt", reference / "checkpoint.pt", atol=1e-6)

    uri = f"sqlite:///{project / 'mlflow.db'}"
    history = MlflowClient(uri).get_metric_history(resumed["mlflow_run_id"], "accuracy")
    assert sorted(m.step for m in history) == [1, 2]  # each epoch logged once, none twice


def test_sigterm_saves_state_and_exits_with_a_retryable_code(project: Path) -> None:
    # No periodic state: whatever exists after SIGTERM was written because of it.
    slow_steps(project, every=1000, seconds=0.2)
    process = subprocess.Popen(
        [HANDOFF, *TRAIN], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (project / "mlflow.db").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # the MLflow run is open, so training started: now inside epoch 1 (23 x 0.2 s)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75
    assert "handoff: train preempted: SIGTERM at epoch" in stderr
    saved = sorted((project / "checkpoint.pt.state").glob("step-*.pt"))
    assert saved, "SIGTERM must leave a checkpoint"
    resumed = record(handoff(*TRAIN, cwd=project))
    assert resumed["resumed_from_step"] == int(saved[-1].stem.split("-")[1]) > 0


def test_truncated_checkpoint_is_ignored_for_the_previous_one(project: Path) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(checkpoint_every_steps=5))
    record(handoff(*TRAIN, cwd=project))
    newest, previous = sorted((project / "checkpoint.pt.state").glob("step-*.pt"), reverse=True)
    newest.write_bytes(newest.read_bytes()[:100])
    result = handoff(*TRAIN, cwd=project)  # the same Config: a finished run resumes at its end
    resumed = record(result)
    relative = Path("checkpoint.pt.state")  # paths as the user gave them (--checkpoint is relative)
    assert f"ignoring unreadable checkpoint {relative / newest.name} (RuntimeError)" in result.stderr
    assert f"resuming from {relative / previous.name}" in result.stderr  # stdout is the record alone
    assert resumed["resumed_from_step"] == int(previous.stem.split("-")[1])


# The MLflow run's artifacts of a project on the default (sqlite) store.
STORED_STATES = "mlartifacts/**/train-state/step-*.pt"


def test_a_retried_step_on_a_new_disk_resumes_from_its_mlflow_run(project: Path, tmp_path: Path) -> None:
    reference = Path(shutil.copytree(project, tmp_path / "reference"))
    slow_steps(project, every=5)
    slow_steps(reference, every=5)
    uninterrupted = record(handoff(*TRAIN, cwd=reference))

    # The first attempt dies (SIGKILL: its node is gone) once its state is in the MLflow run...
    process = start_and_wait_for_state(project, 10, "--run-key", "run-1", pattern=STORED_STATES)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    # ...and the retry runs on a new pod: nothing of the first attempt's disk is left.
    shutil.rmtree(project / "checkpoint.pt.state")
    result = handoff(*TRAIN, "--run-key", "run-1", cwd=project)
    resumed = record(result)
    assert 10 <= resumed["resumed_from_step"] < uninterrupted["steps"]
    assert "fetched training state step-" in result.stderr and "resuming from" in result.stderr
    assert resumed["steps"] == uninterrupted["steps"]
    assert_same_weights(project / "checkpoint.pt", reference / "checkpoint.pt", atol=0)

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs(["1"], filter_string="tags.`handoff.run_key` = 'run-1'")
    assert run.info.run_id == resumed["mlflow_run_id"]  # the same MLflow run across attempts
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted(m.step for m in history) == [1, 2]  # each epoch logged once, none twice
    stored = [Path(p).name for p in project.glob(STORED_STATES)]
    assert stored == [f"step-{resumed['steps']:09d}.pt"]  # the final state; older ones deleted

    # Another pipeline run (another key) starts over, in an MLflow run of its own.
    shutil.rmtree(project / "checkpoint.pt.state")
    other = record(handoff("train", "--set", "epochs=1", "--run-key", "run-2", cwd=project))
    assert other["resumed_from_step"] == 0 and other["mlflow_run_id"] != resumed["mlflow_run_id"]


def test_two_gpus_train_as_two_torchrun_processes_in_the_step(project: Path) -> None:
    two_gpus(project, overrides={"epochs": 1})
    with mlflow_state_restored():
        # What the KFP wrapper calls (and `handoff train`): no torchrun in the command.
        result = train_step(project, project / "ddp.pt", run_key="kfp-run-1")
    assert result.world_size == 2 and result.steps > 0 and (project / "ddp.pt").is_file()
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(gpus=0))
    single = record(handoff("train", "--set", "epochs=1", "--checkpoint", "one.pt", cwd=project))
    assert single["world_size"] == 1 and single["steps"] == result.steps
    assert result.train_loss == pytest.approx(single["train_loss"], rel=1e-5)
    assert_same_weights(project / "one.pt", project / "ddp.pt", atol=1e-5)


def test_sigterm_reaches_every_rank_and_the_step_exits_with_the_retryable_code(project: Path) -> None:
    two_gpus(project)
    slow_steps(project, every=1000, seconds=0.2)  # no periodic state: SIGTERM's is the only one
    process = subprocess.Popen(
        [HANDOFF, *TRAIN], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (project / "mlflow.db").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # rank 0 opened the MLflow run: both ranks are in epoch 1 (0.2 s a step)
    process.send_signal(signal.SIGTERM)  # to `handoff train`, as the kubelet sends it
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert "handoff: train preempted: SIGTERM at epoch" in stderr
    saved = sorted((project / "checkpoint.pt.state").glob("step-*.pt"))
    assert saved, "SIGTERM must leave a checkpoint"
    resumed = record(handoff(*TRAIN, cwd=project))
    assert resumed["world_size"] == 2
    assert resumed["resumed_from_step"] == int(saved[-1].stem.split("-")[1]) > 0


def test_a_user_error_in_a_rank_is_the_step_error(project: Path) -> None:
    two_gpus(project)
    result = handoff("train", "--set", "batch_size=63", "--set", "epochs=1", cwd=project)
    assert result.returncode == 1
    assert "error: model.py: Config.batch_size: Config.batch_size 63 is the global batch and must " in (
        result.stderr
    )
    assert "divide evenly over 2 processes" in result.stderr


def test_a_local_run_on_a_machine_without_two_gpus_trains_in_one_process(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    two_gpus(project, overrides={"epochs": 1})
    monkeypatch.setenv(LOCAL_RUN_ENV, "1")
    with mlflow_state_restored():
        result = train_step(project, project / "out.pt", run_key="local-run")
    assert result.world_size == 1 and (project / "out.pt").is_file()
    assert "training.gpus = 2 applies on a cluster" in capsys.readouterr().err
    assert not list(project.glob(STORED_STATES))  # local runs keep state beside the checkpoint only
