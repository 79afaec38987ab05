"""Podman as the rehearsal's container engine: runs a :class:`ContainerSpec` as a pod would.

Podman runs real OCI containers here (as root, with runc) where no Docker daemon and no
Kubernetes exist. Every call carries its own ``containers.conf`` (written into a state folder and
named by ``CONTAINERS_CONF``), so nothing in ``/etc`` is changed and every caller gets the same
settings: ``default_ulimits = []`` (the machine refuses podman's default RLIMIT_NOFILE),
``cgroup_manager = "cgroupfs"`` and ``runtime = "runc"`` (crun rejects this cgroup layout).

Each :class:`ContainerSpec` field maps onto one ``podman run`` flag, chosen so the container gets
what a kubelet would give it: the declared tmpfs are the only writable paths under
``readOnlyRootFilesystem``; limits are cgroup limits; nothing is pulled from a registry.
:meth:`Podman.service` serves podman's Docker-compatible API for engines that speak Docker
(kfp.local's ``DockerRunner`` through the ``docker`` SDK).

This module also holds the small process helpers the rehearsal's services (SeaweedFS, MLflow)
share: a free port, a background process with a log file, and a wait for an HTTP answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from .containers import ContainerSpec, Finished

# Debian packages: podman (the engine), runc (the OCI runtime podman's default, crun, cannot use
# on this machine's cgroup layout), debootstrap (the base image, see images.py).
APT_PACKAGES = ("podman", "runc", "debootstrap")
CONTAINERS_CONF = """\
# Written by tests/rehearsal/podman.py for this session's podman calls (CONTAINERS_CONF).
[containers]
# The machine refuses podman's default RLIMIT_NOFILE ("setrlimit: Operation not permitted").
default_ulimits = []
# Plain files: `podman logs` works without journald.
log_driver = "k8s-file"

