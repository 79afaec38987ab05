"""An A/B test on a cluster: a KServe InferenceGraph that splits traffic between two InferenceServices.

The champion keeps the project's InferenceService (``<project>``, :mod:`handoff.kube.inference_service`);
the challenger gets one of its own, ``<project>-challenger``, built by the same
:func:`~handoff.kube.isvc_manifest.manifest` (so it runs as the champion does, with the same
serving settings and payload logger) but labelled as the A/B's and never given a canary. The graph
``<project>-ab`` (``serving.kserve.io/v1alpha1``) has one ``Splitter`` node over the two.

What KServe's router does with it (``cmd/router/main.go``, v0.20.0): each request, whatever its
path, is POSTed to the URL of one step, drawn afresh per request with the steps' weights
(``pickupRoute``: a uniform number below 100 from ``crypto/rand``), so arms are *not* sticky per
caller; headers reach the step only if they match the router's configured patterns, and only the
step's body and status come back (its headers do not). KServe's graph controller fills a step's
URL from ``serviceName`` only when ``serviceUrl`` is empty, with the service's
``status.address.url`` and ``/v2/models/<model>/infer``, where ``<model>`` is the
InferenceService's name unless its predictor names another in ``--model_name`` or
``MLSERVER_MODEL_NAME`` (``GetPredictorEndpoint``/``GetModelName``, pkg/controller/v1beta1/
inferenceservice/utils). handoff's predictors serve the contract's model name, which is not the
service's, so each step carries its ``serviceUrl`` too, built the same way from the service's
address with the model's name; ``serviceName`` stays, so the controller still waits for the
service to exist.

Everything is applied with server-side apply through :class:`~handoff.kube.isvc_client.ServiceClient`
(retries, preconditions), :class:`GraphClient` being the same client for the graph.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

from handoff.errors import HandoffError
from handoff.kube.isvc_client import ServiceClient, flat
from handoff.kube.isvc_manifest import DEPLOYMENT_MODE, Release, manifest
from handoff.labels import labels
from handoff.settings import Settings

GRAPH_GROUP, GRAPH_VERSION = "serving.kserve.io", "v1alpha1"
GRAPH_PLURAL, GRAPH_KIND = "inferencegraphs", "InferenceGraph"
GRAPH_API_VERSION = f"{GRAPH_GROUP}/{GRAPH_VERSION}"
# The node KServe's router starts every request at (v1alpha1.GraphRootNodeName).
ROOT = "root"
SPLITTER = "Splitter"
CHAMPION_STEP, CHALLENGER_STEP = "champion", "challenger"
CHALLENGER_SUFFIX, GRAPH_SUFFIX = "-challenger", "-ab"
# What the A/B's objects say they are (app.kubernetes.io/component), beside "serving".
AB_COMPONENT = "ab-test"


def challenger_name(project: str) -> str:
    return f"{project}{CHALLENGER_SUFFIX}"


def graph_name(project: str) -> str:
    return f"{project}{GRAPH_SUFFIX}"


def challenger_manifest(settings: Settings, release: Release, *, mode: str | None = None) -> dict[str, Any]:
    """The challenger's InferenceService: the champion's manifest for ``release`` under another name.

    ``mode`` is the champion's deployment mode (its ``status.deploymentMode``), asked for in the
    annotation so both arms run alike: the raw mode's predictor fields (a ``preStop`` hook, a
    termination grace period) are refused by Knative.
    """
    raw = mode in ("RawDeployment", "Standard")
    obj = manifest(settings, release, raw=raw)
    meta = obj["metadata"]
    meta["name"] = challenger_name(settings.project)
    meta["labels"] = labels(settings.project, AB_COMPONENT)
    if mode:
        meta["annotations"][DEPLOYMENT_MODE] = mode
    return obj


def step_url(address: str, model_name: str) -> str:
    """Where the router sends a step's requests: the service's in-cluster address and the V2 infer
    path of the model it serves (what KServe's controller would build, with the right model name)."""
    return f"{address.rstrip('/')}/v2/models/{model_name}/infer"


def graph_manifest(
    settings: Settings,
    share: int,
    *,
    champion_url: str,
    challenger_url: str,
) -> dict[str, Any]:
    """The InferenceGraph that sends ``share`` percent of requests to the challenger, the rest to
    the champion (``champion_url``/``challenger_url``: :func:`step_url`)."""
    if not 1 <= share <= 99:
        raise HandoffError(f"the challenger's share must be 1 to 99 percent, found {share}", field="--share")
    steps = [
        {
            "name": CHAMPION_STEP,
            "serviceName": settings.project,
            "serviceUrl": champion_url,
            "weight": 100 - share,
        },
        {
            "name": CHALLENGER_STEP,
            "serviceName": challenger_name(settings.project),
            "serviceUrl": challenger_url,
            "weight": share,
        },
    ]
    return {
        "apiVersion": GRAPH_API_VERSION,
        "kind": GRAPH_KIND,
        "metadata": {
            "name": graph_name(settings.project),
            "namespace": settings.namespace,
            "labels": labels(settings.project, AB_COMPONENT),
        },
        "spec": {"nodes": {ROOT: {"routerType": SPLITTER, "steps": steps}}},
    }


def weights_of(obj: dict[str, Any]) -> dict[str, int]:
    """Each step's weight in a graph as read back (step name -> percent)."""
    root = (((obj.get("spec") or {}).get("nodes") or {}).get(ROOT)) or {}
    return {str(s.get("name")): int(s.get("weight") or 0) for s in root.get("steps") or []}


def say(message: str) -> None:
    """One line per transition, on stderr, as the deploy logs."""
    print(f"handoff: ab: {flat(message)}", file=sys.stderr, flush=True)


class GraphClient(ServiceClient):
    """:class:`ServiceClient`'s calls (read, server-side apply, delete, retries) for an InferenceGraph."""

    group: ClassVar[str] = GRAPH_GROUP
    version: ClassVar[str] = GRAPH_VERSION
    plural: ClassVar[str] = GRAPH_PLURAL
    kind: ClassVar[str] = GRAPH_KIND


def ready_condition(obj: dict[str, Any]) -> dict[str, Any]:
    for found in (obj.get("status") or {}).get("conditions") or []:
        if found.get("type") == "Ready":
            return dict(found)
    return {}


def wait_graph_ready(
    graphs: GraphClient,
    timeout_s: float,
    *,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the graph until its controller says Ready with a URL; HandoffError when it says it
    failed (Ready False with a reason: its router's Knative Service or Deployment failed), is
    deleted, or the timeout passes. A graph whose services are missing or not ready yet has no
    status at all (the controller requeues before writing any), which is waited on too."""
    deadline = clock() + timeout_s
    last = ""
    while True:
        obj = graphs.get()
        if obj is None:
            raise HandoffError(f"{graphs.what} was deleted while waiting for it")
        ready = ready_condition(obj)
        url = (obj.get("status") or {}).get("url")
        if ready.get("status") == "True" and url:
            return obj
        now = ready.get("status", "no status yet") + (
            f" ({ready.get('message')})" if ready.get("message") else ""
        )
        if now != last:
            graphs.say(f"{graphs.what}: Ready {now}")
            last = now
        if ready.get("status") == "False" and ready.get("reason"):
            raise HandoffError(f"{graphs.what} failed: {ready['reason']}: {ready.get('message', '')}")
        if clock() >= deadline:
            raise HandoffError(
                f"{graphs.what} not Ready within serving.kserve.ready_timeout_s = {timeout_s:g} s "
                f"(last: Ready {last})"
            )
        sleep(poll_s)
