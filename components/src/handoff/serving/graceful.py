"""The model server's connections: graceful shutdown, a request-head timeout, and what uvicorn
leaves out for a server that Kubernetes stops and restarts.

uvicorn (0.54) on SIGTERM closes its listening sockets at once, which resets every connection
still waiting in the listen queue, closes each connection whose request it has not read yet, and
then re-raises the signal, so the process dies by it (no ``finally``, exit status -15). Here
SIGTERM instead:

1. accepts every connection already waiting in the listen queue (the kernel completed their
   handshakes, their clients may have sent whole requests) and hands each to the loop as
   uvicorn's own accept would, then stops accepting;
2. gives the loop a moment to read what the connections already sent;
3. closes the connections with nothing received, and lets every request received (a whole head,
   or a head begun within the header timeout) finish, each answered with ``Connection: close``;
4. exits 0 once none is left, or at ``shutdown_grace_s`` (requests still running then are
   cancelled).

A connection that has not sent a whole request head within ``header_timeout_s`` of connecting
(or of the first byte of its next request) is closed: uvicorn has no such timeout, so a client
sending a head a byte at a time would hold a connection, and a ``max_concurrency`` slot, forever.

This extends uvicorn's server and HTTP protocol beyond their public API: what it relies on is
listed, and checked as the server starts, in ``kserve_internals``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from uvicorn import Config

from handoff.serving.kserve_internals import HttpProtocol, UvicornServer, forget_signal, new_connection

logger = logging.getLogger("uvicorn.error")

# How long the loop gets, after the last waiting connection was accepted, to read what the
# connections already sent (the kernel holds it; reading it takes one turn of the loop).
READ_MOMENT_S = 0.1
# Kept from the grace period for the application's shutdown and the interpreter's exit.
EXIT_MARGIN_S = 1.0
TICK_S = 0.05  # how often the shutdown checks its connections


class GracefulProtocol(HttpProtocol):
    """uvicorn's HTTP/1.1 protocol, plus the head timeout and the shutdown's ``Connection: close``.

    ``header_timeout_s`` and ``shutting_down`` are set on the subclass :func:`protocol` makes for
    one server (uvicorn builds protocols from a class and its own arguments only).
    """

    header_timeout_s: float = 10.0
    shutting_down: threading.Event = threading.Event()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Since when the connection owes a request head (None: it sent one, or it is idle between
        # keep-alive requests, which uvicorn's keep-alive timeout bounds).
        self.head_due_since: float | None = self.loop.time()
        self.head_begun = False  # some of a head has arrived, not all of it

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_begun = True
        if self.head_due_since is None:
            self.head_due_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self.head_begun = False
        self.head_due_since = None
        super().on_headers_complete()
        if self.shutting_down.is_set() and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def head_overdue(self, now: float) -> bool:
        since = getattr(self, "head_due_since", None)
        return since is not None and now - since > self.header_timeout_s

    def shutdown(self) -> None:
        """Called once when the server shuts down: close the connection if it holds no request
        (nothing received, or idle between keep-alive requests); otherwise answer the request
        with ``Connection: close`` and close after it. A head begun is given its header timeout."""
        if self.head_begun:
            return  # on_headers_complete sees shutting_down; the head timeout bounds the wait
        super().shutdown()


def protocol(header_timeout_s: float, shutting_down: threading.Event) -> type[GracefulProtocol]:
    """The protocol class for one server (uvicorn's ``Config.http``)."""
    return type(
        "GracefulProtocol",
        (GracefulProtocol,),
        {"header_timeout_s": header_timeout_s, "shutting_down": shutting_down},
    )


class GracefulServer(UvicornServer):
    """KServe's uvicorn server with the shutdown described in the module docstring."""

    def __init__(self, config: Config, *, shutdown_grace_s: float, shutting_down: threading.Event) -> None:
        super().__init__(config)
        self.shutdown_grace_s = shutdown_grace_s
        self.shutting_down = shutting_down
        self.terminated_at: float | None = None
        # The listening sockets to take waiting connections from on shutdown: the ones given to
        # run() and the one taken over, until retire() gives the queue to the next version.
        self.listening: list[socket.socket] = []

    def protocol_factory(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
        """A protocol for one connection, as ``uvicorn.Server.startup`` makes them."""
        return new_connection(self, loop)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.listening = list(sockets or [])
        await super().startup(sockets=sockets)

    def stop_accepting(self) -> None:
        """Close the listening sockets here without taking what waits in their queue (a retired
        server: the next version accepts from the same queue)."""
        self.listening = []
        for server in self.servers:
            server.close()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, except that a SIGTERM handled by a graceful shutdown is not raised again
        afterwards: the process exits 0, through every ``finally``."""
        with super().capture_signals():
            try:
                yield
            finally:
                forget_signal(self, signal.SIGTERM)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        self.close_overdue_heads()
        should_exit: bool = await super().on_tick(counter)
        return should_exit

    def close_overdue_heads(self) -> None:
        now = asyncio.get_running_loop().time()
        for connection in list(self.server_state.connections):
            if isinstance(connection, GracefulProtocol) and connection.head_overdue(now):
                connection.transport.close()

    def _accept_waiting(self) -> list[socket.socket]:
        """Every connection waiting in the listening sockets' queues (non-blocking)."""
        waiting: list[socket.socket] = []
        for listening in self.listening:
            with contextlib.suppress(OSError):  # closed already, or EAGAIN: the queue is empty
                listening.setblocking(False)
                while True:
                    conn, _ = listening.accept()
                    waiting.append(conn)
        return waiting

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        logger.info("Shutting down")
        started = self.terminated_at or time.monotonic()
        deadline = started + max(self.shutdown_grace_s - EXIT_MARGIN_S, READ_MOMENT_S)
        self.shutting_down.set()
        # Take what waits in the queues, then stop accepting, with no await in between: the loop
        # cannot accept meanwhile, and closing a listening socket resets what waits in it.
        waiting = self._accept_waiting()
        self.listening = []
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        loop = asyncio.get_running_loop()
        for conn in waiting:
            try:
                await loop.connect_accepted_socket(self.protocol_factory, conn)
            except OSError:
                conn.close()
        if waiting:
            logger.info("Took %d connection(s) waiting to be accepted", len(waiting))
        await asyncio.sleep(READ_MOMENT_S)
        for connection in list(self.server_state.connections):
            connection.shutdown()
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit and time.monotonic() < deadline:
            self.close_overdue_heads()
            await asyncio.sleep(TICK_S)
        if state.tasks:
            logger.error(
                "Cancel %s running request(s): not finished within shutdown_grace_s (%g s)",
                len(state.tasks),
                self.shutdown_grace_s,
            )
            for task in state.tasks:
                task.cancel(msg="not finished within shutdown_grace_s")
        for connection in list(state.connections):
            connection.transport.close()
        if not self.force_exit:
            await self.lifespan.shutdown()
