"""An A/B test on a cluster: a KServe InferenceGraph over the champion's and the challenger's services.

Only the Kubernetes API is faked (``tests/fake_kube.py``): every object it receives is validated
against its CRD schema (strict about unknown fields); ``KServeGraphs`` plays KServe's controllers
for InferenceServices and InferenceGraphs, and the graph's router, which sends each request to
the step it draws. Each revision's URL is a real KServe model server on 127.0.0.1 serving that
version's exported ONNX model (the fixtures of test_inference_service), so a request routed to the
wrong URL or model name fails as it would on a cluster.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from handoff.ab_cluster import ClusterAb, start_ab_on_cluster, stop_ab_on_cluster
from handoff.errors import HandoffError
from handoff.kube import inference_graph as ig
from handoff.kube.isvc_manifest import CANARY_KEY, DEPLOYMENT_MODE, VERSION_KEY, Release
from handoff.project import Project

from .fake_kube import APPLY, INFERENCEGRAPH, INFERENCESERVICE, FakeKube, KServe, KServeGraphs, fake_kube
from .fake_kube import schema_problems as problems
from .test_inference_service import (  # noqa: F401 - fixtures, shared with the deploy tests
    NAMESPACE,
    POLL_S,
    answer,
    deploy,
    registered,
    servers,
    serving,
    version_of,
)
from .test_triton_layout import MODEL, Registered

pytestmark = pytest.mark.local

GRAPH = ("inferencegraphs", NAMESPACE, f"{MODEL}-ab")
CHALLENGER = ("inferenceservices", NAMESPACE, f"{MODEL}-challenger")
CHAMPION = ("inferenceservices", NAMESPACE, MODEL)
RELEASE = Release(model_name=MODEL, version="7", sha256="0" * 64, triton_uri="s3://models/7/triton")


@pytest.fixture
def cluster(servers: dict[str, str]) -> Iterator[tuple[FakeKube, KServeGraphs]]:  # noqa: F811
    """A fake API server whose KServe serves each version at its own model server."""
    controller = KServeGraphs(KServe(serving(servers)))
    with fake_kube(controller) as fake:
        yield fake, controller
    controller.close()


def start(registered: Registered, fake: FakeKube, share: int = 30, **options: Any) -> ClusterAb:  # noqa: F811
    return start_ab_on_cluster(
        registered.project, MODEL, "1", "2", share, api=fake.api_client(), poll_s=POLL_S, **options
    )


def stop(registered: Registered, fake: FakeKube, ab: ClusterAb, *, promote: bool) -> str:  # noqa: F811
    return stop_ab_on_cluster(
        registered.project, MODEL, ab, promote=promote, api=fake.api_client(), poll_s=POLL_S
    )


def test_the_graph_and_the_challenger_are_what_their_crds_accept(default_project: Any) -> None:
    settings = Project.load(default_project).settings
    graph = ig.graph_manifest(
        settings, 25, champion_url="http://a/v2/models/m/infer", challenger_url="http://b"
    )
    assert problems(INFERENCEGRAPH, graph) == []
    assert graph["metadata"]["name"] == f"{settings.project}-ab"
    assert graph["spec"]["nodes"]["root"] == {
        "routerType": "Splitter",
        "steps": [
            {
                "name": "champion",
                "serviceName": settings.project,
                "serviceUrl": "http://a/v2/models/m/infer",
                "weight": 75,
            },
            {
                "name": "challenger",
                "serviceName": f"{settings.project}-challenger",
                "serviceUrl": "http://b",
                "weight": 25,
            },
        ],
    }
    challenger = ig.challenger_manifest(settings, RELEASE)
    assert problems(INFERENCESERVICE, challenger) == []
    meta, predictor = challenger["metadata"], challenger["spec"]["predictor"]
    assert meta["name"] == f"{settings.project}-challenger"
    assert meta["labels"]["app.kubernetes.io/name"] == settings.project  # the project's selector finds it
    assert meta["labels"]["app.kubernetes.io/component"] == "ab-test"
    assert meta["annotations"][VERSION_KEY] == "7" and CANARY_KEY not in predictor
    assert DEPLOYMENT_MODE not in meta["annotations"] and "lifecycle" not in predictor["model"]
    # Beside a champion in raw deployment mode, the challenger asks for it and gets its fields.
    raw = ig.challenger_manifest(settings, RELEASE, mode="Standard")
    assert problems(INFERENCESERVICE, raw) == []
    assert raw["metadata"]["annotations"][DEPLOYMENT_MODE] == "Standard"
    assert raw["spec"]["predictor"]["model"]["lifecycle"]["preStop"]["sleep"]["seconds"] > 0


@pytest.mark.parametrize("share", [0, 100, -5])
def test_a_share_outside_1_to_99_is_refused_before_anything_happens(default_project: Any, share: int) -> None:
    with pytest.raises(HandoffError) as refused:
        start_ab_on_cluster(default_project, MODEL, "1", "2", share)  # no cluster needed to refuse it
    message = str(refused.value)
    assert "--share" in message and "1 to 99" in message and f"found {share}" in message


def test_start_serves_both_arms_behind_the_graph_and_promote_serves_the_challenger(
    registered: Registered,  # noqa: F811
    servers: dict[str, str],  # noqa: F811
    cluster: tuple[FakeKube, KServeGraphs],
) -> None:
    fake, controller = cluster
    deploy(registered, fake, "1")
    ab = start(registered, fake, 30)
    assert [r for r in fake.rejected if r.startswith("422")] == []
    graph, challenger = fake.get(*GRAPH), fake.get(*CHALLENGER)
    assert problems(INFERENCEGRAPH, graph) == [] and problems(INFERENCESERVICE, challenger) == []
    assert ig.weights_of(graph) == {"champion": 70, "challenger": 30}
    assert version_of(challenger) == "2" and version_of(fake.get(*CHAMPION)) == "1"
    assert ab == ClusterAb(
        graph=f"{MODEL}-ab",
        url=graph["status"]["url"],
        champion="1",
        challenger="2",
        share=30,
        challenger_service=f"{MODEL}-challenger",
    )
    applied = {path.rsplit("/", 2)[-2] for path, kind, _ in fake.patches if kind == APPLY}
    assert applied == {"inferenceservices", "inferencegraphs"}  # server-side apply, both kinds
    # Requests to the graph's URL reach both versions, each answering as itself.
    example = answer(servers["1"], registered), answer(servers["2"], registered)
    for _ in range(40):
        got = answer(ab.url, registered)
        assert any(np.allclose(got, want) for want in example)
    assert {"champion", "challenger"} <= set(controller.picks)
    done = stop(registered, fake, ab, promote=True)
    assert done.startswith(f"promoted {MODEL} v2: InferenceService {NAMESPACE}/{MODEL} serves it")
    assert GRAPH not in fake.objects and CHALLENGER not in fake.objects
    assert version_of(fake.get(*CHAMPION)) == "2"
    assert np.allclose(answer(fake.get(*CHAMPION)["status"]["url"], registered), example[1])


def test_rollback_leaves_the_champion_serving_and_stop_can_be_repeated(
    registered: Registered,  # noqa: F811
    cluster: tuple[FakeKube, KServeGraphs],
) -> None:
    fake, _ = cluster
    deploy(registered, fake, "1")
    before = fake.get(*CHAMPION)["metadata"]["generation"]
    ab = start(registered, fake, 50)
    with pytest.raises(HandoffError, match=r"an A/B test is already running \(InferenceGraph ml-models/"):
        start(registered, fake, 50)
    # A pipeline's deploy meanwhile would change the graph's champion arm: refused, nothing changed.
    with pytest.raises(
        HandoffError, match=r"an A/B test \(InferenceGraph ml-models/digits-classifier-ab\) routes"
    ):
        deploy(registered, fake, "2")
    assert version_of(fake.get(*CHAMPION)) == "1"
    done = stop(registered, fake, ab, promote=False)
    assert done == (
        f"rolled back: InferenceService {NAMESPACE}/{MODEL} keeps serving {MODEL} v1 with all traffic; "
        f"removed InferenceGraph {NAMESPACE}/{MODEL}-ab and InferenceService {NAMESPACE}/{MODEL}-challenger."
    )
    champion = fake.get(*CHAMPION)
    assert version_of(champion) == "1" and champion["metadata"]["generation"] == before  # never touched
    assert GRAPH not in fake.objects and CHALLENGER not in fake.objects
    again = stop(registered, fake, ab, promote=False)
    assert again.endswith(
        f"{MODEL}-ab (already gone) and InferenceService {NAMESPACE}/{MODEL}-challenger (already gone)."
    )


def test_start_refuses_without_the_champion_serving(
    registered: Registered,  # noqa: F811
    cluster: tuple[FakeKube, KServeGraphs],
) -> None:
    fake, _ = cluster
    with pytest.raises(HandoffError) as missing:
        start(registered, fake)
    assert str(missing.value).startswith(
        f"InferenceService {NAMESPACE}/{MODEL} does not exist: deploy the champion (v1) to the cluster first"
    )
    deploy(registered, fake, "2")
    with pytest.raises(HandoffError) as other:
        start(registered, fake)  # champion "1", but the service serves 2
    assert f"serves {MODEL} v2, not the champion {MODEL} v1" in str(other.value)
    assert set(fake.objects) == {CHAMPION}


def test_a_challenger_that_crashes_leaves_nothing_behind(
    registered: Registered,  # noqa: F811
    servers: dict[str, str],  # noqa: F811
) -> None:
    crash = KServe(
        serving(servers), crash=lambda obj: "model file corrupt" if version_of(obj) == "2" else None
    )
    controller = KServeGraphs(crash)
    with fake_kube(controller) as fake:
        deploy(registered, fake, "1")
        with pytest.raises(HandoffError) as failed:
            start(registered, fake)
    controller.close()
    message = str(failed.value)
    assert message.startswith(f"A/B test of {MODEL} v2: ") and "model file corrupt" in message
    assert message.endswith(f"removed InferenceService {NAMESPACE}/{MODEL}-challenger")
    assert set(fake.objects) == {CHAMPION} and version_of(fake.get(*CHAMPION)) == "1"


def test_a_graph_that_never_gets_ready_is_removed_with_the_challenger(
    registered: Registered,  # noqa: F811
    servers: dict[str, str],  # noqa: F811
) -> None:
    kserve = KServe(serving(servers))

    def no_graph_controller(fake: FakeKube, obj: dict[str, Any]) -> None:  # KServe without its graph one
        if obj["kind"] == "InferenceService":
            kserve(fake, obj)

    with fake_kube(no_graph_controller) as fake:
        deploy(registered, fake, "1")
        ticks = itertools.count()

        def clock() -> float:  # ten minutes pass per look once the graph is there
            return time.monotonic() + (600.0 * next(ticks) if GRAPH in fake.objects else 0.0)

        with pytest.raises(HandoffError) as failed:
            start(registered, fake, clock=clock)
        created = [path for path, _, _ in fake.patches if "/inferencegraphs/" in path]
    message = str(failed.value)
    assert f"InferenceGraph {NAMESPACE}/{MODEL}-ab not Ready within serving.kserve.ready_timeout_s" in message
    assert message.endswith(
        f"removed InferenceGraph {NAMESPACE}/{MODEL}-ab, InferenceService {NAMESPACE}/{MODEL}-challenger"
    )
    assert created and set(fake.objects) == {CHAMPION}
