"""Start, find and stop the project's local model server (a detached child process).

The server outlives the step that started it (``make run`` leaves it serving), so its pid, URL
and log live in ``<project>/.handoff/server.json``; ``handoff stop`` and the next deploy use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from handoff.errors import HandoffError
from handoff.files import read_json, write_json

STATE_FILE = "server.json"


@dataclass(frozen=True)
class ServerHandle:
    pid: int
    url: str
    model_name: str
    version: str
    log: str


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int) -> None:
    """Fail with the setting to change, rather than a bind error buried in the server log."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise HandoffError(
                f"{host}:{port} is not available ({exc.strerror}); stop the program "
                "using it or set serving.port (0 = any free port)",
                file="handoff.yaml",
                field="serving.port",
            ) from None


def _is_our_server(pid: int) -> bool:
    """Guard against signalling a recycled pid that now belongs to another program."""
    try:
        return b"handoff.serving" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def current(state_dir: Path) -> ServerHandle | None:
    """The running server recorded in ``state_dir``, or None."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    handle = ServerHandle(**read_json(path))
    return handle if _is_our_server(handle.pid) else None


def stop(state_dir: Path, timeout_s: float = 15.0) -> ServerHandle | None:
    """SIGTERM the recorded server and wait for it (SIGKILL after ``timeout_s``)."""
    handle = current(state_dir)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    if handle is None:
        return None
    os.kill(handle.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _is_our_server(handle.pid) and time.monotonic() < deadline:
        _reap(handle.pid)
        time.sleep(0.05)
    if _is_our_server(handle.pid):
        os.kill(handle.pid, signal.SIGKILL)
    _reap(handle.pid)
    return handle


def _reap(pid: int) -> None:
    """Collect the exit status when the server is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def start(
    spec_file: Path, *, url: str, model_name: str, version: str, state_dir: Path, ready_timeout_s: float
) -> ServerHandle:
    """Start ``python -m handoff.serving spec_file`` detached and wait until it is ready."""
    log = state_dir / "server.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "handoff.serving", str(spec_file)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the pipeline step and ignores its Ctrl-C
        )
    handle = ServerHandle(pid=process.pid, url=url, model_name=model_name, version=version, log=str(log))
    write_json(state_dir / STATE_FILE, asdict(handle))
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            (state_dir / STATE_FILE).unlink(missing_ok=True)
            raise HandoffError(
                f"the model server exited with code {process.returncode} before it was "
                f"ready; last lines of {log}:\n{_tail(log)}"
            )
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(0.1)
    stop(state_dir)
    raise HandoffError(
        f"the model server was not ready within {ready_timeout_s:g} s "
        f"(serving.ready_timeout_s); last lines of {log}:\n{_tail(log)}",
        file="handoff.yaml",
    )
