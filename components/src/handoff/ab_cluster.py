"""A/B test two registered versions on a cluster: start serves both behind a KServe InferenceGraph,
stop promotes the challenger to the project's InferenceService or rolls back to the champion.

``start`` leaves the champion where it is (the project's InferenceService, which must serve the
champion, Ready, with no rollout in flight), rolls the challenger out to an InferenceService of its
own and smoke-tests it as a deploy does (the contract example it was registered with), then applies
the graph (:mod:`handoff.kube.inference_graph`) and waits until KServe reports it Ready with a URL:
callers send their requests there for the length of the test. Whatever fails, start removes what it
made before it says why, so a cluster never holds half an A/B.

``stop`` with ``promote`` rolls the project's InferenceService to the challenger's version through
the deploy (canary, smoke test, promotion or rollback, :func:`handoff.deployment.deploy_to_cluster`)
while the graph still routes, then deletes the graph and the challenger's service; without it,
deletes them only, and the champion, which never stopped serving, takes every request again at the
service's own URL. Deleting what is already gone is no error, so a stop can be repeated.

Moving the registry's ``champion`` alias is the caller's (under the promotion lock): this module
only serves. The engineer's own credentials are used (their kubeconfig), not the pipeline's
ServiceAccount, whose Role has no delete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handoff.deployment import deploy_to_cluster, enforced_contract, registered_release
from handoff.errors import HandoffError
from handoff.kube.client import api_client
from handoff.kube.inference_graph import (
    GraphClient,
    challenger_manifest,
    challenger_name,
    graph_manifest,
    graph_name,
    say,
    step_url,
    wait_graph_ready,
)
from handoff.kube.isvc_client import ServiceClient, flat
from handoff.kube.isvc_manifest import MODEL_NAME_KEY, VERSION_KEY, annotations_of, canary_of, mode_of
from handoff.kube.isvc_plan import Step
from handoff.kube.isvc_status import Before, RolloutFailed, smoke_url
from handoff.kube.isvc_watch import Watch
from handoff.project import Project
from handoff.raw_io import check_cluster_runtime
from handoff.serving.smoke import smoke_test

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


class CleanupFailed(HandoffError):
    """The test ended (the winner serves alone) but a graph or challenger service is left over."""


@dataclass(frozen=True)
class ClusterAb:
    """An A/B test running on a cluster: where its traffic goes and what it compares."""

    graph: str  # InferenceGraph name
    url: str  # the graph's status.url (where callers send traffic)
    champion: str  # version
    challenger: str  # version
    share: int  # percent to the challenger
    challenger_service: str


def _check_share(share: int) -> None:
    if isinstance(share, bool) or not isinstance(share, int) or not 1 <= share <= 99:
        raise HandoffError(
            f"the challenger's share of traffic must be a whole percent from 1 to 99, found {share!r}",
            field="--share",
        )


def _address(obj: dict[str, Any], what: str) -> str:
    """The service's in-cluster address (``status.address.url``), as KServe's graph controller reads it."""
    address = ((obj.get("status") or {}).get("address") or {}).get("url")
    if not address:
        raise HandoffError(f"{what} reports no status.address.url for the InferenceGraph to route to")
    return str(address)


def _serving_champion(obj: dict[str, Any] | None, what: str, model_name: str, champion: str) -> str:
    """The champion's address, if ``obj`` serves ``model_name`` version ``champion`` alone and Ready."""
    if obj is None:
        raise HandoffError(
            f"{what} does not exist: deploy the champion (v{champion}) to the cluster first "
            "(handoff deploy --cluster), then start the A/B test"
        )
    notes = annotations_of(obj)
    served = (notes.get(MODEL_NAME_KEY), notes.get(VERSION_KEY))
    if served != (model_name, champion):
        raise HandoffError(
            f"{what} serves {served[0]} v{served[1]}, not the champion {model_name} v{champion}: deploy the "
            "champion first (handoff deploy --cluster), or name the version it serves"
        )
    if canary_of(obj) is not None:
        raise HandoffError(f"{what} is in the middle of a rollout (canaryTrafficPercent is set); wait for it")
    ready = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
    if not ready or ready[0].get("status") != "True":
        raise HandoffError(f"{what} is not Ready; the A/B test needs the champion serving")
    return _address(obj, what)


