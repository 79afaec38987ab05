"""Run the local model server: ``python -m handoff.serving <server.json> [<listening fd>]``.

The spec file (written by the deploy step) names the model, its registered contract, host and
port. It is a file rather than flags because importing ``kserve.model_server`` parses
``sys.argv`` itself. The deploy step binds the socket and passes it as a file descriptor.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from handoff.contract import load_contract
from handoff.files import read_json
from handoff.serving.onnx_model import OnnxModel


def serve(spec_path: Path, fd: int | None) -> None:
    """Load the model once, then serve it until SIGTERM (uvicorn finishes in-flight requests)."""
    spec = read_json(spec_path)
    model = OnnxModel(spec["model_name"], Path(spec["onnx_path"]), load_contract(Path(spec["contract_dir"])))
    model.load()

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
    rest = RESTServer(
        FASTAPI_APP_IMPORT_STRING,
        server.dataplane,
        server.model_repository_extension,
        spec["port"],
        grace_period=10,
    )
    rest.run(sockets=[sock])


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m handoff.serving <server.json> [<listening fd>]")
    serve(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) == 3 else None)
