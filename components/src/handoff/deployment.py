"""Serve a registered version and smoke-test it, on this machine or on a cluster: what the deploy
and rollback steps do once they know which version.

Locally, the model is fetched from the registry (what was registered is what is served), its
sha256 is checked against the version's tag, and it is served with the KServe model server and
the contract it was registered with, blue/green: the new server starts beside the running one and
must pass the smoke test and the contract's latency SLO before it takes over the port; if it does
not, the version that was serving keeps serving and the deploy fails saying why.

On a cluster, the project's KServe InferenceService is pointed at the version's Triton model
repository in the MLflow artifact store (its ``handoff.triton_uri`` tag), rolled out with a
canary, smoke-tested with the contract example it was registered with, then promoted or rolled
back (``handoff.kube.inference_service``).

A pipeline's deploy (``champion_only``) serves only the champion and completes its register's
promotion: if it fails, the promotion is undone (``handoff.registry.undo_promotion``).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from handoff.ab_state import running_ab
from handoff.artifacts import EXAMPLE_FILE, EXTRA_DIR, ONNX_FILE
from handoff.contract import CONTRACT_FILE, Contract, load_contract
from handoff.contract_changes import contract_changes
from handoff.errors import HandoffError
from handoff.files import read_json, write_json
from handoff.payload_log import payload_store
from handoff.project import Project
from handoff.raw_io import check_cluster_runtime
from handoff.registry import (
    SHA_TAG,
    TRITON_TAG,
    describe_registered_model,
    fetch_model,
    mark_served,
    registered_example,
    undo_promotion,
    version_tags,
)
from handoff.serving import local_server
from handoff.serving.local_server import ServerHandle
from handoff.serving.smoke import LatencyResult, SmokeResult, latency_check, smoke_test
from handoff.serving.spec import server_settings
from handoff.tracking import CHAMPION, alias_version, use_tracking

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from handoff.kube.inference_service import Release, Rollout


@dataclass(frozen=True)
class DeployResult:
    """Where the version is served and what the smoke test saw."""

    url: str
    model_name: str
    version: str
    pid: int
    smoke_passed: bool
    smoke_detail: str
    smoke_latency_ms: float
    seconds: float
    target: str = "local"  # local: this machine's model server (pid); cluster: an InferenceService
    served_p99_ms: float = 0.0  # local: p99 of the latency check before the version took over


def _port_of(handle: ServerHandle) -> int:
    return int(urlsplit(handle.url).port or 80)


def write_spec(
    project: Project,
    model_dir: Path,
    model_name: str,
    version: str,
    port: int,
    handover: Path | None,
    spec_file: Path | None = None,
) -> Path:
    """The server's spec (``spec_file``, by default ``server.json`` beside the version's files): the
    version's files, where to listen, and handoff.yaml's serving settings."""
    serving = project.settings.serving
    spec_file = spec_file or model_dir / "server.json"
    local_server.serving_marker(spec_file).unlink(missing_ok=True)
    write_json(
        spec_file,
        {
            "model_name": model_name,
            "onnx_path": str(model_dir / ONNX_FILE),
            "contract_dir": str(model_dir / EXTRA_DIR),
            "host": serving.host,
            "port": port,
            # The payload log `handoff monitor` reads (payload_store: the state folder by default).
            **server_settings(serving, version, project.settings.monitoring, payload_store(project)),
            "handover": str(handover or ""),
        },
    )
    return spec_file


def _project_socket(project: Project, previous: ServerHandle | None) -> socket.socket:
    """The socket the new version will accept on: the running version's own listening socket when
    serving.port is its port or 0 (the two then accept from one queue while versions change), else
    serving.port bound here, which must be free, and not yet listening."""
    serving = project.settings.serving
    same_host = previous is not None and urlsplit(previous.url).hostname == serving.host.strip("[]")
    if previous is not None and same_host and serving.port in (0, _port_of(previous)):
        return local_server.listener_of(previous)
    return local_server.bind(serving.host, serving.port, listen=False)


def enforced_contract(
    project: Project, registered: Contract, name: str, version: str, *, registered_contract: bool = False
) -> Contract:
    """The contract deploy enforces: the working tree's, which may have moved on since the version
    was registered (a new latency SLO applies to what is deployed now), said on stderr when it
    differs; an interface the version's ONNX graph was not exported for is refused. With
    ``registered_contract`` (rollback), the one the version was registered with."""
    if registered_contract:
        return registered
    interface, other = contract_changes(registered, project.contract)
    if interface:
        raise HandoffError(
            f"contract.yaml declares another interface than {name} v{version} was exported for "
            f"({'; '.join(interface)}); export and register the model again",
            file=project.root / CONTRACT_FILE,
        )
    if other:
        print(
            f"handoff: deploy: enforcing the working tree's contract.yaml, which differs from the one "
            f"v{version} was registered with: {'; '.join(other)}",
            file=sys.stderr,
            flush=True,
        )
    return project.contract


@contextlib.contextmanager
def _promotion_follows(project: Project, name: str, version: str, champion_only: bool) -> Iterator[None]:
    """A pipeline's deploy (``champion_only``) completes its register's promotion: if it fails,
    the promotion is undone with it (``undo_promotion``) and the error says what champion is now."""
    try:
        yield
    except HandoffError as exc:
        if not champion_only:
            raise
        why = str(exc).split(";")[0]
        client = use_tracking(project)
        done = undo_promotion(client, name, version, why)
        if not done:
            raise
        describe_registered_model(client, name, project)
        raise HandoffError(f"{exc}; {done}") from None


def refuse_during_ab(project: Project) -> None:
    """A deploy while ``handoff ab`` splits the port's traffic would end the test half-way."""
    ab = running_ab(project)
    if ab is not None:
        raise HandoffError(
            f"an A/B test of {ab.model_name} v{ab.champion} against v{ab.challenger} serves this "
            "project's port; end it first with `handoff ab stop --promote` or `--rollback` "
            "(`handoff ab status` shows where it stands)"
        )


