"""Run the local model server: ``python -m handoff.serving <server.json>``.

The spec file (written by the deploy step) says which model, contract, host and port. It is a
file rather than flags because importing ``kserve.model_server`` parses ``sys.argv`` itself.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from handoff.contract import load_contract
from handoff.files import read_json
from handoff.serving.onnx_model import OnnxModel


def serve(spec_path: Path) -> None:
    spec = read_json(spec_path)
    model = OnnxModel(spec["model_name"], Path(spec["onnx_path"]), load_contract(Path(spec["project_dir"])))
    model.load()

    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    server = ModelServer(http_port=spec["port"], enable_grpc=False, workers=1, enable_docs_url=False)
    server.register_model(model)
    # kserve's RESTServer binds 0.0.0.0; binding the socket here keeps a laptop's model
    # server on the host the settings name (127.0.0.1 by default).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((spec["host"], spec["port"]))
    rest = RESTServer(
        FASTAPI_APP_IMPORT_STRING,
        server.dataplane,
        server.model_repository_extension,
        spec["port"],
        grace_period=10,
    )
    rest.run(sockets=[sock])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m handoff.serving <server.json>")
    serve(Path(sys.argv[1]))