def start_ab_on_cluster(
    project_dir: Path | str,
    model_name: str,
    champion: str,
    challenger: str,
    share: int,
    *,
    api: ApiClient | None = None,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ClusterAb:
    """Serve ``challenger`` beside ``champion`` with ``share`` percent of the requests (module docstring)."""
    _check_share(share)
    if champion == challenger:
        raise HandoffError(f"the challenger must be another version than the champion (both are v{champion})")
    project = Project.load(project_dir)
    settings = project.settings
    namespace, api = settings.namespace, api or api_client()

    def client(name: str) -> ServiceClient:
        return ServiceClient(namespace, name, api, retry_s=poll_s, sleep=sleep, say=say)

    champions, challengers = client(settings.project), client(challenger_name(settings.project))
    graphs = GraphClient(namespace, graph_name(settings.project), api, retry_s=poll_s, sleep=sleep, say=say)
    live = champions.get()
    champion_address = _serving_champion(live, champions.what, model_name, champion)
    assert live is not None
    if graphs.get() is not None:
        raise HandoffError(
            f"an A/B test is already running ({graphs.what}); stop it first: "
            "handoff ab stop --promote or --rollback"
        )
    release, registered, example = registered_release(project, model_name, challenger)
    contract = enforced_contract(project, registered, model_name, challenger)
    check_cluster_runtime(registered, settings, project.root)
    config = challenger_manifest(settings, release, mode=mode_of(live))
    timeout_s = settings.serving.kserve.ready_timeout_s
    made: list[ServiceClient] = []  # what to remove if start fails, graph first
    try:
        obj, before = _apply_challenger(challengers, config)
        made.append(challengers)
        watch = Watch(challengers, poll_s=poll_s, clock=clock, sleep=sleep)
        obj = watch.ready(int(obj["metadata"]["generation"]), timeout_s, before, None)
        url = smoke_url(obj)
        if not url:
            raise RolloutFailed("it is Ready but reports no URL to send the smoke test to")
        smoke = smoke_test(url, model_name, contract, example)
        if not smoke.passed:
            raise RolloutFailed(f"smoke test of {model_name} v{challenger} at {url} failed: {smoke.detail}")
        say(f"{challengers.what}: smoke test passed at {url} ({smoke.latency_ms:.1f} ms)")
        graph = graph_manifest(
            settings,
            share,
            champion_url=step_url(champion_address, model_name),
            challenger_url=step_url(_address(obj, challengers.what), model_name),
        )
        if graphs.create(graph) is None:
            raise HandoffError(f"{graphs.what} appeared meanwhile: another A/B test was started")
        made.insert(0, graphs)
        say(f"created {graphs.what}: {100 - share}% to v{champion}, {share}% to v{challenger}")
        ready = wait_graph_ready(graphs, timeout_s, poll_s=poll_s, clock=clock, sleep=sleep)
    except (HandoffError, RolloutFailed) as failure:
        raise HandoffError(
            flat(f"A/B test of {model_name} v{challenger}: {failure}; {_remove(made)}")
        ) from None
    except BaseException:  # Ctrl-C included: never leave half an A/B behind
        _remove(made)
        raise
    url = str(ready["status"]["url"])
    say(f"{graphs.what} is Ready at {url}: send requests there for the A/B test")
    return ClusterAb(
        graph=graphs.name,
        url=url,
        champion=champion,
        challenger=challenger,
        share=share,
        challenger_service=challengers.name,
    )


def _apply_challenger(challengers: ServiceClient, config: dict[str, Any]) -> tuple[dict[str, Any], Before]:
    """Create the challenger's service, or (one left by an A/B test that was killed) apply to it;
    the object as stored and what its status said before."""
    obj = challengers.create(config) if challengers.get() is None else None
    if obj is not None:
        say(f"created {challengers.what}: {_version(config)}")
        return obj, Before()
    seen: list[Before] = []

    def decide(live: dict[str, Any]) -> Step:
        owner = ((live.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/managed-by")
        if owner != "handoff":
            raise HandoffError(
                f"{challengers.what} exists but is not managed by handoff (label "
                f"app.kubernetes.io/managed-by is {owner!r}); delete or rename it"
            )
        seen.append(Before.applying(live, config))
        return Step(config)

    _, obj = challengers.update(decide)
    say(f"applied {_version(config)} to {challengers.what}, left by an earlier A/B test")
    return obj, seen[-1]


def _version(config: dict[str, Any]) -> str:
    notes = config["metadata"]["annotations"]
    return f"{notes[MODEL_NAME_KEY]} v{notes[VERSION_KEY]}"


def _remove(made: list[ServiceClient]) -> str:
    """Delete what a start made (the graph before the service it routes to); what was done."""
    if not made:
        return "nothing was created"
    gone, failed = [], []
    for found in made:
        try:
            found.delete()
            gone.append(found.what)
        except HandoffError as exc:
            failed.append(str(exc))
    said = f"removed {', '.join(gone)}" if gone else ""
    if failed:
        said += ("; " if said else "") + "could not remove: " + "; ".join(failed) + " (delete it by hand)"
    return said


def stop_ab_on_cluster(
    project_dir: Path | str,
    model_name: str,
    ab: ClusterAb,
    *,
    promote: bool,
    api: ApiClient | None = None,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """End the A/B test ``ab``: with ``promote``, the project's InferenceService serves the challenger
    first; then the graph and the challenger's service go. One sentence saying what was done."""
    project = Project.load(project_dir)
    settings = project.settings
    api = api or api_client()
    graphs = GraphClient(settings.namespace, ab.graph, api, retry_s=poll_s, sleep=sleep, say=say)
    challengers = ServiceClient(
        settings.namespace, ab.challenger_service, api, retry_s=poll_s, sleep=sleep, say=say
    )
    left = challengers.get()
    owner = (((left or {}).get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/managed-by")
    if left is not None and owner != "handoff":
        raise HandoffError(
            f"{challengers.what} is not managed by handoff (managed-by {owner!r}); not deleting it"
        )
    if promote:
        try:
            deploy_to_cluster(
                project_dir,
                model_name,
                ab.challenger,
                api=api,
                registered_contract=False,
                ending_ab=True,
                poll_s=poll_s,
                clock=clock,
                sleep=sleep,
            )
        except HandoffError as exc:
            raise HandoffError(
                flat(
                    f"promoting v{ab.challenger} failed: {exc}; the A/B test is left running ({graphs.what})"
                )
            ) from None
    if promote:
        done = (
            f"promoted {model_name} v{ab.challenger}: InferenceService "
            f"{settings.namespace}/{settings.project} serves it with all traffic"
        )
    else:
        done = (
            f"rolled back: InferenceService {settings.namespace}/{settings.project} keeps serving "
            f"{model_name} v{ab.champion} with all traffic"
        )
    removed = []
    for found in (graphs, challengers):  # the graph first: it must never route to a service that is gone
        try:
            removed.append(f"{found.what}{'' if found.delete() else ' (already gone)'}")
        except HandoffError as exc:
            raise CleanupFailed(
                f"{done}, but {found.what} could not be deleted ({exc}): delete it by hand "
                f"(kubectl delete -n {settings.namespace} {found.plural} {found.name})"
            ) from None
    return f"{done}; removed {' and '.join(removed)}."
