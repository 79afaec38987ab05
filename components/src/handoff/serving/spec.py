"""What handoff.yaml's ``serving`` settings tell the model server, in its spec (server.json).

The local deploy writes them into the spec it starts the server with; on a cluster the
InferenceService passes them to the ``handoff-onnx`` runtime as one environment variable
(``SETTINGS_ENV``, JSON), which the runtime's prologue (manifests/base/serving-runtime.yaml)
merges into the spec it writes. So both servers run with the same settings. Triton ignores them.
"""

from __future__ import annotations

from typing import Any

from handoff.settings import ServingSettings

MIB = 1024 * 1024
SETTINGS_ENV = "HANDOFF_SERVER_SETTINGS"


def server_settings(serving: ServingSettings, model_version: str) -> dict[str, Any]:
    """The spec's keys that come from handoff.yaml, for the registered version ``model_version``."""
    return {
        "model_version": str(model_version),
        "max_request_bytes": int(serving.max_request_mib * MIB),
        "max_inflight_bytes": int(serving.max_inflight_mib * MIB),
        "max_concurrency": serving.max_concurrency,
        "header_timeout_s": serving.header_timeout_s,
        "shutdown_grace_s": serving.shutdown_grace_s,
        "batching": serving.batching.model_dump(),
    }
