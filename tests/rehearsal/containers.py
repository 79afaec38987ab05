"""What a pod's container asks for, as one value the rehearsal's engines hand to podman."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    """A host folder or file bind-mounted into the container."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    """One container run to completion (or started detached), as its pod spec says.

    The security settings mirror a pod's: ``user``/``group`` (runAsUser/runAsGroup),
    ``read_only`` (readOnlyRootFilesystem), ``cap_drop`` (capabilities.drop),
    ``no_new_privileges`` (allowPrivilegeEscalation: false), ``seccomp`` (RuntimeDefault is the
    engine's default profile). ``tmpfs`` are emptyDirs (path -> size, "" for no limit).
    ``cpus``/``memory`` are the limits (Kubernetes quantities: "1", "500m", "2Gi").
    """

    image: str
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: int | None = None
    group: int | None = None
    read_only: bool = False
    cap_drop: tuple[str, ...] = ()
    no_new_privileges: bool = False
    seccomp: str = "RuntimeDefault"
    tmpfs: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    cpus: str | None = None
    memory: str | None = None
    network: str = "host"  # the services (S3, MLflow, the fake API server) listen on 127.0.0.1
    # container port -> host port on 127.0.0.1 (a Service's port; needs a network other than host)
    ports: dict[int, int] = field(default_factory=dict)
    workdir: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Finished:
    """How a container ended: its exit code, its output, and its termination message."""

    exit_code: int
    stdout: str
    stderr: str
