"""The rehearsal's MLflow tracking server: ``mlflow server`` with its artifacts in the S3 bucket.

On a cluster the pipeline's pods log to a tracking server and register models whose artifacts
KServe's storage initializer later downloads. That only works when artifact URIs are ``s3://``
URIs, which MLflow gives in "direct" mode: ``--default-artifact-root s3://mlflow/`` with
``--no-serve-artifacts``. Clients (the pods, the tests) then write to the bucket themselves, with
the S3 variables of :meth:`S3.env`. (``--artifacts-destination`` would hand out
``mlflow-artifacts:/`` URIs that the storage initializer cannot read, and with
``--no-serve-artifacts`` it silently writes to a local ``./mlruns``.)

The backend store is sqlite in the session's folder; the server listens on 127.0.0.1 at a free
port (pods on the host network reach it there; MLflow refuses requests with foreign Host headers).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .podman import Background, RehearsalError, free_port, http_status
from .s3 import S3

ARTIFACT_ROOT = "s3://mlflow/"


@dataclass(frozen=True)
class TrackingServer:
    """A running tracking server: its URL, and the S3 its artifacts go to."""

    url: str
    s3: S3
    backend_store_uri: str
    artifact_root: str = ARTIFACT_ROOT

    def env(self) -> dict[str, str]:
        """What an MLflow client needs (a pod's env): the tracking URI and the bucket's S3 variables."""
        return {"MLFLOW_TRACKING_URI": self.url, **self.s3.env()}


def mlflow_executable() -> Path:
    executable = Path(sys.executable).parent / "mlflow"
    if not executable.is_file():
        raise RehearsalError(f"no `mlflow` beside {sys.executable}: run `make venv` (mlflow is in the lock)")
    return executable


@contextlib.contextmanager
def mlflow_server(s3: S3, state_dir: Path, *, timeout_s: float = 120.0) -> Iterator[TrackingServer]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store in ``state_dir`` and artifacts in
    ``s3://mlflow/``; waits until ``/health`` answers, stops it on exit."""
    if "mlflow" not in s3.buckets:
        raise RehearsalError(
            f"the tracking server stores artifacts in s3://mlflow/; {s3.endpoint_url} has {s3.buckets}"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = f"sqlite:///{state_dir / 'mlflow.db'}"
    command = [
        str(mlflow_executable()),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # two cores: one worker is plenty for a test session
        "--backend-store-uri",
        backend,
        "--default-artifact-root",
        ARTIFACT_ROOT,
        "--no-serve-artifacts",
    ]
    # The server writes artifacts for some requests itself (e.g. model version copies): it needs the
    # same S3 settings as the clients. MLFLOW_* variables of the caller would repoint it: drop them.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = TrackingServer(url=f"http://127.0.0.1:{port}", s3=s3, backend_store_uri=backend)
    process = Background.start(
        "mlflow server", command, env={**environment, **s3.env()}, log=state_dir / "mlflow.log", cwd=state_dir
    )
    try:
        process.wait_until(lambda: http_status(f"{server.url}/health", timeout_s=2) == 200, timeout_s, 0.25)
        yield server
    finally:
        process.stop()
