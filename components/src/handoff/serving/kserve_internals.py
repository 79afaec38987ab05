"""Everything the model server takes from KServe and uvicorn beyond their public API, why, and
the check that each is still there.

KServe's public API is ``kserve.Model`` and ``kserve.ModelServer``; uvicorn's is ``Config`` and
``Server.run``. The server needs more than that for the speed measured in bench/README.md
("serving.py": p50 0.47 ms, 0.40x of a stock ``kserve.Model``, within 0.5 ms of bare ONNX Runtime)
and for a shutdown that loses no request (``graceful.py``). This module is the one place that
imports those internals or names a private attribute; ``graceful.py`` subclasses the two classes
it hands out and uses the uvicorn attributes listed below, which ``INTERNALS`` checks too.
``check`` runs as the server starts (and in tests/test_serving_internals.py), so an upgrade fails
there, naming what moved, instead of mid-request or as a silently slower server.

Verified on kserve 0.21.0 with uvicorn 0.54.0 (requirements/lock.txt), hence the pin
``kserve>=0.21,<0.22`` in components/pyproject.toml: 0.15 to 0.20 have no ``_RefreshingServer``
(KServe's uvicorn server since 0.21, which ``graceful.GracefulServer`` extends), and 0.22 is not
checked yet. What is used, and why:

- ``RESTServer`` (``kserve.protocol.rest.server``), built here rather than by ``ModelServer``:
  ``_add_middlewares`` is left out (its timing middleware times every request, CPU time too, to
  log it; the front door measures the same for Prometheus at a fraction of the cost);
  ``create_application`` is extended to put the front door (``front.py``: the model's V2 routes
  without pydantic or FastAPI routing, most of the 0.40x) in front of the global FastAPI app
  ``kserve.model_server.app``, on which the guards are installed (``guards.py``); ``config`` (the
  uvicorn Config) serves that app without proxy headers, graceful.py's protocol and the
  concurrency limit; ``_server`` becomes graceful.py's server, which ``run`` serves through.
- ``_RefreshingServer``, a ``uvicorn.Server``: its ``startup``, ``shutdown``, ``on_tick``,
  ``handle_exit`` and ``capture_signals`` are extended and its ``servers``, ``server_state``
  (``connections``, ``tasks``), ``lifespan``, ``force_exit`` and ``_captured_signals`` read, for
  the graceful shutdown and the request-head timeout.
- uvicorn's ``HttpToolsProtocol``: built as ``Server.startup`` builds it (for a taken-over socket
  and the connections taken from the listen queue on shutdown); its ``connection_made``,
  ``on_message_begin``, ``on_headers_complete``, ``shutdown`` and the cycle's ``keep_alive``
  carry the head timeout and the shutdown's ``Connection: close``.
- ``kserve.metrics.PREDICT_HIST_TIME``: KServe's predict-time histogram, observed by the front
  door so that dashboards built for KServe keep working.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from handoff.errors import HandoffError

VERIFIED = {"kserve": "0.21.0", "uvicorn": "0.54.0"}
PIN_FILE = "components/pyproject.toml"  # where the kserve range is, for the error message

Asgi = Callable[..., Any]
Condition = Callable[[Any], str | None]  # a problem with what was found, or None


def _find(path: str) -> Any:
    """The object at ``module:Attr.attr`` (an unknown name raises ImportError or AttributeError)."""
    module, _, attributes = path.partition(":")
    found: Any = importlib.import_module(module)
    for name in attributes.split(".") if attributes else []:
        found = getattr(found, name)
    return found


def _moved(path: str, problem: str) -> HandoffError:
    installed = ", ".join(f"{name} {version(name)}" for name in VERIFIED)
    verified = ", ".join(f"{name} {v}" for name, v in VERIFIED.items())
    return HandoffError(
        f"{path} {problem}; the model server relies on it (handoff.serving.kserve_internals says why) "
        f"and was verified on {verified}, this is {installed}: install the kserve that ml-handoff "
        f"requires ({PIN_FILE})"
    )


# What the server subclasses or uses, imported here: gone, the import fails here, naming it.
try:
    from kserve.metrics import PREDICT_HIST_TIME
    from kserve.protocol.rest.server import RESTServer
    from kserve.protocol.rest.server import _RefreshingServer as UvicornServer  # GracefulServer's base
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as HttpProtocol  # GracefulProtocol's
except ImportError as exc:
    raise _moved(str(exc.name), f"lacks what the model server imports from it ({exc})") from None

__all__ = [
    "INTERNALS",
    "PREDICT_HIST_TIME",
    "FrontedRESTServer",
    "HttpProtocol",
    "UvicornServer",
    "check",
    "forget_signal",
    "new_connection",
]

APP = "kserve.model_server:app"  # KServe's FastAPI app: a module global, which create_application imports


class FrontedRESTServer(RESTServer):
    """KServe's REST server for a ``kserve.ModelServer``'s models, serving what ``front`` makes of
    KServe's app, without the timing middleware."""

    def __init__(
        self, model_server: Any, port: int, grace_period_s: int, front: Callable[[Any], Asgi]
    ) -> None:
        super().__init__(
            _find("kserve.constants.constants:FASTAPI_APP_IMPORT_STRING"),
            model_server.dataplane,
            model_server.model_repository_extension,
            port,
            grace_period=grace_period_s,
        )
        self.front = front

    def _add_middlewares(self, app: Any) -> None:
        """Leave out KServe's timing middleware, which times every request (CPU time too) to log
        it: the front door (``front.py``) measures the same for Prometheus at a fraction of the cost."""

    def create_application(self) -> None:
        super().create_application()
        self.config.app = self.front(_find(APP))
        self.config.proxy_headers = False  # nothing here reads X-Forwarded-*: one layer less

    def use_server(self, http: type, limit_concurrency: int, make: Callable[[Any], Any]) -> Any:
        """Serve through ``make(config)`` (a ``UvicornServer``) with the ``http`` protocol class and
        at most ``limit_concurrency`` connections at once (uvicorn answers 503 past it)."""
        self.config.http = http
        self.config.limit_concurrency = limit_concurrency
        self._server = make(self.config)
        return self._server


