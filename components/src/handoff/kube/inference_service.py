"""Serving on a cluster: the project's KServe InferenceService, rolled out so a bad model never stays.

One InferenceService per project, named after it, in handoff.yaml's ``namespace``. A deploy:

1. creates it (the first version takes all traffic) or applies the new version to it with
   ``canaryTrafficPercent`` (``serving.kserve.canary_percent``; 0 = all at once);
2. waits until it is Ready *for the spec it applied*: right after an apply the status still
   shows the previous spec as Ready, which says nothing about the new model;
3. meanwhile watches the new spec's predictor pods and stops at the first crash loop, restart
   or failed container, with that container's own message;
4. replays the contract example over Open Inference Protocol v2 against the new revision (KServe's
   ``latest`` tag URL during a canary, so the old revision's share cannot answer for it);
5. promotes (drops ``canaryTrafficPercent``: all traffic to the new revision) or rolls back.

This module is that sequence, as a state machine (:class:`RolloutRun`) whose steps return what
they did. The rest lives in one module per concern, each usable and tested alone:
:mod:`~handoff.kube.isvc_manifest` (the object, pure), :mod:`~handoff.kube.isvc_plan` (what each
step applies, decided from the service as read), :mod:`~handoff.kube.isvc_client` (the API calls:
server-side apply, retries), :mod:`~handoff.kube.isvc_status` (what KServe's status and the pods
say about the applied spec, pure) and :mod:`~handoff.kube.isvc_watch` (polling it). Their public
names are importable from here too.

A deploy that may not list the pods stops before changing anything: without them neither a
crash loop nor a status left from before the apply can be told. A deploy that fails before it
changed what the service runs (a redeploy of the spec already there) rolls nothing back. A first
deploy that fails is left in place, marked as never having served (``handoff.dev/never-served``),
for inspection: it takes no traffic from anything, and the next deploy treats it as a first deploy
again. The step's Role has no ``delete`` (get, create and patch on the InferenceService are all a
deploy needs: an apply that creates needs create), and reads no more than its pods (``list``) and,
in raw deployment mode, the predictor's Deployment (``get``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handoff.errors import HandoffError
from handoff.kube.isvc_client import (
    MAX_API_FAILURES,
    MAX_CONFLICTS,
    Conflict,
    ServiceClient,
    Services,
    flat,
    log,
)
from handoff.kube.isvc_manifest import (
    API_VERSION,
    AZURE_BLOB,
    EXIT_MARGIN_S,
    FETCHABLE,
    GROUP,
    KIND,
    KSERVE_RUNTIME,
    MODEL_FORMAT,
    MODEL_NAME_KEY,
    NEVER_SERVED_KEY,
    PLURAL,
    PRE_STOP_S,
    PREFIX,
    PROTOCOL,
    RAW_MODES,
    ROLLBACK_KEY,
    RUN_AS_USER,
    SHA_KEY,
    SPEC_KEY,
    TAG_ROUTING,
    TRITON_RUNTIME,
    VERSION,
    VERSION_KEY,
    Release,
    Served,
    canary_of,
    manifest,
    never_served,
    predictor_spec,
    served_before,
    spec_digest,
    storage_uri,
)
from handoff.kube.isvc_plan import Restore, Start, Step, first, promotion, restore, start
from handoff.kube.isvc_status import (
    ISVC_LABEL,
    PROGRESS_DEADLINE,
    REPLICA_FAILURE,
    REVISION_FAILED,
    REVISION_LABEL,
    Before,
    Progress,
    RolloutFailed,
    one_line,
    pod_problem,
    pod_selector,
    raw_progress,
    serverless_progress,
    smoke_url,
    spec_mark,
)
from handoff.kube.isvc_watch import Watch
from handoff.serving.smoke import SmokeResult
from handoff.settings import Settings

__all__ = [
    "API_VERSION", "AZURE_BLOB", "EXIT_MARGIN_S", "FETCHABLE", "GROUP", "ISVC_LABEL", "KIND",
    "KSERVE_RUNTIME", "MAX_API_FAILURES", "MAX_CONFLICTS", "MODEL_FORMAT", "MODEL_NAME_KEY",
    "NEVER_SERVED_KEY", "PLURAL", "PREFIX", "PRE_STOP_S", "PROGRESS_DEADLINE", "PROTOCOL", "RAW_MODES",
    "REPLICA_FAILURE", "REVISION_FAILED", "REVISION_LABEL", "ROLLBACK_KEY", "ROLLBACK_OBSERVE_S",
    "RUN_AS_USER", "SHA_KEY", "SPEC_KEY", "TAG_ROUTING", "TRITON_RUNTIME", "VERSION", "VERSION_KEY",
    "Before", "Conflict", "Phase", "Progress", "Release", "Rollout", "RolloutFailed", "RolloutRun",
    "Served", "ServiceClient", "Services", "Watch", "flat", "log", "manifest", "one_line",
    "pod_problem", "pod_selector", "predictor_spec", "raw_progress", "rollout", "served_before",
    "serverless_progress", "smoke_url", "spec_digest", "spec_mark", "storage_uri",
]  # fmt: skip

ROLLBACK_OBSERVE_S = 60.0  # how long to wait for KServe to act on a rollback before reporting


@dataclass(frozen=True)
class Rollout:
    """A finished rollout: the service's URL and what its smoke test saw."""

    url: str
    generation: int
    smoke: SmokeResult
    canary_percent: int | None  # the share the new version had before promotion (None: all)


