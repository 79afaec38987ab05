"""Run a project's pipeline on this machine with kfp.local: no Docker, no Kubernetes.

Each run gets ``<project>/runs/<run-id>/``: kfp.local's artifacts under ``artifacts/`` and the
run's ``summary.json``. Steps run in this Python (SubprocessRunner without per-task venvs);
their scratch folders go to ``runs/<run-id>/tmp`` and are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from handoff.files import read_json, write_json
from handoff.model_source import precheck_source
from handoff.project import Project
from handoff.step_entry import ERROR_FILE_ENV, LOCAL_RUN_ENV
from handoff_pipelines import PIPELINE_NAME, STEPS, forkserver
from handoff_pipelines.summary import build_summary

RUNS_DIR = "runs"


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables the step subprocesses inherit, and restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        tempfile.tempdir = None


def task_records(pipeline_root: Path) -> dict[str, dict[str, Any]]:
    """Each finished task's ``record`` artifact (kfp.local: ``<root>/<pipeline>-<time>/<task>/``)."""
    return {path.parent.name: read_json(path) for path in pipeline_root.glob(f"{PIPELINE_NAME}-*/*/record")}


def new_run_dir(project: Project) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    path = project.root / RUNS_DIR / stamp
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def _step_python(step_python: forkserver.StepPython | None) -> Iterator[None]:
    """Have kfp.local start steps through the fork-server client.

    kfp.local launches each step with ``sys.executable``; pointing it at the client for the
    duration of the run is the one lever it offers. The client falls back to the real
    interpreter (kept in the environment) for anything that is not a step.
    """
    if step_python is None:
        yield
        return
    real = sys.executable
    with _environment({forkserver.SOCKET_ENV: step_python.socket_path, forkserver.PYTHON_ENV: real}):
        sys.executable = step_python.executable
        try:
            yield
        finally:
            sys.executable = real


def run_local(project_dir: Path | str, *, fork_server: bool = True) -> dict[str, Any]:
    """Run train → export → optimize → evaluate → register → deploy; return (and write) the run summary."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    precheck_source(project.root)  # a broken model.py fails here, before any step starts
    run_dir = new_run_dir(project)
    pipeline_root = run_dir / "artifacts"
    scratch = run_dir / "tmp"  # per run: two runs of one project must not share scratch space
    scratch.mkdir()
    error_file = run_dir / "error.json"
    try:
        with contextlib.ExitStack() as stack:
            # The fork server imports torch & co. while this process imports kfp and builds the graph.
            server = stack.enter_context(forkserver.running(project.root)) if fork_server else None
            from kfp import local

            from handoff_pipelines.graph import build_pipeline

            local.init(
                runner=local.SubprocessRunner(use_venv=False),
                pipeline_root=str(pipeline_root),
                raise_on_error=False,
            )
            pipeline = build_pipeline(image=project.settings.image, task_type=project.contract.task_type)
            stack.enter_context(_step_python(server.wait() if server else None))
            stack.enter_context(
                _environment({ERROR_FILE_ENV: str(error_file), "TMPDIR": str(scratch), LOCAL_RUN_ENV: "1"})
            )
            stack.enter_context(warnings.catch_warnings())
            # kfp.local warns that the project image is not a python image; locally the image is
            # not used at all (steps run in this environment), so the warning would only mislead.
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            pipeline(project_dir=str(project.root))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    failure = read_json(error_file) if error_file.is_file() else None
    records = task_records(pipeline_root)
    # Deploy runs only for a version register promoted (a failed gate, or another run promoting
    # meanwhile, leaves it out).
    promoted = records.get("register", {}).get("promoted", True)
    expected = STEPS if promoted else STEPS[:-1]
    missing = [step for step in expected if step not in records]
    if failure is None and missing:
        failure = {
            "step": missing[0],
            "message": f"the pipeline stopped before {missing[0]} finished; "
            f"see the log above and {pipeline_root}",
        }
    summary = build_summary(
        project, run_dir, records, failure, total_seconds=round(time.perf_counter() - started, 3)
    )
    write_json(run_dir / "summary.json", summary, sort_keys=False)  # reads in pipeline order
    _point_latest_at(run_dir)
    return summary


def _point_latest_at(run_dir: Path) -> None:
    """``runs/latest`` -> this run, swapped atomically so a concurrent run never sees it missing."""
    temporary = run_dir.parent / f".latest-{run_dir.name}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name)
    os.replace(temporary, run_dir.parent / "latest")
