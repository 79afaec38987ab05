"""Run the local model server: ``python -m handoff.serving <server.json> [<listening fd>]``.

The spec file (written by the deploy step) names the model, its registered contract, host and
port, and optionally ``max_request_bytes`` (default 16 MiB; larger bodies get 413). It is a file
rather than flags because importing ``kserve.model_server`` parses ``sys.argv`` itself. The deploy
step binds the socket and passes it as a file descriptor.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

from handoff.contract import load_contract
from handoff.files import read_json
from handoff.serving import guards
from handoff.serving.onnx_model import OnnxModel


def serve(spec_path: Path, fd: int | None) -> None:
    """Serve at once, load the model once (ready from then on), serve until SIGTERM (uvicorn finishes
    in-flight requests). A model that cannot be loaded stops the server with exit code 1."""
    spec = read_json(spec_path)
    contract = load_contract(Path(spec["contract_dir"]))
    model = OnnxModel(spec["model_name"], Path(spec["onnx_path"]), contract)

    example = {"inputs": [{**tensor.v2_metadata(), "data": ["..."]} for tensor in contract.inputs]}
    expected = f"a V2 inference request like {json.dumps(example)}"
    max_request_bytes = int(spec.get("max_request_bytes", guards.DEFAULT_MAX_REQUEST_BYTES))

    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    server = ModelServer(http_port=spec["port"], enable_grpc=False, workers=1, enable_docs_url=False)
    server.register_model(model)
    if fd is None:
        sock = socket.create_server((spec["host"], spec["port"]), reuse_port=False)
    else:
        sock = socket.socket(fileno=fd)
    # kserve's RESTServer would bind 0.0.0.0; serving on a socket bound to the configured host
    # (127.0.0.1 by default) keeps a laptop's model off the network.
    failed = threading.Event()

    class GuardedRESTServer(RESTServer):
        def create_application(self) -> None:
            super().create_application()
            from kserve.model_server import app

            guards.install(app, expected, max_request_bytes, lambda: bool(model.ready))

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
                self._server.should_exit = True  # uvicorn checks it every 0.1 s, also before startup ends

    rest = GuardedRESTServer(
        FASTAPI_APP_IMPORT_STRING,
        server.dataplane,
        server.model_repository_extension,
        spec["port"],
        grace_period=10,
    )
    threading.Thread(target=rest.load_or_stop, name="load-model", daemon=True).start()
    rest.run(sockets=[sock])
    if failed.is_set():
        sys.exit(1)  # never ready: the deploy step (or Kubernetes) sees the exit and the one line above


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m handoff.serving <server.json> [<listening fd>]")
    serve(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) == 3 else None)
