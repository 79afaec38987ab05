"""Start, find and stop the project's local model server (a detached child process).

The server outlives the step that started it (``make run`` leaves it serving), so what identifies
it (pid, process start time, spec file, and the project folder it serves) lives in the project's
state folder (``Project.state_dir``, outside the project), as ``server.json``; ``handoff stop``
and the next deploy use it, and neither acts on a server recorded for another folder. The
listening socket is bound here and handed to the child, so a busy port is reported before anything
is stopped, and no other program can take the port in between.

Changing versions (blue/green) refuses no connection: the new server is handed the very
listening socket the old one accepts on (``listener_of``: the old server gives it over a Unix
socket, as Envoy's hot restart does), starts accepting from it once it passed its checks
(``take_over``), and only then does the old one stop accepting and finish its requests
(``retire``). One socket, one queue: nothing waiting in it is lost when the old server exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests

from handoff.errors import HandoffError
from handoff.files import write_json
from handoff.settings import ServingSettings

STATE_FILE = "server.json"
LOCK_FILE = "deploy.lock"
# The run's own plumbing: a server that outlives the run must not point at its scratch folders.
RUN_ONLY_ENV = ("TMPDIR", "HANDOFF_ERROR_FILE", "HANDOFF_FORKSERVER_SOCKET", "HANDOFF_FORKSERVER_PYTHON")
DEFAULT_GRACE_S = ServingSettings().shutdown_grace_s  # a spec without shutdown_grace_s


@dataclass(frozen=True)
class ServerHandle:
    """What identifies a running server: pid plus start time (pids are reused) and its spec."""

    pid: int
    started: float
    spec: str
    url: str
    model_name: str
    version: str
    log: str
    handover: str = ""  # the Unix socket where the server gives its listening socket to the next
    project: str = ""  # the project folder it serves (absolute): only that project's deploy retires it


@contextlib.contextmanager
def deploy_lock(state_dir: Path) -> Iterator[None]:
    """One deploy at a time per project: two would each stop the other's server and orphan one."""
    with (state_dir / LOCK_FILE).open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bind(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """Bind a server socket here (port 0 = any free one), with the setting to change on failure.

    ``listen`` False leaves it bound but deaf until a server takes it over: the kernel sends it no
    connections before then, and no other program can take the port meanwhile.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        _bind(sock, host, port)
    except HandoffError:
        sock.close()
        raise
    if listen:
        sock.listen(128)
    return sock


def _bind(sock: socket.socket, host: str, port: int) -> None:
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise HandoffError(
            f"cannot listen on {host}:{port} ({exc.strerror}); stop the program using it or set "
            "serving.port (0 = any free port)",
            file="handoff.yaml",
            field="serving.port",
        ) from None


def handover_path(base: Path | None = None) -> Path:
    """A new address for a server's handover socket: short (Unix socket paths are limited to about
    100 bytes) and in a folder only this user can enter (whoever connects gets the socket)."""
    if base is None:
        # /tmp, not $TMPDIR: a pipeline run points TMPDIR at its own (long) scratch folder.
        base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    folder = base / f"handoff-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    found = folder.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise HandoffError(
            f"{folder} (where model servers hand their port over) must be a folder owned by this "
            f"user that nobody else can enter (mode 0700); it is not: remove it, then deploy again"
        )
    return folder / f"{uuid.uuid4().hex[:16]}.sock"


def serving_marker(spec_file: Path | str) -> Path:
    """The file a server writes once it accepts on the socket it took over."""
    return Path(f"{spec_file}.serving")


def listener_of(handle: ServerHandle) -> socket.socket:
    """The listening socket ``handle``'s server accepts on, received from it, for the next version."""
    if not handle.handover:
        raise HandoffError(
            f"the running server (pid {handle.pid}, started by an earlier version of handoff) cannot "
            "hand its port over: run `handoff stop`, then deploy again"
        )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(handle.handover)
            _, fds, _, _ = socket.recv_fds(conn, 16, 1)
    except OSError as exc:
        raise HandoffError(
            f"the running server (pid {handle.pid}) did not hand over its listening socket at "
            f"{handle.handover} ({exc.strerror or exc}; see {handle.log}): run `handoff stop`, then "
            "deploy again (the port is down in between)"
        ) from None
    if not fds:
        raise HandoffError(
            f"the running server (pid {handle.pid}) has stopped accepting; see {handle.log}: run "
            "`handoff stop`, then deploy again"
        )
    listening = socket.socket(fileno=fds[0])
    if not listening.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listening.close()
        raise HandoffError(
            f"the running server (pid {handle.pid}) handed over a socket that is not listening"
        )
    return listening


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def alive(handle: ServerHandle) -> bool:
    """True only for the very process recorded (same pid, start time and spec file)."""
    try:
        process = psutil.Process(handle.pid)
        return (
            abs(process.create_time() - handle.started) < 1.0
            and handle.spec in process.cmdline()
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def current(state_dir: Path, project: Path | None = None) -> ServerHandle | None:
    """The running server recorded in ``state_dir``, or None (also for a stale or corrupt record).

    With ``project``, a server recorded for another folder is not this project's (a state folder
    copied or shared by hand): None, so nothing here ever retires or stops it.
    """
    path = state_dir / STATE_FILE
    try:
        handle = ServerHandle(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if project is not None and handle.project != str(project):
        return None
    return handle if alive(handle) else None


def _grace_s(handle: ServerHandle) -> float:
    """How long the server may take to finish its requests after SIGTERM (its spec's
    ``shutdown_grace_s``), and a little for its exit."""
    try:
        grace = float(json.loads(Path(handle.spec).read_text()).get("shutdown_grace_s", DEFAULT_GRACE_S))
    except (OSError, ValueError, TypeError, AttributeError):
        grace = DEFAULT_GRACE_S
    return grace + 5.0


def terminate(handle: ServerHandle, timeout_s: float | None = None) -> None:
    """SIGTERM one server (it finishes the requests it received and exits 0), SIGKILL after
    ``timeout_s`` (default: its ``shutdown_grace_s`` and a few seconds)."""
    if timeout_s is None:
        timeout_s = _grace_s(handle)
    if alive(handle):
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(handle.pid)
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except psutil.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
    if handle.handover:  # the server removes it as it exits, unless it had to be killed
        Path(handle.handover).unlink(missing_ok=True)


def record(state_dir: Path, handle: ServerHandle) -> None:
    """Make ``handle`` the project's recorded server (what `handoff stop` and deploy act on)."""
    write_json(state_dir / STATE_FILE, asdict(handle))


def stop(state_dir: Path, timeout_s: float | None = None, project: Path | None = None) -> ServerHandle | None:
    """Stop the project's recorded server, if one is running (and, with ``project``, serves it)."""
    handle = current(state_dir, project)
    if handle is not None:
        terminate(handle, timeout_s)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    elif current(state_dir) is None:  # stale: nothing is running under it
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    return handle


def start(
    spec_file: Path,
    sock: socket.socket,
    *,
    model_name: str,
    version: str,
    state_dir: Path,
    ready_timeout_s: float,
    takeover: socket.socket | None = None,
    handover: Path | None = None,
    project: Path | None = None,
) -> ServerHandle:
    """Start ``python -m handoff.serving spec_file`` on ``sock``, detached, and wait until ready.

    With ``takeover`` (the project's socket: bound and not listening, or the running server's
    listening socket), the handle's URL is the takeover's: where the server will serve once
    ``take_over`` has been called; until then only ``sock`` reaches it. ``handover`` is where the
    spec told the server to offer that socket to the next version. The caller records the handle
    (``record``) once it is the project's server.
    """
    log = state_dir / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in RUN_ONLY_ENV}
    fds = [sock.fileno()] + ([takeover.fileno()] if takeover is not None else [])
    check_url = url_of(sock)
    url = url_of(takeover) if takeover is not None else check_url
    try:
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "handoff.serving", str(spec_file), *map(str, fds)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=fds,
                start_new_session=True,  # outlives the pipeline step and ignores its Ctrl-C
            )
    finally:
        for passed in (sock, takeover):
            if passed is not None:
                passed.close()  # the child holds them now (or there is no child)
    handle = ServerHandle(
        pid=process.pid,
        started=psutil.Process(process.pid).create_time(),
        spec=str(spec_file),
        url=url,
        model_name=model_name,
        version=version,
        log=str(log),
        handover=str(handover or ""),
        project=str(project or ""),
    )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HandoffError(
                f"the model server exited with code {process.returncode} before it was "
                f"ready; last lines of {log}:\n{_tail(log)}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{check_url}/v2/health/ready", timeout=1).status_code == 200:
                return handle
        time.sleep(0.1)
    terminate(handle)
    raise HandoffError(
        f"the model server was not ready within {ready_timeout_s:g} s; last lines of {log}:\n{_tail(log)}",
        file="handoff.yaml",
        field="serving.ready_timeout_s",
    )


def take_over(handle: ServerHandle, timeout_s: float = 10.0) -> None:
    """Make the server started with a takeover socket accept on it (SIGUSR1), and wait until it does."""
    marker = serving_marker(handle.spec)
    deadline = time.monotonic() + timeout_s
    try:
        psutil.Process(handle.pid).send_signal(signal.SIGUSR1)
        while time.monotonic() < deadline:
            if marker.exists():
                return
            if not alive(handle):
                break
            time.sleep(0.01)
    except psutil.Error:
        pass
    raise HandoffError(
        f"the new model server did not take over {handle.url} within {timeout_s:g} s; see {handle.log}"
    )


def retire(handle: ServerHandle, drain_s: float = 3.0) -> None:
    """Retire a server whose socket the next version accepts on: SIGUSR2 makes it stop accepting
    and answer with ``Connection: close``, so its clients' next requests open connections to the
    new server; once its connections are gone (or after ``drain_s``) SIGTERM finishes the rest."""
    if alive(handle):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(handle.pid)
            process.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline:
                if not any(c.status == psutil.CONN_ESTABLISHED for c in process.connections("tcp")):
                    break
                time.sleep(0.02)
    terminate(handle)  # also removes its handover socket
