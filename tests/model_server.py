"""A real model server for a test module: ``python -m handoff.serving`` on a free port of 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handoff.files import write_json
from handoff.serving import local_server
from handoff.serving.local_server import ServerHandle

MODEL = "digits-classifier"  # the default project's model


def start_server(
    state: Path, onnx_path: Path, contract_dir: Path, model_name: str = MODEL, **spec: Any
) -> tuple[ServerHandle, str]:
    """Start a server for ``onnx_path`` under ``contract_dir``'s contract (``spec``: more server.json
    keys, e.g. ``model_version`` or limits), ready; its handle and base URL. Stop it with
    ``local_server.terminate(handle)``."""
    sock = local_server.bind("127.0.0.1", 0)
    url = local_server.url_of(sock)
    spec_file = state / "spec.json"
    write_json(
        spec_file,
        {
            "model_name": model_name,
            "onnx_path": str(onnx_path),
            "contract_dir": str(contract_dir),
            "host": "127.0.0.1",
            "port": sock.getsockname()[1],
            **spec,
        },
    )
    version = str(spec.get("model_version", "1"))
    handle = local_server.start(
        spec_file, sock, model_name=model_name, version=version, state_dir=state, ready_timeout_s=60
    )
    return handle, url
