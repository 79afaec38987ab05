"""Run the model server: ``python -m handoff.serving <server.json> [<listening fd> [<takeover fd>]]``.

The spec file (written by the deploy step) names the model, its registered contract, host and
port, and optionally ``max_request_bytes`` (default 16 MiB; larger bodies get 413),
``batching`` (``max_batch_size``, ``max_wait_ms``), ``model_version``, ``max_inflight_bytes``,
``max_concurrency`` (connections served at once; more get 503), ``header_timeout_s`` and
``shutdown_grace_s`` (defaults: handoff.yaml's, ``ServingSettings``), and ``payload_log``
(``sample_rate``, ``max_bytes``, ``store``: handoff.yaml's ``monitoring``; none by default). It
is a file rather than flags because importing ``kserve.model_server`` parses ``sys.argv`` itself.
The deploy step binds the socket and passes it as a file descriptor.

SIGTERM (graceful.py): stop accepting, but first take every connection waiting in the listen
queue; answer every request already received with ``Connection: close``; exit 0 within
``shutdown_grace_s``. The handover socket file is removed on every way out.

Blue/green (``handoff deploy``): the new server first serves only a private socket, where it is
smoke-tested, while the old version keeps the project's port. The takeover fd is the project's
socket: the old server's own listening socket (which it gives over the Unix socket named
``handover`` in its spec), or a bound socket not yet listening on the first deploy. The new
server does not accept on it until SIGUSR1, so no client reaches it before it passed its checks.
SIGUSR2 retires a server: it stops accepting (the next version accepts from the same socket, so
no waiting connection is lost) and closes each connection after its current response. SIGTERM
then finishes the in-flight requests and exits (taking nothing from the queue it gave away).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from handoff import feedback
from handoff.contract import load_contract
from handoff.files import read_json, sha256_of
from handoff.payload_log import PayloadLog
from handoff.serving import ab_router, graceful, guards, kserve_internals, metrics, takeover
from handoff.serving.front import FrontDoor
from handoff.serving.onnx_model import OnnxModel
from handoff.serving.spec import server_settings
from handoff.settings import BatchingSettings, ServingSettings


def serve(spec_path: Path, fd: int | None = None, takeover_fd: int | None = None) -> None:
    """Serve at once, load the model once (ready from then on), serve until SIGTERM (graceful.py:
    every request received is answered, exit 0). A model that cannot be loaded stops the server
    with exit code 1."""
    kserve_internals.check()  # an upgraded KServe or uvicorn stops here, naming what moved
    # handoff.yaml's defaults for whatever the spec leaves out (serving/spec.py writes the keys).
    spec = {**server_settings(ServingSettings(), "1"), **read_json(spec_path)}
    if "router" in spec:  # `handoff ab`: the router in front of two model servers
        signal.signal(signal.SIGTERM, _exit_at_once)
        ab_router.route(spec_path, spec, fd, takeover_fd)
        return
    contract = load_contract(Path(spec["contract_dir"]))
    batching = BatchingSettings.model_validate(spec["batching"])
    payload_log = _payload_log(spec)
    # Ground truth reported for answered requests, joined with the payload log (handoff.feedback).
    feedback_log = (
        None
        if payload_log is None
        else feedback.feedback_log(
            spec["payload_log"]["store"],
            model=spec["model_name"],
            version=str(spec["model_version"]),
            max_bytes=int(spec["payload_log"]["max_bytes"]),
        )
    )
    model = OnnxModel(
        spec["model_name"],
        Path(spec["onnx_path"]),
        contract,
        max_batch_size=batching.max_batch_size,
        max_wait_ms=batching.max_wait_ms,
        # model.py (for preprocess/postprocess) sits beside the contract: register attaches both.
        code_dir=Path(spec["contract_dir"]),
        payload_log=payload_log,
    )

    example = {"inputs": [{**tensor.v2_metadata(), "data": ["..."]} for tensor in contract.request_inputs]}
    expected = f"a V2 inference request like {json.dumps(example)}"
    max_request_bytes = int(spec["max_request_bytes"])

    from kserve import ModelServer

    server = ModelServer(http_port=spec["port"], enable_grpc=False, workers=1, enable_docs_url=False)
    # No log line for every request (uvicorn's access log): /metrics counts and times them, and a
    # rejected request is logged with its reason. Per-request lines cost more than a small model's
    # inference and grow the log without bound.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.register_model(model)
    if fd is None:
        sock = socket.create_server((spec["host"], spec["port"]), reuse_port=False)
    else:
        sock = socket.socket(fileno=fd)
    # kserve's RESTServer would bind 0.0.0.0; serving on a socket bound to the configured host
    # (127.0.0.1 by default) keeps a laptop's model off the network.
    failed = threading.Event()
    retiring = threading.Event()
    # Set once SIGTERM starts the shutdown: responses then say Connection: close (graceful.py).
    shutting_down = threading.Event()
    shutdown_grace_s = float(spec["shutdown_grace_s"])
    header_timeout_s = float(spec["header_timeout_s"])
    max_concurrency = int(spec["max_concurrency"])

    def front(app: Any) -> FrontDoor:
        """KServe's app, guarded, behind the front door that answers the model's V2 routes (front.py
        says why)."""
        guards.install(app, expected, max_request_bytes)
        return FrontDoor(
            app,
            model,
            version=str(spec["model_version"]),
            expected=expected,
            max_request_bytes=max_request_bytes,
            max_inflight_bytes=int(spec["max_inflight_bytes"]),
            idle_timeout_s=header_timeout_s,  # a body that stops arriving is timed like a head
            closing=lambda: retiring.is_set() or shutting_down.is_set(),
            feedback=feedback_log,
        )

    class GuardedRESTServer(kserve_internals.FrontedRESTServer):
        graceful: graceful.GracefulServer

        def load_or_stop(self) -> None:
            """Load the model while the server answers 503 on readiness; stop it if loading fails."""
            try:
                model.load()
            except Exception as exc:  # noqa: BLE001 - one clear line for the log, not a traceback
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())
                print(
                    f"model {model.name} cannot be loaded from {model.onnx_path}: {reason}", file=sys.stderr
                )
                failed.set()
                self.graceful.should_exit = True  # uvicorn checks it every 0.1 s, also before startup ends
                return
            # What start-up made (KServe, FastAPI, ONNX Runtime, model.py) lives as long as the
            # process: out of the garbage collector's sight, its full collections stop walking it.
            gc.collect()
            gc.freeze()

        def use_graceful_server(self) -> None:
            """uvicorn's server and protocol with the graceful shutdown, the head timeout and the
            concurrency limit (graceful.py)."""
            self.graceful = self.use_server(
                graceful.protocol(header_timeout_s, shutting_down),
                # uvicorn answers 503 once the connections (this one counted) reach the limit.
                max_concurrency + 1,
                lambda config: graceful.GracefulServer(
                    config, shutdown_grace_s=shutdown_grace_s, shutting_down=shutting_down
                ),
            )

    rest = GuardedRESTServer(server, spec["port"], math.ceil(shutdown_grace_s), front)
    rest.use_graceful_server()
    handover = Path(spec["handover"]) if spec.get("handover") else None
    # uvicorn handles SIGTERM while it serves; before and after, it ends the process through
    # Python (SystemExit), so the finally below still removes the handover socket.
    signal.signal(signal.SIGTERM, _exit_at_once)
    try:
        if takeover_fd is not None:
            what = f"model {model.name}"
            takeover.on_signals(
                socket.socket(fileno=takeover_fd),
                handover,
                lambda sock: takeover.take_over(rest.graceful, sock, spec_path, what),
                lambda: takeover.retire(rest.graceful, retiring, what),
                what,
            )
        threading.Thread(target=rest.load_or_stop, name="load-model", daemon=True).start()
        rest.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # on the way out already: let nothing cut it
        if handover is not None:
            handover.unlink(missing_ok=True)
        if payload_log is not None:
            payload_log.close()  # every request answered is sampled by now: write the last ones
        if feedback_log is not None:
            feedback_log.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if failed.is_set():
        sys.exit(1)  # never ready: the deploy step (or Kubernetes) sees the exit and the one line above


def _payload_log(spec: dict[str, Any]) -> PayloadLog | None:
    """The payload log the spec asks for, if any (a store and a sample rate above 0)."""
    settings = spec.get("payload_log") or {}
    if not settings.get("store") or float(settings.get("sample_rate", 0)) <= 0:
        return None
    written, dropped = metrics.payload_counters(spec["model_name"])
    return PayloadLog(
        settings["store"],
        model=spec["model_name"],
        version=str(spec["model_version"]),
        sample_rate=float(settings["sample_rate"]),
        max_bytes=int(settings["max_bytes"]),
        on_written=written,
        on_dropped=dropped,
        model_sha256=sha256_of(Path(spec["onnx_path"])),
    )


def _exit_at_once(signum: int, frame: Any) -> None:
    """SIGTERM before the server serves (or after it stopped): nothing to finish, so exit 0 now."""
    raise SystemExit(0)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3, 4):
        sys.exit("usage: python -m handoff.serving <server.json> [<listening fd> [<takeover fd>]]")
    fds = [int(arg) for arg in sys.argv[2:]]
    serve(Path(sys.argv[1]), *fds)
