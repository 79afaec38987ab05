"""Polling an InferenceService until KServe has done what an apply asked, with a clock tests drive.

The judgements are :mod:`handoff.kube.isvc_status`'s; this module reads what they need (the
service, its predictor pods, in raw deployment mode the predictor's Deployment) through the
client, logs each change of where the rollout stands, and stops at the first failure: a crash
loop, a restart or a failed container of the new spec's pods (with that container's own message),
Knative or the Deployment controller giving up, someone else changing the service, or the
timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handoff.errors import HandoffError
from handoff.kube.isvc_client import Services
from handoff.kube.isvc_manifest import RAW_MODES, is_raw, mode_of
from handoff.kube.isvc_status import (
    REVISION_LABEL,
    Before,
    Progress,
    RolloutFailed,
    of_spec,
    pod_problem,
    pod_selector,
    raw_progress,
    serverless_progress,
)


@dataclass
class Watch:
    """Polling with a clock that tests can drive."""

    services: Services
    poll_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def pods(self) -> list[Any]:
        """Every predictor pod of the service, of any spec. HandoffError when the step may not list
        them: the Role grants it and ``handoff doctor`` checks it, and without the pods neither a
        crash loop nor (in Serverless mode) a status left from before the apply can be told."""
        return self.services.pods(pod_selector(self.services.name))

    def progress(
        self, obj: dict[str, Any], generation: int, pods: list[Any], before: Before, canary: int | None
    ) -> Progress:
        """How far ``obj`` (at ``generation``, applied asking for ``canary``) has got, read in its
        deployment mode's own terms."""
        mode = mode_of(obj)
        if mode is None:
            return Progress(f"generation {generation}: waiting for KServe to act on it (no status yet)")
        if mode in RAW_MODES:
            services = self.services
            return raw_progress(obj, generation, services.deployment(), services.deployment_name)
        revisions: dict[str, bool] = {}
        for pod in pods:
            found = pod.metadata.labels or {}
            if found.get(REVISION_LABEL):
                revisions[found[REVISION_LABEL]] = of_spec(obj, found)
        return serverless_progress(obj, generation, revisions, before, canary=canary)

    def ready(self, generation: int, timeout_s: float, before: Before, canary: int | None) -> dict[str, Any]:
        """Poll until Ready at ``generation`` (applied over what ``before`` says, asking for the
        ``canary`` share; None: all traffic); RolloutFailed on a pod failure or the timeout."""
        services = self.services
        deadline = self.clock() + timeout_s
        restarts: dict[tuple[str, str], int] = {}
        last = ""
        while True:
            obj = services.get()
            if obj is None:
                raise RolloutFailed(f"{services.what} was deleted while waiting for it")
            now_at = obj["metadata"].get("generation")
            if now_at != generation:
                raise RolloutFailed(
                    f"someone else changed {services.what} (generation {now_at}, expected {generation})"
                )
            pods = self.pods()
            progress = self.progress(obj, generation, pods, before, canary)
            if progress.summary != last:
                services.say(f"{services.what}: {progress.summary}")
                last = progress.summary
            if progress.done:
                # The status read after the Deployment or pods: its URL is no older than they are.
                newest = services.get()
                at = (newest or {}).get("metadata", {}).get("generation")
                return newest if newest is not None and at == generation else obj
            problem = pod_problem([p for p in pods if of_spec(obj, p.metadata.labels)], restarts)
            if problem or progress.failure:
                raise RolloutFailed(problem or str(progress.failure))
            if self.clock() >= deadline:
                raise RolloutFailed(
                    f"not Ready at generation {generation} within serving.kserve.ready_timeout_s = "
                    f"{timeout_s:g} s (last: {last})"
                )
            self.sleep(self.poll_s)

    def observed(self, generation: int, timeout_s: float, before: Before, canary: int | None) -> bool:
        """Whether KServe acted on ``generation`` (of a rollback) within ``timeout_s``: made the
        restored spec's revision, or updated the predictor's Deployment to it."""
        deadline = self.clock() + timeout_s
        while True:
            obj = self.services.get()
            if obj is None or obj["metadata"].get("generation") != generation:
                return True  # gone, or changed again: nothing left to observe
            try:
                pods = [] if is_raw(obj) else self.pods()
                if self.progress(obj, generation, pods, before, canary).acted:
                    return True
            except HandoffError:  # e.g. the Deployment may not be read: the rollback itself is done
                return False
            if self.clock() >= deadline:
                return False
            self.sleep(self.poll_s)
