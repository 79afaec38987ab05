"""One way to reach the API server, and API errors as messages a person can act on."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from handoff.errors import HandoffError


def api_client() -> client.ApiClient:
    """In a pod, its service account; elsewhere, the current kubeconfig context."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError) as exc:
            raise HandoffError(
                f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({exc}); "
                "set KUBECONFIG or run `kubectl config use-context <cluster>`"
            ) from None
    return client.ApiClient()


def reason(exc: ApiException) -> str:
    """The API server's own message (its Status body) rather than the client's HTTP dump."""
    try:
        body: Any = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    return f"HTTP {exc.status}: {message or exc.reason}"


def describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"


def api_error(exc: ApiException, action: str, what: str) -> HandoffError:
    hint = {
        401: " (credentials rejected)",
        403: " (the step's ServiceAccount lacks this permission: grant it in the namespace's Role)",
        404: " (not found: is the CRD installed (`kubectl get crd`), or was the object deleted?)",
    }.get(exc.status or 0, "")
    return HandoffError(f"could not {action} {what}: {reason(exc)}{hint}")
