"""The Kubernetes labels on everything handoff puts on a cluster: whose it is, which template made it.

Step pods, training jobs and (later) serving objects carry the same keys, so one selector finds a
project's objects and the template version shows which release of the platform ran them.
"""

from __future__ import annotations

from handoff import __version__

TEMPLATE_VERSION_LABEL = "handoff.dev/template-version"


def labels(project: str, component: str | None = None) -> dict[str, str]:
    found = {
        "app.kubernetes.io/name": project,
        "app.kubernetes.io/managed-by": "handoff",
        TEMPLATE_VERSION_LABEL: __version__,
    }
    if component:
        found["app.kubernetes.io/component"] = component
    return found
