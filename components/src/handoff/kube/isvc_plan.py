"""What each step of a rollout applies, decided from the InferenceService as it was read.

A deploy's writes are server-side applies of a whole configuration (:mod:`handoff.kube.isvc_client`),
each decided from the live object by a function here: how the new version starts (all traffic, a
canary share, or none), what it replaced (kept in ``handoff.dev/rollback-to``, so a retried deploy
step that finds its own half-finished rollout still knows what to go back to), and what a rollback
restores. Each returns its decision as a frozen record, read by the state machine in
:mod:`handoff.kube.inference_service`; nothing here calls the API server.

Rolling back restores handoff's part of the previous predictor spec (the fields it applied, see
:mod:`handoff.kube.isvc_manifest`) and handoff's annotations, so the spec says again what serves.
KServe splits canary traffic between the newest *ready* revision and the last revision that had
all traffic (``latestRolledoutRevision``). While the new revision never had all traffic, the
restore also sets ``canaryTrafficPercent: 0``: the previous revision keeps every request at once,
even if the failed revision is Ready and would otherwise count as the newest ready one until the
restored spec's revision is up. Once the new revision had all traffic
(canary_percent 0, or after promotion), and in raw deployment mode (no traffic split), the
restore goes without it and the restored revision takes over when Ready. A service left with
``canaryTrafficPercent: 0`` by a rollback keeps it until the next deploy, which starts its new
revision at 0% as well and promotes it after its smoke test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from handoff.errors import HandoffError
from handoff.kube.isvc_manifest import (
    NEVER_SERVED_KEY,
    ROLLBACK_KEY,
    Release,
    Served,
    annotations_of,
    canary_of,
    is_raw,
    manifest,
    predictor_spec,
    promoted,
    restoring,
    served_before,
)
from handoff.kube.isvc_status import Before
from handoff.settings import Settings


@dataclass(frozen=True)
class Start:
    """How a deploy starts its release on the service it read (None: there was none)."""

    config: dict[str, Any]  # what it applies
    target: Served | None  # what to go back to; None: nothing served before (marked on failure)
    canary: int | None  # the new revision's share until promoted (None: all traffic once Ready)
    before: Before  # what the status said before the apply (tells its revision when no pod can)
    in_flight: bool  # the service was mid-rollout already: a retried step resumes it
    generation: int | None  # the generation it was read at


@dataclass(frozen=True)
class Step:
    """A later step's configuration (promotion, the never-served mark)."""

    config: dict[str, Any]


@dataclass(frozen=True)
class Restore:
    """A rollback's configuration, and whether it pins all traffic to the revision that served."""

    config: dict[str, Any]
    pin: bool
    before: Before


def first(settings: Settings, release: Release) -> Start:
    """A service that does not exist yet: the first version takes all traffic once Ready."""
    return Start(manifest(settings, release), None, None, Before(), in_flight=False, generation=None)


def start(obj: dict[str, Any], settings: Settings, release: Release, what: str) -> Start:
    """How ``release`` goes out on the service ``obj`` (``what``, for messages)."""
    owner = ((obj.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/managed-by")
    if owner != "handoff":
        raise HandoffError(
            f"{what} exists but is not managed by handoff (label app.kubernetes.io/managed-by "
            f"is {owner!r}); delete or rename it, or change `project`",
            file="handoff.yaml",
            field="project",
        )
    generation = obj["metadata"].get("generation")
    raw = is_raw(obj)
    if annotations_of(obj).get(NEVER_SERVED_KEY):  # a failed first deploy: still a first deploy
        config = manifest(settings, release, raw=raw)
        return Start(config, None, None, Before.applying(obj, config), False, generation)
    # What serves, as handoff set it, and the fields this deploy takes over from whoever edited them.
    target = served_before(obj, predictor_spec(settings, release, None, raw=raw))
    same_model = (target.version, target.sha256) == (release.version, release.sha256)
    canary: int | None = settings.serving.kserve.canary_percent
    if raw:
        canary = None  # no Knative revisions: a rolling update, no traffic split
    elif canary_of(obj) == 0:
        # Rolled back earlier: a failed revision may still be the newest ready one, so any
        # share for "latest" would reach it until the new revision is up. Start dark.
        canary = 0
    elif same_model or not canary:
        canary = None  # the same model needs no canary
    # A rollout records what it replaced; a redeploy of the same model keeps the record it has.
    recorded = annotations_of(obj).get(ROLLBACK_KEY) if same_model else target.encode()
    config = manifest(settings, release, canary=canary, rollback_to=recorded, raw=raw)
    in_flight = canary_of(obj) is not None
    return Start(config, target, canary, Before.applying(obj, config), in_flight, generation)


def promotion(obj: dict[str, Any], started: Start, generation: int, what: str) -> Step:
    """All traffic to the new revision, if the service is still at the ``generation`` it was
    smoke-tested at."""
    if obj["metadata"].get("generation") != generation:
        raise HandoffError(f"someone else changed {what} during its rollout")
    return Step(promoted(started.config))


def restore(obj: dict[str, Any], started: Start, target: Served, had_all_traffic: bool) -> Restore:
    """Back to ``target`` (see the module docstring for when the restore pins the traffic)."""
    pin = not had_all_traffic and not is_raw(obj)
    config = restoring(started.config, target, pin=pin)
    return Restore(config, pin, Before.applying(obj, config))