def require_champion(project: Project, name: str, version: str) -> None:
    """Refuse to serve a version that is not the champion: a pipeline deploys what its register
    promoted, and a later run may have promoted another since (that run deploys its own)."""
    champion = alias_version(use_tracking(project), name, CHAMPION)
    if champion != version:
        now = f"v{champion} is" if champion else "no version is"
        raise HandoffError(
            f"not deploying {name} v{version}: it is not the champion ({now}, promoted after this run's "
            "register); the run that promoted the champion deploys it, and what is serving was left as it was"
        )


def deploy_locally(
    project_dir: Path | str,
    model_name: str,
    version: str,
    *,
    champion_only: bool = False,
    registered_contract: bool = False,
    ending_ab: bool = False,
) -> DeployResult:
    """Serve ``model_name`` version ``version`` on this machine, blue/green, and smoke-test it.

    While an A/B test serves the port (``handoff ab``), only ``handoff ab stop`` deploys
    (``ending_ab``): the router's arms would otherwise be left running unseen.

    The checks enforce the working tree's contract.yaml (``enforced_contract``: its SLOs may have
    moved on since registration; its interface may not), or with ``registered_contract`` (what
    rollback passes: it restores what served before) the one the version was registered with.
    Once the version serves, its ``handoff.served`` tag says where and when.

    ``champion_only`` (what the pipelines pass) refuses a version the ``champion`` alias no longer
    points at (``require_champion``), before anything changes; and if the deploy fails, the
    promotion it was to complete is undone (``undo_promotion``), so champion never stays on a
    version that never served.

    The new version's server starts beside the running one on a private port, where it must pass
    the smoke test and the contract's latency SLO; only then does it accept on the project's port
    (the old server's own listening socket, handed over), and the old server stops accepting,
    finishes its requests and exits. If the new server fails to start or fails a check, it is
    stopped, the old version never stopped serving, and the deploy fails saying why.
    """
    started = time.perf_counter()
    project = Project.load(project_dir)
    with local_server.deploy_lock(project.state_dir):
        if champion_only:
            require_champion(project, model_name, version)
        with _promotion_follows(project, model_name, version, champion_only):
            if not ending_ab:  # inside: a pipeline's promotion is undone when its deploy is refused
                refuse_during_ab(project)
            handle, smoke, latency = _blue_green(project, model_name, version, registered_contract)
        mark_served(project, model_name, version, f"local {handle.url}")
    return DeployResult(
        url=handle.url,
        model_name=model_name,
        version=version,
        pid=handle.pid,
        smoke_passed=True,
        smoke_detail=smoke.detail,
        smoke_latency_ms=smoke.latency_ms,
        seconds=round(time.perf_counter() - started, 3),
        served_p99_ms=round(latency.p99_ms, 3),
    )


def _blue_green(
    project: Project, model_name: str, version: str, registered_contract: bool
) -> tuple[ServerHandle, SmokeResult, LatencyResult]:
    """Start the version beside the serving one; it takes over only once its checks passed."""
    model_dir = fetch_model(project, model_name, version)
    registered = load_contract(model_dir / EXTRA_DIR)  # the contract this version was registered with
    contract = enforced_contract(
        project, registered, model_name, version, registered_contract=registered_contract
    )
    example = read_json(model_dir / EXTRA_DIR / EXAMPLE_FILE)
    previous = local_server.current(project.state_dir, project.root)
    with contextlib.ExitStack() as sockets:  # closed here unless the new server took them
        port = sockets.enter_context(_project_socket(project, previous))  # busy: fails before any change
        private = sockets.enter_context(local_server.bind(project.settings.serving.host, 0))
        check_url = local_server.url_of(private)
        handover = local_server.handover_path()
        spec_file = write_spec(project, model_dir, model_name, version, port.getsockname()[1], handover)
        try:
            handle = local_server.start(
                spec_file,
                private,
                model_name=model_name,
                version=version,
                state_dir=project.state_dir,
                ready_timeout_s=project.settings.serving.ready_timeout_s,
                takeover=port,
                handover=handover,
                project=project.root,
            )
        except HandoffError as exc:
            raise HandoffError(f"{exc}; {_still_serving(previous)}") from None
    try:
        smoke = smoke_test(check_url, model_name, contract, example)
        if not smoke.passed:
            raise _NotTakingOver(smoke.detail)
        latency = latency_check(check_url, model_name, contract, example)
        if not latency.passed:
            raise _NotTakingOver(latency.detail)
        local_server.take_over(handle)
    except BaseException as exc:  # Ctrl-C included: never leave an unrecorded server behind
        local_server.terminate(handle)
        if isinstance(exc, _NotTakingOver):
            raise HandoffError(
                f"{model_name}/{version} did not pass its checks before taking over: {exc}; "
                f"the new server was stopped and {_still_serving(previous)}"
            ) from None
        if isinstance(exc, HandoffError):
            raise HandoffError(f"{exc}; {_still_serving(previous)}") from None
        raise
    local_server.record(project.state_dir, handle)
    if previous is not None:
        local_server.retire(previous)  # stops accepting, finishes its requests, exits
    return handle, smoke, latency