class Phase(enum.Enum):
    """Where a :class:`RolloutRun` stands."""

    NEW = "new"  # nothing applied yet
    APPLIED = "applied"  # the release's spec is on the service; waiting for it to be Ready
    SMOKED = "smoked"  # Ready and its smoke test passed (a canary: not promoted yet)
    PROMOTED = "promoted"  # a canary that passed, given all traffic: waiting for KServe to move it
    SERVING = "serving"  # the release has all traffic
    UNCHANGED = "unchanged"  # failed before it changed what the service runs: nothing undone
    ROLLED_BACK = "rolled back"  # failed; the previous spec is restored (or restoring it failed)
    LEFT = "left for inspection"  # a failed first deploy, marked never-served


@dataclass
class RolloutRun:
    """One deploy's rollout of ``release``: its phase, and a method per step that returns what it
    did. :meth:`run` goes through them (the module docstring); tests drive them one by one."""

    services: Services
    watch: Watch
    settings: Settings
    release: Release
    phase: Phase = Phase.NEW
    started: Start | None = None
    generation: int = 0  # the generation the rollout waits for
    changed: bool = False  # whether this deploy (or the one it resumes) changed what the service runs
    had_all_traffic: bool = False  # whether the new revision ever had every request
    url: str = ""  # where the smoke test reached the new revision

    @property
    def timeout_s(self) -> float:
        return self.settings.serving.kserve.ready_timeout_s

    def start(self) -> Start:
        """Create the service or apply ``release`` to it; resumes a rollout a retried step left."""
        services, release = self.services, self.release
        try:
            self.watch.pods()  # the wait needs them (Watch.pods): without them, change nothing
        except HandoffError as exc:
            raise HandoffError(flat(f"{exc}; the deploy watches them, so it changed nothing")) from None
        obj = None
        if services.get() is None:
            started = first(self.settings, release)
            obj = services.create(started.config)
            if obj is None:
                services.say(f"{services.what} appeared meanwhile; updating it instead")
            else:
                services.say(
                    f"created {services.what}: {release.model_name} version {release.version}, all "
                    f"traffic once Ready (generation {obj['metadata'].get('generation')})"
                )
        if obj is None:
            started, obj = services.update(lambda live: start(live, self.settings, release, services.what))
            self._say_started(started, obj["metadata"].get("generation"))
        self.generation = int(obj["metadata"]["generation"])
        # A create, an apply that changed the spec, or the resumed rollout of a killed attempt.
        applied = started.generation is None or self.generation != started.generation
        self.changed = applied or started.in_flight
        self.started, self.phase = started, Phase.APPLIED
        return started

    def _say_started(self, started: Start, generation: int | None) -> None:
        services, release, target = self.services, self.release, started.target
        if target is None:
            services.say(
                f"patched {services.what} (never served): {release.model_name} version {release.version}, "
                f"all traffic once Ready (generation {generation})"
            )
        elif generation != started.generation:
            share = {None: "all traffic once Ready", 0: "no traffic until its smoke test passes"}.get(
                started.canary, f"{started.canary}% of traffic once Ready"
            )
            services.say(
                f"patched {services.what}: version {target.version} → {release.version}, {share} "
                f"(generation {generation})"
            )
        else:
            services.say(
                f"{services.what} already has this spec: version {release.version} (generation {generation})"
            )

    def _started(self) -> Start:
        if self.started is None:
            raise RuntimeError("the rollout has not started")
        return self.started

    def wait(self) -> dict[str, Any]:
        """The service once Ready at the generation applied last; RolloutFailed if it will not be."""
        # A promotion changes the traffic only (to all of it): no new revision to tell from the status.
        promoted = self.phase is Phase.PROMOTED
        before = Before(same_spec=True) if promoted else self._started().before
        canary = None if promoted else self._started().canary
        obj = self.watch.ready(self.generation, self.timeout_s, before, canary)
        if self.phase is Phase.APPLIED:
            self.had_all_traffic = self._started().canary is None
        return obj

    def smoke_test(self, obj: dict[str, Any], smoke: Callable[[str], SmokeResult]) -> SmokeResult:
        """The smoke test of the new revision; RolloutFailed unless it passed."""
        services, release = self.services, self.release
        url = smoke_url(obj)
        if not url:
            raise RolloutFailed("it is Ready but reports no URL to send the smoke test to")
        result = smoke(url)
        if not result.passed:
            raise RolloutFailed(
                f"smoke test of {release.model_name} version {release.version} at {url} failed: "
                + result.detail
            )
        services.say(f"{services.what}: smoke test passed at {url} ({result.latency_ms:.1f} ms)")
        self.phase, self.url = Phase.SMOKED, url
        return result

    def promote(self) -> int:
        """All traffic to the new revision; the generation that asks for it."""
        services, started, generation = self.services, self._started(), self.generation
        _, obj = services.update(lambda live: promotion(live, started, generation, services.what))
        self.had_all_traffic, self.phase = True, Phase.PROMOTED
        self.generation = int(obj["metadata"]["generation"])
        services.say(
            f"promoted version {self.release.version} of {services.what} to all traffic "
            f"(generation {self.generation})"
        )
        return self.generation

    def roll_back(self) -> str:
        """Undo the rollout (see :mod:`handoff.kube.isvc_plan`); what happened, for the error."""
        services, started = self.services, self._started()
        target = started.target
        self.phase = Phase.ROLLED_BACK
        try:
            if target is None:
                services.update(lambda live: Step(never_served(started.config)))
                what = services.what
                services.say(f"{what} is left for inspection: nothing was serving before this deploy")
                self.phase = Phase.LEFT
                return (
                    "nothing served before this deploy, so no traffic is affected; the InferenceService is "
                    f"left for inspection (kubectl -n {services.namespace} describe inferenceservice "
                    f"{services.name}) and the next deploy replaces it"
                )
            restored: Restore
            restored, obj = services.update(lambda live: restore(live, started, target, self.had_all_traffic))
            outcome = f"rolled back: version {target.version}'s spec is restored" + (
                " with canaryTrafficPercent 0, so its revision keeps all traffic"
                if restored.pin
                else " and its revision takes all traffic back once Ready"
            )
            generation = obj["metadata"].get("generation", 0)
            wait_s, canary = min(ROLLBACK_OBSERVE_S, self.timeout_s), canary_of(restored.config)
            seen = self.watch.observed(generation, wait_s, restored.before, canary)
            services.say(
                f"{services.what}: {outcome} (generation {generation}{'' if seen else ', not yet observed'})"
            )
            return outcome
        except HandoffError as exc:
            return (
                f"rolling back failed too ({exc}); repair it by hand: "
                f"kubectl -n {services.namespace} edit inferenceservice {services.name}"
            )

    def run(self, smoke: Callable[[str], SmokeResult]) -> Rollout:
        """Serve ``release`` (steps in the module docstring); HandoffError after rolling back."""
        what, release = self.services.what, self.release
        started = self.start()
        try:
            obj = self.wait()
            result = self.smoke_test(obj, smoke)
            if started.canary is not None:
                self.promote()
                obj = self.wait()  # traffic only
        except (RolloutFailed, HandoffError) as failure:
            if not self.changed:
                self.phase = Phase.UNCHANGED
                raise HandoffError(
                    flat(f"{what}: {failure}; this deploy changed nothing, so nothing was rolled back")
                ) from None
            outcome = self.roll_back()
            raise HandoffError(flat(f"{what}: {failure}; {outcome}")) from None
        self.phase = Phase.SERVING
        self.services.say(f"{what} serves {release.model_name} version {release.version} with all traffic")
        return Rollout(
            url=str((obj.get("status") or {}).get("url") or self.url),
            generation=self.generation,
            smoke=result,
            canary_percent=started.canary,
        )


def rollout(
    services: Services,
    settings: Settings,
    release: Release,
    smoke: Callable[[str], SmokeResult],
    watch: Watch,
) -> Rollout:
    """Serve ``release`` (steps in the module docstring); HandoffError after rolling back."""
    return RolloutRun(services, watch, settings, release).run(smoke)