[engine]
# crun refuses this machine's cgroup layout ("cgroups in hybrid mode not supported"); no systemd.
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"""
# The global flags that say the same as the file, for the long-running `system service`, whose
# own settings must not depend on which containers.conf a later reader finds.
GLOBAL_FLAGS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")
# Exit status podman uses for its own errors (the container never ran).
PODMAN_ERROR = 125
SECCOMP_PROFILES = ("RuntimeDefault", "Unconfined")


class RehearsalError(RuntimeError):
    """A part of the rehearsal could not start or run; the message says which and why."""


# -- Kubernetes quantities -> podman values ------------------------------------------------------

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E))?$")
_SUFFIXES = {
    **{suffix: Decimal(2) ** (10 * n) for n, suffix in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)},
    **{suffix: Decimal(10) ** (3 * n) for n, suffix in enumerate(("k", "M", "G", "T", "P", "E"), 1)},
    "m": Decimal("0.001"),
}


def quantity(value: str) -> Decimal:
    """A Kubernetes quantity ("500m", "2Gi", "1.5", "1e3") as a number."""
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 1, 256Mi, 2Gi)")
    number, exponent, suffix = match.groups()
    if exponent is not None:
        return Decimal(number) * Decimal(10) ** int(exponent)
    return Decimal(number) * _SUFFIXES.get(suffix or "", Decimal(1))


def cpus_flag(value: str) -> str:
    """``--cpus`` for a CPU quantity: "500m" -> "0.5", "2" -> "2"."""
    cores = quantity(value)
    if cores <= 0:
        raise ValueError(f"a CPU limit must be positive, got {value!r}")
    return format(cores.normalize(), "f")


def bytes_flag(value: str) -> str:
    """A memory quantity in podman's (and tmpfs') units, powers of 1024: "2Gi" -> "2g", else bytes."""
    amount = quantity(value)
    if amount <= 0 or amount != amount.to_integral_value():
        raise ValueError(f"a memory amount must be a positive whole number of bytes, got {value!r}")
    size = int(amount)
    for unit, factor in (("g", 2**30), ("m", 2**20), ("k", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)  # a plain number is bytes for --memory and for tmpfs' size=


# -- ContainerSpec -> podman run ------------------------------------------------------------------


def run_arguments(spec: ContainerSpec) -> list[str]:
    """Everything after ``podman run`` for ``spec``: flags, the image, then the args.

    No engine is involved, so the mapping can be read and checked on its own.
    """
    flags: list[str] = ["--pull=never"]  # images are built here; a registry is never asked
    if spec.name:
        flags += ["--name", spec.name]
    if spec.user is not None:
        flags += ["--user", f"{spec.user}:{spec.group}" if spec.group is not None else str(spec.user)]
    elif spec.group is not None:
        raise ValueError("a group without a user cannot be expressed with podman --user")
    if spec.read_only:
        # Without --read-only-tmpfs=false podman adds writable /tmp, /var/tmp and /run; a pod's
        # root file system has none of them, only the emptyDirs it declares.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    for capability in spec.cap_drop:
        flags += ["--cap-drop", capability]
    if spec.no_new_privileges:
        flags += ["--security-opt", "no-new-privileges"]
    if spec.seccomp == "Unconfined":
        flags += ["--security-opt", "seccomp=unconfined"]
    elif spec.seccomp != "RuntimeDefault":  # RuntimeDefault: podman's default profile
        raise ValueError(
            f"seccomp {spec.seccomp!r} is not supported here; expected one of {SECCOMP_PROFILES}"
        )
    for path, size in spec.tmpfs.items():
        # An emptyDir: empty (podman would copy the image's files there: notmpcopyup), writable
        # and executable (podman's tmpfs default is noexec, a disk-backed emptyDir is not).
        options = "rw,exec,nosuid,nodev,notmpcopyup" + (f",size={bytes_flag(size)}" if size else "")
        flags += ["--tmpfs", f"{path}:{options}"]
    for mount in spec.mounts:
        if not mount.source.exists():
            raise RehearsalError(f"mount source {mount.source} does not exist (for {mount.target})")
        flags += ["-v", f"{mount.source}:{mount.target}:{'ro' if mount.read_only else 'rw'}"]
    if spec.cpus is not None:
        flags += ["--cpus", cpus_flag(spec.cpus)]
    if spec.memory is not None:
        flags += ["--memory", bytes_flag(spec.memory)]
    flags += ["--network", spec.network]
    for container_port, host_port in spec.ports.items():
        if spec.network in ("host", "none"):
            raise ValueError(f"ports cannot be published with --network {spec.network}")
        flags += ["-p", f"127.0.0.1:{host_port}:{container_port}"]
    if spec.workdir:
        flags += ["--workdir", spec.workdir]
    for key, value in spec.env.items():
        flags += ["--env", f"{key}={value}"]
    if spec.command:
        # Kubernetes' command replaces the image's ENTRYPOINT (and drops its CMD); args follow.
        flags += ["--entrypoint", json.dumps(spec.command)]
    return [*flags, spec.image, *spec.args]


# -- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now (the caller binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


@dataclass
class Background:
    """A process started for the rehearsal, its output in a log file; stopped by :meth:`stop`."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls, name: str, command: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path
    ) -> Background:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            # Its own session: stop() signals the whole group, children included.
            process = subprocess.Popen(
                list(command), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(name, process, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def failure(self, what: str) -> RehearsalError:
        status = "still running" if self.alive() else f"exited with {self.process.returncode}"
        return RehearsalError(f"{self.name} {what} ({status}); its log ({self.log}) ends:\n{tail(self.log)}")

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> None:
        """Poll ``ready`` until it holds; fail early (with the log) if the process dies."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.failure("stopped before it was ready")
            if ready():
                return
            time.sleep(interval_s)
        raise self.failure(f"was not ready after {timeout_s:.0f} s")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace_s)


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """The HTTP status of GET ``url``, or None when nothing answers."""
    import requests

    try:
        return requests.get(url, timeout=timeout_s).status_code
    except requests.RequestException:
        return None


# -- podman ---------------------------------------------------------------------------------------


def _find_runc() -> str | None:
    # runc lives in /usr/sbin on Debian, which a non-login PATH may lack.
    return shutil.which("runc") or shutil.which("runc", path="/usr/sbin:/sbin:/usr/bin")


class Podman:
    """Podman with this session's containers.conf; every method runs one podman command.

    ``state_dir`` holds the containers.conf, logs and the API socket; images and layers stay in
    podman's own storage, so built images outlive the session (the image cache relies on it).
    """

    def __init__(self, state_dir: Path, *, executable: str = "podman") -> None:
        found = shutil.which(executable)
        missing = [name for name, path in (("podman", found), ("runc", _find_runc())) if path is None]
        if missing:
            raise RehearsalError(
                f"the cluster rehearsal needs {' and '.join(missing)} (not found on PATH): install the "
                f"Debian packages with `apt-get install -y {' '.join(APT_PACKAGES)}` (.ci/run does)"
            )
        if os.geteuid() != 0:
            # Verified as root only: rootless podman on this cgroup v1 machine cannot set the
            # cpu/memory limits the pods declare.
            raise RehearsalError("the cluster rehearsal runs podman as root (uid 0); run the tests as root")
        self.executable = str(found)
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.conf = state_dir / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        environment = {
            k: v for k, v in os.environ.items() if k not in ("CONTAINER_HOST", "CONTAINER_CONNECTION")
        }
        self.env = {**environment, "CONTAINERS_CONF": str(self.conf)}

    def command(self, *args: str) -> list[str]:
        return [self.executable, *GLOBAL_FLAGS, *args]

    def call(
        self, *args: str, timeout_s: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """One podman command; a failure (with ``check``) raises with podman's own message."""
        try:
            result = subprocess.run(
                self.command(*args),
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as expired:
            raise RehearsalError(
                f"`podman {' '.join(args[:3])} ...` took over {timeout_s:.0f} s"
            ) from expired
        if check and result.returncode != 0:
            raise RehearsalError(
                f"`podman {' '.join(args)}` exited with {result.returncode}:\n{result.stderr[-3000:]}"
            )
        return result

    # containers

    def run(self, spec: ContainerSpec, timeout_s: float = 600.0) -> Finished:
        """Run ``spec`` to completion (removed afterwards) and return how it ended.

        A container that outlives ``timeout_s`` is killed and reported as an error, with its output.
        """
        named = spec if spec.name else replace(spec, name=f"rehearsal-{uuid.uuid4().hex[:12]}")
        assert named.name is not None
        try:
            result = subprocess.run(
                self.command("run", "--rm", *run_arguments(named)),
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as expired:
            output = self.logs(named.name)
            self.remove(named.name)
            raise RehearsalError(
                f"container {named.name} ({spec.image}) did not finish in {timeout_s:.0f} s; output:\n"
                f"{output[-3000:]}"
            ) from expired
        if result.returncode == PODMAN_ERROR and "Error: " in result.stderr:
            raise RehearsalError(f"podman could not run {spec.image}:\n{result.stderr[-3000:]}")
        return Finished(exit_code=result.returncode, stdout=result.stdout, stderr=result.stderr)

    def start(self, spec: ContainerSpec) -> str:
        """Start ``spec`` detached; returns the container id (kept after exit for :meth:`logs`)."""
        result = self.call("run", "--detach", *run_arguments(spec), timeout_s=120)
        return result.stdout.strip().splitlines()[-1]

    def stop(self, container: str, grace_s: int = 10, *, remove: bool = True) -> None:
        """SIGTERM, SIGKILL after ``grace_s`` (as the kubelet does); then remove it."""
        self.call("stop", "--ignore", "--time", str(grace_s), container, timeout_s=grace_s + 60)
        if remove:
            self.remove(container)

    def remove(self, container: str) -> None:
        self.call("rm", "--force", "--ignore", "--time", "0", container, timeout_s=60)

    def logs(self, container: str) -> str:
        """The container's output so far (stdout and stderr in order), or "" if it is gone."""
        result = subprocess.run(
            self.command("logs", container),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=60,
        )
        return result.stdout if result.returncode == 0 else ""

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.call("container", "inspect", container).stdout)
        return data[0]

    def running(self, container: str) -> bool:
        result = self.call("container", "inspect", "--format", "{{.State.Running}}", container, check=False)
        return result.returncode == 0 and result.stdout.strip() == "true"

    def wait(self, container: str, timeout_s: float = 600.0) -> int:
        """Block until the container exits; its exit code."""
        return int(self.call("wait", container, timeout_s=timeout_s).stdout.strip().splitlines()[-1])

    # images

    def image_exists(self, ref: str) -> bool:
        return self.call("image", "exists", ref, check=False).returncode == 0

    def image_id(self, ref: str) -> str:
        return self.call("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()

    def image_digest(self, ref: str) -> str:
        """The manifest digest (``sha256:...``): ``<repository>@<digest>`` runs this very image."""
        return self.call("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()

    def image_tags(self, repository: str) -> list[tuple[str, float]]:
        """``(ref, created)`` of every tag of ``repository``, newest first."""
        result = self.call("images", "--format", "json", repository)
        images = json.loads(result.stdout or "[]")
        tags = [
            (name, float(image.get("Created", 0)))
            for image in images
            for name in image.get("Names") or []
            if name.rsplit(":", 1)[0] == repository
        ]
        return sorted(tags, key=lambda tag: tag[1], reverse=True)

    def remove_image(self, ref: str) -> bool:
        """Untag ``ref`` (its layers go when nothing else uses them); False if it is in use."""
        return self.call("rmi", ref, check=False, timeout_s=300).returncode == 0

    def build(
        self,
        context: Path,
        *,
        tag: str,
        dockerfile: Path | None = None,
        build_args: dict[str, str] | None = None,
        volumes: Sequence[tuple[Path, str]] = (),
        network: str = "host",
        layers: bool = False,
        log: Path,
        timeout_s: float = 1800.0,
    ) -> str:
        """``podman build``; returns the image id. ``volumes`` are read-only build-time mounts
        (``RUN`` sees them, the image does not keep them). Without ``layers`` no intermediate
        images are kept: a caller that caches whole images by their inputs gains little from them,
        and a multi-stage build would leave its build stage (GBs) behind at every change. The
        platform image is the exception: its dependency layer is kept, and reused by every change
        of the code above it (components/Dockerfile)."""
        iidfile = log.with_suffix(".iid")
        args = [
            "build",
            "--pull=never",
            f"--layers={str(layers).lower()}",
            "--network",
            network,
            "--iidfile",
            str(iidfile),
            "-t",
            tag,
        ]
        if dockerfile is not None:
            args += ["-f", str(dockerfile)]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        for source, target in volumes:
            args += ["-v", f"{source}:{target}:ro"]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            try:
                result = subprocess.run(
                    self.command(*args, str(context)),
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                )
            except subprocess.TimeoutExpired as expired:
                raise RehearsalError(
                    f"building {tag} took over {timeout_s:.0f} s; log {log}:\n{tail(log)}"
                ) from expired
        if result.returncode != 0:
            raise RehearsalError(f"building {tag} failed ({result.returncode}); log {log} ends:\n{tail(log)}")
        return iidfile.read_text().strip()

    def import_rootfs(
        self, rootfs: Path, ref: str, *, changes: Sequence[str] = (), timeout_s: float = 600.0
    ) -> str:
        """``tar -C rootfs -c . | podman import - ref`` (numeric owners); returns the image id."""
        change_args = [arg for change in changes for arg in ("--change", change)]
        archive = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        try:
            result = subprocess.run(
                self.command("import", *change_args, "-", ref),
                env=self.env,
                stdin=archive.stdout,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout_s,
            )
        finally:
            assert archive.stdout is not None
            archive.stdout.close()
            archive.wait(timeout=60)
        if result.returncode != 0 or archive.returncode != 0:
            raise RehearsalError(f"podman import of {rootfs} as {ref} failed:\n{result.stderr[-3000:]}")
        return result.stdout.strip().splitlines()[-1]

    # the Docker-compatible API

    @contextlib.contextmanager
    def service(self, socket_path: Path | None = None, timeout_s: float = 30.0) -> Iterator[str]:
        """Serve podman's Docker-compatible API on a unix socket; yields the ``DOCKER_HOST`` value.

        Engines written for Docker (the ``docker`` SDK, kfp.local's DockerRunner) then run their
        containers here. The service inherits this session's containers.conf and runs with the
        runtime and cgroup flags, so its containers get the same settings as :meth:`run`.
        """
        path = socket_path or self.state_dir / "docker-api.sock"
        if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
            raise RehearsalError(f"socket path {path} is too long for a unix socket")
        path.unlink(missing_ok=True)
        server = Background.start(
            "podman system service",
            self.command("system", "service", "--time=0", f"unix://{path}"),
            env=self.env,
            log=self.state_dir / "docker-api.log",
            cwd=self.state_dir,
        )
        try:
            server.wait_until(lambda: _docker_ping(path), timeout_s)
            yield f"unix://{path}"
        finally:
            server.stop()
            path.unlink(missing_ok=True)


def _docker_ping(path: Path) -> bool:
    """The Docker API's ``GET /_ping`` over the unix socket answers OK."""
    if not path.exists():
        return False
    connection = _UnixHTTPConnection(path)
    try:
        connection.request("GET", "/_ping")
        response = connection.getresponse()
        return response.status == 200 and response.read().strip() == b"OK"
    except OSError:
        return False
    finally:
        connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=2)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(str(self.path))