class _NotTakingOver(Exception):
    """The new server failed a check it must pass before it serves the project's port."""


def _still_serving(previous: ServerHandle | None) -> str:
    if previous is None:
        return "nothing was serving before"
    return f"version {previous.version} keeps serving at {previous.url}"


def registered_release(project: Project, name: str, version: str) -> tuple[Release, Contract, dict[str, Any]]:
    """The version's Triton repository, and the contract and example it was registered with."""
    from handoff.kube.inference_service import Release

    tags = version_tags(project, name, version)
    missing = [tag for tag in (SHA_TAG, TRITON_TAG) if not tags.get(tag)]
    if missing:
        raise HandoffError(
            f"registered version {name}/{version} has no {' or '.join(missing)} tag (registered before "
            "cluster serving existed); export and register it again"
        )
    contract, example = registered_example(project, name, version)
    release = Release(model_name=name, version=version, sha256=tags[SHA_TAG], triton_uri=tags[TRITON_TAG])
    return release, contract, example


def deploy_to_cluster(
    project_dir: Path | str,
    model_name: str,
    version: str,
    *,
    api: ApiClient | None = None,
    champion_only: bool = False,
    registered_contract: bool = False,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    ending_ab: bool = False,
) -> DeployResult:
    """Roll ``model_name`` version ``version`` out to the project's InferenceService (``deploy_locally``
    says what ``champion_only``, ``registered_contract`` and ``ending_ab`` do; on a cluster an A/B
    test is the project's InferenceGraph, ``handoff ab start --cluster``)."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    if champion_only:
        require_champion(project, model_name, version)
    with _promotion_follows(project, model_name, version, champion_only):
        done = _roll_out(
            project, model_name, version, api, poll_s, clock, sleep, registered_contract, ending_ab
        )
    mark_served(project, model_name, version, f"cluster {done.url}")
    return DeployResult(
        url=done.url,
        model_name=model_name,
        version=version,
        pid=0,
        smoke_passed=done.smoke.passed,
        smoke_detail=done.smoke.detail,
        smoke_latency_ms=done.smoke.latency_ms,
        seconds=round(time.perf_counter() - started, 3),
        target="cluster",
    )


def _roll_out(
    project: Project,
    model_name: str,
    version: str,
    api: ApiClient | None,
    poll_s: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    registered_contract: bool,
    ending_ab: bool,
) -> Rollout:
    """Point the InferenceService at the version, canary, smoke-test, promote or roll back."""
    from handoff.kube import inference_service as isvc
    from handoff.kube.client import api_client
    from handoff.kube.inference_graph import GraphClient, graph_name

    release, registered, example = registered_release(project, model_name, version)
    contract = enforced_contract(
        project, registered, model_name, version, registered_contract=registered_contract
    )
    check_cluster_runtime(registered, project.settings, project.root)  # Triton runs no preprocess
    if release.triton_uri.startswith("file://"):
        isvc.log(
            f"warning: the model's files are on a local path ({release.triton_uri}); the predictor "
            "can only download them if that path is mounted into it (use object storage for MLflow)"
        )
    api = api or api_client()
    namespace = project.settings.namespace
    services = isvc.ServiceClient(namespace, project.settings.project, api, retry_s=poll_s, sleep=sleep)
    if not ending_ab:  # the graph's champion arm is this service: a new version would end the test
        graph = GraphClient(namespace, graph_name(project.settings.project), api, retry_s=poll_s, sleep=sleep)
        if graph.get() is not None:
            raise HandoffError(
                f"an A/B test ({graph.what}) routes between this project's InferenceService and its "
                "challenger; end it first with `handoff ab stop --promote` or `--rollback` (where it "
                "was started)"
            )
    return isvc.rollout(
        services,
        project.settings,
        release,
        lambda url: smoke_test(url, model_name, contract, example),
        isvc.Watch(services, poll_s=poll_s, clock=clock, sleep=sleep),
    )
