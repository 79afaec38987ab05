"""Resumable training state kept in the MLflow run's artifacts, where a retried pod finds it.

A pipeline's train step keeps its state in the pod's scratch space, which goes with the pod, and
Argo and KFP retry a failed, preempted or evicted step in a new pod. So a step that knows its
pipeline run (``run_key``: the same for every attempt of one run, different between runs) tags
its MLflow run with it, and every state it saves is uploaded into that run's artifacts
(``train-state/``), the only place every pod of the run already reaches (the tracking server and
the ``cluster.secret_env`` credentials of its artifact store). A retried attempt finds the run by
the tag, downloads the newest state and resumes from it, in the same MLflow run.

Uploads run in a background thread and never hold up training: each saved state is hard-linked
(copied where links are not supported) where the trainer's pruning cannot remove it, and only the
newest one waiting is uploaded (an older one still waiting is skipped). The older remote state is
deleted once a newer one is up: object stores write an object whole or not at all, so one complete
state is always there. :meth:`Uploader.close` waits for the newest state, so the final (or
SIGTERM's) state is up before the step ends. A failed upload is a warning: training goes on, only
a retry would resume from an older state. The final state stays: a retry after training finished
(its outputs failed to save) finishes at once.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from handoff.errors import HandoffError

# The MLflow run's tag naming the pipeline run it trains for.
RUN_KEY_TAG = "handoff.run_key"
# The folder of the run's artifacts that holds the state.
STATE_ARTIFACTS = "train-state"
# What an Argo or KFP run id is made of; anything else could break the search filter.
_RUN_KEY_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _warn(message: str) -> None:
    print(f"handoff: warning: {message}", file=sys.stderr, flush=True)


def check_run_key(run_key: str) -> str:
    """The run key, refused when it holds characters no orchestrator's run id has."""
    if not run_key or not set(run_key) <= _RUN_KEY_CHARACTERS or len(run_key) > 200:
        raise HandoffError(
            f"--run-key expects the pipeline run's id (up to 200 letters, digits, '-', '_', '.', ':'), "
            f"e.g. Argo's {{{{workflow.uid}}}} or KFP's job id; got {run_key!r}"
        )
    return run_key


def find_run(client: MlflowClient, experiment_id: str, run_key: str) -> str | None:
    """The newest MLflow run tagged with ``run_key`` (an earlier attempt of this step), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{check_run_key(run_key)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class RemoteStates:
    """The states in one MLflow run's ``train-state/`` artifacts."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @property
    def where(self) -> str:
        return f"MLflow run {self.run_id}'s artifacts ({STATE_ARTIFACTS}/)"

    def names(self) -> list[str]:
        """File names of the stored states, newest (highest step) first."""
        found = self.client.list_artifacts(self.run_id, STATE_ARTIFACTS)
        names = [Path(info.path).name for info in found if not info.is_dir]
        return sorted((n for n in names if n.startswith("step-") and n.endswith(".pt")), reverse=True)

    def download(self, name: str, folder: Path) -> Path:
        """Fetch one state into ``folder`` (renamed into place whole: a reader never sees part of it)."""
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
            fetched = self.client.download_artifacts(self.run_id, f"{STATE_ARTIFACTS}/{name}", scratch)
            target = folder / name
            os.replace(fetched, target)
        return target

    def upload(self, path: Path) -> None:
        """Store ``path`` (a complete state), then delete the older ones."""
        self.client.log_artifact(self.run_id, str(path), STATE_ARTIFACTS)
        stale = [name for name in self.names() if name < path.name]
        if stale:
            repository = get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
            for name in stale:
                repository.delete_artifacts(f"{STATE_ARTIFACTS}/{name}")


class Uploader:
    """Uploads the newest saved state in a background thread (see the module docstring)."""

    def __init__(self, remote: RemoteStates, staging: Path) -> None:
        self.remote, self.staging = remote, staging
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self._pending: Path | None = None
        self._closing = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="handoff-state-upload", daemon=True)
        self._thread.start()

    def offer(self, state: Path) -> None:
        """Queue a state just written (complete: states are written then renamed) for upload."""
        staged = self.staging / state.name
        staged.unlink(missing_ok=True)
        try:
            os.link(state, staged)  # the same bytes, kept even when the trainer prunes ``state``
        except OSError:  # a file system without hard links (some FUSE mounts): a copy then
            shutil.copyfile(state, staged)
        with self._wake:
            if self._pending is not None:
                self._pending.unlink(missing_ok=True)  # superseded before its upload began
            self._pending = staged
            self._wake.notify()

    def close(self) -> None:
        """Upload what is still waiting, then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                staged, self._pending = self._pending, None
                if staged is None:
                    return
            self._upload(staged)

    def _upload(self, staged: Path) -> None:
        started = time.perf_counter()
        try:
            size = staged.stat().st_size
            self.remote.upload(staged)
        except Exception as exc:  # noqa: BLE001 - whatever the store raised: training goes on
            _warn(f"could not store training state {staged.name} in {self.remote.where}: {exc}")
            return
        finally:
            staged.unlink(missing_ok=True)
        step = int(staged.stem.split("-")[1])
        print(
            f"handoff: training state at step {step} stored in {self.remote.where} "
            f"({size / 2**20:.1f} MiB in {time.perf_counter() - started:.2f} s)",
            file=sys.stderr,
            flush=True,
        )
