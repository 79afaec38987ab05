"""The blue/green socket protocol every local server process speaks: the model server and the A/B
router (``ab_router``), so ``handoff deploy`` and ``handoff ab`` change what answers the project's
port the same way, whichever of the two is serving it.

A server is started with a private listening socket (where it is checked) and the project's
socket (``takeover``): the running server's own listening socket, received over its handover
Unix socket, or a bound socket not yet listening. It offers that socket at ``handover`` to the
next server, accepts on it after SIGUSR1 (and touches the spec's serving marker), and after
SIGUSR2 stops accepting (the next server accepts from the same queue) and closes each connection
after its current response. SIGTERM then finishes what is in flight (``graceful``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from handoff.serving.graceful import GracefulServer
from handoff.serving.local_server import serving_marker


async def take_over(server: GracefulServer, sock: socket.socket, spec_path: Path, what: str) -> None:
    """Listen on ``sock`` too, with the same app and connection bookkeeping as uvicorn's own
    sockets (what ``uvicorn.Server.startup`` does for each), so shutdown drains both."""
    listening = await asyncio.get_running_loop().create_server(
        server.protocol_factory, sock=sock, backlog=server.config.backlog
    )
    server.servers.append(listening)
    server.listening.append(sock)
    serving_marker(spec_path).touch()
    print(f"{what} now also serves on {sock.getsockname()[:2]} (took over)", file=sys.stderr, flush=True)


def retire(server: GracefulServer, retiring: threading.Event, what: str) -> None:
    """Stop accepting (the next server accepts from the same socket); responses from now on say
    ``Connection: close`` (``retiring``). SIGTERM follows."""
    retiring.set()
    server.stop_accepting()
    print(f"{what} stopped accepting (retired)", file=sys.stderr, flush=True)


def on_signals(
    takeover: socket.socket,
    handover: Path | None,
    start_taking_over: Callable[[socket.socket], Coroutine[Any, Any, None]],
    start_retiring: Callable[[], None],
    what: str,
) -> None:
    """SIGUSR1 takes ``takeover`` over (once), SIGUSR2 retires (once); ``takeover`` is offered to
    the next server at ``handover``. Call before the server runs; the handlers run on its loop."""

    def report_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # deploy waits for the marker, then points at this log
            print(f"{what} could not take over: {task.exception()}", file=sys.stderr, flush=True)

    def begin() -> None:
        task = asyncio.get_running_loop().create_task(start_taking_over(takeover))
        task.add_done_callback(report_failure)

    def on_sigusr1(signum: int, frame: Any) -> None:
        loop = asyncio.get_running_loop()  # the handler runs on the main thread, inside the loop
        loop.call_soon_threadsafe(begin)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # once

    def on_sigusr2(signum: int, frame: Any) -> None:
        asyncio.get_running_loop().call_soon_threadsafe(start_retiring)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    signal.signal(signal.SIGUSR1, on_sigusr1)
    signal.signal(signal.SIGUSR2, on_sigusr2)
    if handover is not None:
        hand_over(handover, takeover)


def hand_over(path: Path, listening: socket.socket) -> None:
    """Give ``listening`` to whoever connects at ``path`` (a Unix socket in a folder only this user
    can enter): the deploy of the next version, so that both servers accept from one socket."""
    path.unlink(missing_ok=True)
    offer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        offer.bind(str(path))
    except OSError as exc:
        sys.exit(f"cannot offer the listening socket at {path}: {exc}")
    offer.listen(4)

    def give() -> None:
        while True:
            conn, _ = offer.accept()
            with conn, contextlib.suppress(OSError):  # retired: the socket is closed, nothing to give
                if hasattr(socket, "SO_PEERCRED"):  # Linux: only this user's processes get it
                    peer_uid = struct.unpack(
                        "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    )[1]
                    if peer_uid != os.getuid():
                        continue
                socket.send_fds(conn, [b"listening socket"], [listening.fileno()])

    threading.Thread(target=give, name="handover", daemon=True).start()
