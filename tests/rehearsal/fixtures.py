"""Session fixtures of the cluster rehearsal: podman, the images, S3, the tracking server.

Load them in a test module with ``pytest_plugins = ["tests.rehearsal.fixtures"]``. Each part is
started once per session (per xdist worker) and stopped at its end; a part that cannot start
fails the tests that need it with the reason (no skips: a rehearsal that silently does not run
proves nothing). How long each part took is kept in ``rehearsal_timings`` and printed in the
terminal summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .images import Image, ImageBuilder
from .podman import Podman
from .s3 import S3, seaweedfs
from .tracking_server import TrackingServer, mlflow_server

# name -> seconds, in the order things happened (shown in the terminal summary)
TIMINGS: dict[str, float] = {}
# What the rehearsal's runs did (engine, outcome, what is served from where), for the summary.
SUMMARY: list[str] = []


@dataclass(frozen=True)
class RehearsalImages:
    """The session's images: the platform and the storage initializer, and projects on demand."""

    builder: ImageBuilder
    base: Image
    platform: Image
    storage_initializer: Image

    def project(self, project_dir: Path, *, git_sha: str | None = None) -> Image:
        """The image of a generated project (built on the platform image, cached by its inputs)."""
        image = self.builder.project(project_dir, git_sha=git_sha)
        _record(f"image {image.ref}", image)
        return image


def _record(name: str, image: Image) -> None:
    TIMINGS[f"{name} ({'built' if image.built else 'cached'})"] = image.seconds


@pytest.fixture(scope="session")
def rehearsal_timings() -> dict[str, float]:
    return TIMINGS


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """Podman with this session's containers.conf (fails with the packages to install if missing)."""
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def docker_host(podman: Podman) -> Iterator[str]:
    """``DOCKER_HOST`` for podman's Docker-compatible API (the ``docker`` SDK, kfp's DockerRunner)."""
    with podman.service() as url:
        yield url


@pytest.fixture(scope="session")
def rehearsal_images(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> RehearsalImages:
    """The base, platform and storage-initializer images: built the first time, then cached."""
    builder = ImageBuilder(podman, tmp_path_factory.mktemp("images"))
    images = {}
    for name, ensure in (
        ("base", builder.base),
        ("platform", builder.platform),
        ("storage_initializer", builder.storage_initializer),
    ):
        images[name] = ensure()
        _record(f"image {name}", images[name])
    return RehearsalImages(builder=builder, **images)


@pytest.fixture(scope="session")
def project_image(rehearsal_images: RehearsalImages) -> Callable[[Path], Image]:
    """A function: project folder -> its image (``rehearsal_images.project``)."""
    return rehearsal_images.project


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """SeaweedFS's S3 gateway with the ``mlflow`` and ``pipelines`` buckets and session keys."""
    started = time.monotonic()
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        TIMINGS["SeaweedFS start"] = time.monotonic() - started
        yield endpoint


@pytest.fixture(scope="session")
def tracking_server(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """``mlflow server`` (sqlite store) whose artifacts are ``s3://mlflow/...`` in ``s3``."""
    started = time.monotonic()
    with mlflow_server(s3, tmp_path_factory.mktemp("mlflow")) as server:
        TIMINGS["mlflow server start"] = time.monotonic() - started
        yield server


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("cluster rehearsal")
        for line in SUMMARY:
            terminalreporter.write_line(line)
    if TIMINGS:
        terminalreporter.section("cluster rehearsal timings")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{seconds:8.2f} s  {name}")