def new_connection(server: Any, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
    """A protocol for one connection of ``server``, as ``uvicorn.Server.startup`` makes them."""
    config = server.config
    made: asyncio.Protocol = config.http_protocol_class(
        config=config, server_state=server.server_state, app_state=server.lifespan.state, _loop=loop
    )
    return made


def forget_signal(server: Any, signum: int) -> None:
    """Drop ``signum`` from the signals a uvicorn server raises again once it has stopped serving."""
    server._captured_signals[:] = [s for s in server._captured_signals if s != signum]


# --- The check ----------------------------------------------------------------------------------


def takes(*parameters: str, keywords: tuple[str, ...] = ()) -> Condition:
    """A callable whose first parameters are these, in order (what it is passed, or what an
    override of it receives), and that takes ``keywords`` by name."""

    def condition(found: Any) -> str | None:
        try:
            names = list(inspect.signature(found).parameters)
        except (TypeError, ValueError):
            return "is not a function"
        if names[: len(parameters)] == list(parameters) and all(k in names for k in keywords):
            return None
        wanted = ", ".join((*parameters, "...", *keywords))
        return f"takes ({', '.join(names)}), not ({wanted})"

    return condition


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:  # nested functions and comprehensions
        if isinstance(const, types.CodeType):
            yield from _names(const)


def used_by(function: str, name: str) -> Condition:
    """``name`` (an attribute or a method) appears in the code of ``function``: an instance
    attribute it sets or reads, or a method it calls (so that an override is still called)."""

    def condition(_: Any) -> str | None:
        code = getattr(inspect.unwrap(_find(function)), "__code__", None)
        return None if code is not None and name in set(_names(code)) else f"is no longer used by {function}"

    return condition


def equals(expected: Any) -> Condition:
    return lambda found: None if found == expected else f"is {found!r}, not {expected!r}"


def instance_of(path: str) -> Condition:
    return lambda found: None if isinstance(found, _find(path)) else f"is no longer a {path}"


def subclass_of(path: str) -> Condition:
    return lambda found: None if issubclass(found, _find(path)) else f"is no longer a subclass of {path}"


def labelled(*labels: str) -> Condition:
    """A Prometheus metric whose children are labelled by exactly ``labels``."""

    def condition(metric: Any) -> str | None:
        values = [f"handoff-check-{label}" for label in labels]
        try:
            metric.labels(*values)
            metric.remove(*values)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            return f"is no longer a metric labelled by {', '.join(labels)} ({exc})"
        return None

    return condition


@dataclass(frozen=True)
class Internal:
    """One thing the server uses beyond the public API (``module:Attr.attr``), and what must hold."""

    path: str
    conditions: tuple[Condition, ...] = ()
    # An attribute of instances (not of the class): the function that sets or reads it.
    on_instances_by: str = ""

    def problems(self) -> list[str]:
        if self.on_instances_by:
            found = used_by(self.on_instances_by, self.path.rpartition(".")[2])(None)
            return [found] if found else []
        try:
            value = _find(self.path)
        except (ImportError, AttributeError) as exc:
            return [f"is not found ({exc})"]
        return [p for p in (condition(value) for condition in self.conditions) if p is not None]


REST = "kserve.protocol.rest.server:RESTServer"
SERVER = "uvicorn.server:Server"
STATE = "uvicorn.server:ServerState"
PROTOCOL = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
CYCLE = "uvicorn.protocols.http.httptools_impl:RequestResponseCycle"
CONFIG = "uvicorn.config:Config"

INTERNALS: tuple[Internal, ...] = (
    # KServe's REST server, as FrontedRESTServer builds and changes it.
    Internal(
        f"{REST}.__init__",
        (
            takes(
                "self",
                "app",
                "data_plane",
                "model_repository_extension",
                "http_port",
                keywords=("grace_period",),
            ),
        ),
    ),
    Internal(
        f"{REST}._add_middlewares",
        (takes("self", "app"), used_by(f"{REST}.create_application", "_add_middlewares")),
    ),
    Internal(f"{REST}.create_application", (takes("self"), used_by(f"{REST}.run", "create_application"))),
    Internal(f"{REST}.run", (takes("self", "sockets"),)),
    Internal(f"{REST}.config", on_instances_by=f"{REST}.__init__"),
    Internal(f"{REST}._server", on_instances_by=f"{REST}.run"),
    Internal("kserve.constants.constants:FASTAPI_APP_IMPORT_STRING", (equals(APP),)),
    Internal(APP, (instance_of("fastapi:FastAPI"),)),
    Internal("kserve.metrics:PREDICT_HIST_TIME", (labelled("model_name"),)),
    # KServe's uvicorn server, the base of graceful.GracefulServer.
    Internal(
        "kserve.protocol.rest.server:_RefreshingServer",
        (subclass_of(SERVER), used_by(f"{REST}.__init__", "_RefreshingServer")),
    ),
    Internal(f"{SERVER}.startup", (takes("self", "sockets"),)),
    Internal(f"{SERVER}.shutdown", (takes("self", "sockets"),)),
    Internal(f"{SERVER}.on_tick", (takes("self", "counter"), used_by(f"{SERVER}.main_loop", "on_tick"))),
    Internal(f"{SERVER}.handle_exit", (takes("self", "sig", "frame"),)),
    Internal(f"{SERVER}.capture_signals", (takes("self"),)),
    Internal(f"{SERVER}._captured_signals", on_instances_by=f"{SERVER}.capture_signals"),
    Internal(f"{SERVER}.servers", on_instances_by=f"{SERVER}.startup"),
    Internal(f"{SERVER}.server_state", on_instances_by=f"{SERVER}.__init__"),
    Internal(f"{SERVER}.lifespan", on_instances_by=f"{SERVER}._serve"),
    Internal(f"{SERVER}.force_exit", on_instances_by=f"{SERVER}.__init__"),
    Internal(f"{SERVER}.should_exit", on_instances_by=f"{SERVER}.__init__"),
    Internal(f"{STATE}.connections", on_instances_by=f"{STATE}.__init__"),
    Internal(f"{STATE}.tasks", on_instances_by=f"{STATE}.__init__"),
    # uvicorn's HTTP protocol, the base of graceful.GracefulProtocol, and the Config it reads.
    Internal(f"{PROTOCOL}.__init__", (takes("self", "config", "server_state", "app_state", "_loop"),)),
    Internal(f"{PROTOCOL}.connection_made", (takes("self", "transport"),)),
    Internal(f"{PROTOCOL}.on_message_begin", (takes("self"),)),
    Internal(f"{PROTOCOL}.on_headers_complete", (takes("self"),)),
    Internal(f"{PROTOCOL}.shutdown", (takes("self"),)),
    Internal(f"{PROTOCOL}.loop", on_instances_by=f"{PROTOCOL}.__init__"),
    Internal(f"{PROTOCOL}.transport", on_instances_by=f"{PROTOCOL}.connection_made"),
    Internal(f"{PROTOCOL}.cycle", on_instances_by=f"{PROTOCOL}.on_headers_complete"),
    Internal(f"{CYCLE}.keep_alive", on_instances_by=f"{CYCLE}.__init__"),
    Internal(f"{CONFIG}.http", on_instances_by=f"{CONFIG}.__init__"),
    Internal(f"{CONFIG}.http_protocol_class", on_instances_by=f"{CONFIG}.load"),
    Internal(f"{CONFIG}.limit_concurrency", on_instances_by=f"{CONFIG}.__init__"),
    Internal(f"{CONFIG}.proxy_headers", on_instances_by=f"{CONFIG}.__init__"),
    Internal(f"{CONFIG}.backlog", on_instances_by=f"{CONFIG}.__init__"),
)


def check() -> None:
    """Raise naming the first internal in ``INTERNALS`` that is gone or has changed."""
    for internal in INTERNALS:
        problems = internal.problems()
        if problems:
            raise _moved(internal.path, "; ".join(problems))
