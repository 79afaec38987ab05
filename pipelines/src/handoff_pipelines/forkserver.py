"""Warm step processes for local runs: a fork server with the step libraries already imported.

kfp.local starts every step as a new Python process (``<python> -m kfp.dsl.executor_main ...``),
so each step used to pay interpreter start-up and the imports of torch, MLflow, ONNX and the
project's own model.py imports (~3 s a step) before doing any work. Here one server process
imports all of that once; each step process is a ``fork()`` of it, started through a tiny client
that stands in for the Python executable (kfp.local launches ``sys.executable``). The client
hands over its argv, environment, working folder and stdin/stdout/stderr, and exits with the
step's exit code, so kfp.local sees an ordinary process.

Anything the client does not recognise (not ``-m MODULE ...``) or a missing server makes it
``exec`` the real interpreter instead: a local run is never less correct, only slower.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import ctypes
import importlib
import importlib.util
import io
import json
import os
import runpy
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

SOCKET_ENV = "HANDOFF_FORKSERVER_SOCKET"
PYTHON_ENV = "HANDOFF_FORKSERVER_PYTHON"
# What every step imports; model.py's own imports are added by importing model.py itself.
PRELOAD = (
    "kfp.dsl.executor",  # not executor_main: runpy warns when the module it runs is already loaded
    "handoff.steps.train",
    "handoff.steps.export",
    "handoff.steps.optimize",
    "onnxruntime.quantization",  # optimize's int8 forms (~0.5 s on first use)
    "handoff.steps.evaluate",
    "handoff.steps.register",
    "handoff.steps.deploy",
    "onnxscript",
    "torch._dynamo",  # the ONNX exporter and the optimizers import it on first use (~0.8 s)
    # MLflow imports its sqlite stores on first use (~0.6 s); only modules, no connections.
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)
EXIT_DIED = 70  # the step process ended without reporting (killed by a signal)


def _send_message(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("!I", len(payload)) + payload)


def _receive_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _receive_message(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!I", _receive_exact(sock, 4))
    return _receive_exact(sock, size)


# --- the server -------------------------------------------------------------------------------


def _run_child(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked process: become the step process the client asked for, report its exit code."""
    me, code = os.getpid(), 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # a step behaves like a freshly started Python
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # TMPDIR comes from the step's environment
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)  # kfp.local streams the log line by line
        # As `python -m` would: the working folder, then PYTHONPATH, ahead of the rest.
        extra = [request["cwd"], *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        sys.path[:0] = [p for p in extra if p not in sys.path]
        sys.argv = [request["module"], *request["args"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the step's own crash: report it like Python would
        traceback.print_exc()
    if os.getpid() == me:  # not a process the step forked, which unwinds through here too
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            _send_message(conn, json.dumps({"code": code}).encode())
    conn.close()
    _finish(code)


def _finish(code: int) -> NoReturn:
    """End like a `python -m` process would, without tearing down the server's whole interpreter.

    Non-daemon threads are joined, atexit handlers run and C stdio buffers are flushed, then the
    process exits at once (a full interpreter finalisation of everything the server imported is
    slow and has been seen to spin).
    """
    # What the interpreter itself calls at exit: runs threading's own exit hooks (which tell
    # thread pools such as MLflow's downloaders to stop), then joins non-daemon threads.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        with contextlib.suppress(Exception):
            shutdown()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)  # printf output of extensions, when stdout is a pipe
    os._exit(code)


def preload_model_imports(project_dir: Path) -> None:
    """Import what model.py imports from installed packages, without running model.py itself.

    Running it here would run its top-level code once in this process and again in every step
    (a second TORCH_LIBRARY registration fails), and could start thread pools that do not survive
    fork(). Its imports are the expensive part anyway (scikit-learn alone is ~1 s).
    """
    try:
        tree = ast.parse((project_dir / "model.py").read_bytes())
    except (OSError, SyntaxError, ValueError):
        return
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    for name in names:
        with contextlib.suppress(Exception):
            spec = importlib.util.find_spec(name.split(".")[0])
            if spec is None or spec.origin is None or Path(spec.origin).resolve().is_relative_to(project_dir):
                continue  # a helper beside model.py runs project code: leave it to the step
            importlib.import_module(name)


def serve(socket_path: str, project_dir: str) -> None:
    """Import the step libraries and model.py's imports, then fork one child per request.

    Exits, stopping its running steps, when its parent (the local runner) closes our stdin.
    """
    for module in PRELOAD:
        with contextlib.suppress(ImportError):  # a missing extra only costs its step the import
            importlib.import_module(module)
    preload_model_imports(Path(project_dir).resolve())
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished children are reaped automatically
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(16)
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
            for pid in children:  # the run is gone: so are its steps
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            return
        if server not in ready:
            continue
        conn, _ = server.accept()
        fds: list[int] = []
        try:
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            request = json.loads(_receive_message(conn))
            if len(fds) != 3:
                raise ValueError("expected stdin, stdout and stderr")
        except (OSError, ValueError, ConnectionError, struct.error):
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            _run_child(conn, request, fds)
        children = {p for p in children if _exists(p)} | {pid}
        conn.close()
        for fd in fds:
            os.close(fd)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the client (stands in for the Python executable) -----------------------------------------


def client_main(argv: list[str] | None = None) -> None:
    """Entry point of ``handoff-step-python``: run ``-m MODULE ARGS`` in a fork of the server."""
    args = sys.argv[1:] if argv is None else argv
    real_python = os.environ.get(PYTHON_ENV, sys.executable)
    socket_path = os.environ.get(SOCKET_ENV)
    if not socket_path or len(args) < 2 or args[0] != "-m":
        os.execv(real_python, [real_python, *args])
    request = {"module": args[1], "args": args[2:], "cwd": os.getcwd(), "env": dict(os.environ)}
    payload = json.dumps(request).encode()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(socket_path)
        socket.send_fds(conn, [b"\0"], [0, 1, 2])
        _send_message(conn, payload)
    except OSError:
        os.execv(real_python, [real_python, *args])
    try:
        reply = json.loads(_receive_message(conn))
    except (ConnectionError, ValueError):
        print("handoff: the step process died without an exit status", file=sys.stderr)
        sys.exit(EXIT_DIED)
    sys.exit(int(reply["code"]))


def _wait_until_listening(process: subprocess.Popen[bytes], socket_path: str, timeout_s: float) -> bool:
    """Ready means accepting connections (not a line on stdout, which model.py may print to)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(socket_path)
                return True
            except OSError:
                time.sleep(0.05)
    return False


@dataclass(frozen=True)
class StepPython:
    """How to start a step in the fork server: the client executable and the server's socket."""

    executable: str
    socket_path: str


class Starting:
    """A fork server whose imports are under way; ``wait()`` once the caller's own set-up is done."""

    def __init__(self, process: subprocess.Popen[bytes], client: str, socket_path: str, timeout_s: float):
        """``process`` is the server being started; ``client`` the executable that reaches it."""
        self.process, self.client, self.socket_path, self.timeout_s = process, client, socket_path, timeout_s

    def wait(self) -> StepPython | None:
        """The way to reach the server once it accepts connections; None if it failed to start."""
        if _wait_until_listening(self.process, self.socket_path, self.timeout_s):
            return StepPython(self.client, self.socket_path)
        print(
            "handoff: the step fork server did not start; running each step in a new interpreter",
            file=sys.stderr,
        )
        return None


@contextlib.contextmanager
def running(project_dir: Path, timeout_s: float = 120) -> Iterator[Starting | None]:
    """Start the server for one local run (None where fork servers are unavailable); stop it after."""
    client = Path(sys.executable).with_name("handoff-step-python")
    if not client.is_file() or not hasattr(socket, "send_fds") or os.name != "posix":
        yield None
        return
    # A short private folder: socket paths are limited to ~100 bytes.
    folder = tempfile.mkdtemp(prefix="handoff-")
    socket_path = os.path.join(folder, "steps.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "handoff_pipelines.forkserver", socket_path, str(project_dir)],
        # Our end of its stdin is its lifeline: when this process ends, however, the server sees
        # EOF and stops its steps. Its own session keeps Ctrl-C (meant for us) away from it.
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield Starting(process, str(client), socket_path, timeout_s)
    finally:
        if process.stdin is not None:
            process.stdin.close()  # the server stops its steps and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
