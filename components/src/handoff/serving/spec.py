"""What handoff.yaml's ``serving`` settings tell the model server, in its spec (server.json).

The local deploy writes them into the spec it starts the server with; on a cluster the
InferenceService passes them to the ``handoff-onnx`` runtime as one environment variable
(``SETTINGS_ENV``, JSON), which the runtime's prologue (manifests/base/serving-runtime.yaml)
merges into the spec it writes. So both servers run with the same settings. Triton ignores them.
"""

from __future__ import annotations

from typing import Any

from handoff.settings import MonitoringSettings, ServingSettings

MIB = 1024 * 1024
SETTINGS_ENV = "HANDOFF_SERVER_SETTINGS"


def server_settings(
    serving: ServingSettings,
    model_version: str,
    monitoring: MonitoringSettings | None = None,
    payload_store: str | None = None,
) -> dict[str, Any]:
    """The spec's keys that come from handoff.yaml, for the registered version ``model_version``.
    With ``monitoring``, the server keeps a payload log in ``payload_store`` (else
    ``monitoring.store``); without, or with no store, it keeps none (on a cluster KServe's logger
    sends the payloads out instead)."""
    settings: dict[str, Any] = {
        "model_version": str(model_version),
        "max_request_bytes": int(serving.max_request_mib * MIB),
        "max_inflight_bytes": int(serving.max_inflight_mib * MIB),
        "max_concurrency": serving.max_concurrency,
        "header_timeout_s": serving.header_timeout_s,
        "shutdown_grace_s": serving.shutdown_grace_s,
        "batching": serving.batching.model_dump(),
    }
    if monitoring is not None:
        settings["payload_log"] = {
            "sample_rate": monitoring.sample_rate,
            "max_bytes": int(monitoring.max_mib * MIB),
            "store": payload_store or monitoring.store,
        }
    return settings
