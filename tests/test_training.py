"""The trainer on real processes: torchrun data parallel (gloo), SIGKILL/SIGTERM and resume."""

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

from .conftest import HANDOFF, edit_yaml, handoff, replace_in

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


def start_and_wait_for_state(project: Path, min_step: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [HANDOFF, *TRAIN], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    states = project / "checkpoint.pt.state"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(int(p.stem.split("-")[1]) >= min_step for p in states.glob("step-*.pt")):
            return process
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no state at step >= {min_step} appeared: {process.communicate()}")


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
