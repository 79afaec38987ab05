"""What KServe reports about a rollout, read for the spec a deploy applied: pure judgements.

What KServe reports is tied to the spec it is about by the predictor's ``handoff.dev/predictor-spec``
label, a digest of the spec that KServe copies onto its pods and onto the Deployment or Knative
revision it makes from it. Serverless (``Knative`` since KServe 0.16): the latest created revision
is this spec's (its pods carry the label; while it has no pod, because none has started, admission
refused them or they scaled to zero, it is the one KServe made after the apply, or the one it had
if the apply left the pods' spec as it was), it is the latest ready one, Ready is True, and the
traffic is what the spec asks; Knative giving up on it (``RevisionFailed``) is a failure.
RawDeployment (``Standard`` since 0.16): the predictor's Deployment carries the label in its pod
template and has rolled out as ``kubectl rollout status`` judges it (every replica updated and
available, none of the old ones left; its progress deadline passed, or pods it cannot make, is a
failure), and Ready is True; KServe alone says Ready while the old pods still serve.
``status.observedGeneration`` is of no use: KServe copies it from the Knative Service or the
Deployment (``PropagateStatus``/``PropagateRawStatus``, kserve#6081), whose generations count their
own changes (an autoscaler's scaling, a KServe upgrade re-rendering them).

Everything here takes objects as the API server returns them and calls nothing, so each rule is
tested on hand-made statuses; :mod:`handoff.kube.inference_service` polls and acts on the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from handoff.kube.isvc_manifest import SPEC_KEY, VERSION_KEY, predictor_of

# The label KServe puts on every pod of an InferenceService.
ISVC_LABEL = "serving.kserve.io/inferenceservice"
# Knative's label on a revision's pods (knative/serving pkg/reconciler/revision/resources/meta.go).
REVISION_LABEL = "serving.knative.dev/revision"
# What the status says of a revision Knative gave up on (Configuration's MarkLatestCreatedFailed,
# propagated by KServe), and of a Deployment whose rollout stopped progressing (kubectl's
# TimedOutReason) or whose ReplicaSet cannot make its pods (admission refused them: Pod Security,
# a ResourceQuota; the ReplicaSet's FailedCreate, which the Deployment controller copies).
REVISION_FAILED = "RevisionFailed"
PROGRESS_DEADLINE = "ProgressDeadlineExceeded"
REPLICA_FAILURE = "ReplicaFailure"


class RolloutFailed(Exception):
    """The new version did not come up healthy; the message says why."""


def one_line(text: str, limit: int = 500) -> str:
    """A container message (often a traceback) as one line: its last lines carry the error."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    joined = " | ".join(lines[-3:])
    return joined if len(joined) <= limit else "…" + joined[-limit:]


@dataclass(frozen=True)
class Progress:
    """Where a rollout stands, judged from what KServe reports about the spec it is waiting for."""

    summary: str  # one line for the log
    done: bool = False  # Ready, for this spec, with the traffic the spec asks for
    failure: str | None = None  # why it will not get there on its own
    acted: bool = False  # KServe made this spec's revision or updated its Deployment to it


@dataclass(frozen=True)
class Before:
    """What the status said just before an apply (Serverless): it tells the applied spec's revision
    when no pod can, because there is none yet, admission refused them, or they scaled to zero."""

    revision: str | None = None  # status.components.predictor.latestCreatedRevision then
    same_spec: bool = False  # the apply left the pods' spec (its digest) as it was

    @classmethod
    def applying(cls, current: dict[str, Any], config: dict[str, Any]) -> Before:
        """Before applying ``config`` to ``current``."""
        return cls(created_revision(current), spec_mark(current) == spec_mark(config))

    def claims(self, created: str) -> bool:
        """Whether ``created`` is the applied spec's revision as far as the status alone tells:
        KServe made it after the apply, or the apply changed nothing KServe makes revisions of.
        (Only the pods tell a status that is stale from before an earlier, identical apply.)"""
        return self.same_spec or created != self.revision


def created_revision(obj: dict[str, Any]) -> str | None:
    predictor = ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}
    return predictor.get("latestCreatedRevision")


def pod_selector(name: str) -> str:
    """The label selector of every predictor pod of the service ``name``, of any spec: a pod of
    another spec tells that the revision it belongs to is not this spec's."""
    return f"{ISVC_LABEL}={name}"


def spec_mark(obj: dict[str, Any]) -> tuple[str, str | None]:
    """The pod label that marks ``obj``'s predictor spec: its digest, or its version for a spec
    written before ``SPEC_KEY`` existed (None: the spec has neither)."""
    marks = predictor_of(obj).get("labels") or {}
    key = SPEC_KEY if SPEC_KEY in marks else VERSION_KEY
    return key, marks.get(key)


def of_spec(obj: dict[str, Any], found: dict[str, str] | None) -> bool:
    """Whether labels (a pod's or a pod template's) are those of ``obj``'s predictor spec."""
    key, value = spec_mark(obj)
    return value is not None and (found or {}).get(key) == value


def _ready(status: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The Ready condition ({} when there is none yet), and it as one line."""
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None:
        return {}, "no Ready condition yet"
    detail = ": ".join(p for p in (ready.get("reason"), one_line(ready.get("message") or "", 200)) if p)
    return ready, f"Ready={ready.get('status')}" + (f" ({detail})" if detail else "")


def serverless_progress(
    obj: dict[str, Any], generation: int, revisions: dict[str, bool], before: Before, *, canary: int | None
) -> Progress:
    """Serverless mode: the latest created revision is this spec's, it is the latest ready one,
    Ready is True and the traffic is what the spec asks.

    ``canary``: the share the deploy's last apply asked for (None: all traffic). Not the live
    spec's: a share another manager also set stays after an apply that leaves it out, and the
    traffic would then match the spec while the new revision has none of it.

    ``revisions``: the revisions the service's pods are of, each with whether its pods carry this
    spec. The latest created revision is this spec's when its pods say so; when it has none and
    no pod of this spec names another revision, ``before`` says (Knative starts pods only after
    the revision exists, admission may refuse them, and with ``minReplicas: 0`` they scale to zero).
    KServe copies ``latestCreatedRevision``, ``latestReadyRevision``, the traffic and Ready from
    the Knative Service (``PropagateStatus`` in pkg/apis/serving/v1beta1/inference_service_status.go).
    """
    status = obj.get("status") or {}
    ready, state = _ready(status)
    predictor = (status.get("components") or {}).get("predictor") or {}
    created, newest_ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    at = f"generation {generation}"
    if not created:
        return Progress(f"{at}: waiting for KServe to create its revision ({state})")
    if created in revisions:
        ours = revisions[created]
    else:
        ours = not any(revisions.values()) and before.claims(created)
    if not ours:
        return Progress(f"{at}: waiting for its revision (the latest, {created}, is another spec's: {state})")
    if created != newest_ready:
        if ready.get("status") == "False" and ready.get("reason") == REVISION_FAILED:
            said = one_line(ready.get("message") or "") or "no message"
            failure = f"revision {created} failed: {said}"
            return Progress(f"{at}: revision {created}: {state}", failure=failure, acted=True)
        return Progress(f"{at}: revision {created} is not ready yet ({state})", acted=True)
    # KServe splits traffic only while a revision had all of it (createKnativeService in
    # reconcilers/knative/ksvc_reconciler.go); the latest revision's share is the spec's canary.
    wanted = canary if canary is not None and predictor.get("latestRolledoutRevision") else 100
    share = sum(
        int(t.get("percent") or 0)
        for t in predictor.get("traffic") or []
        if t.get("latestRevision") and t.get("revisionName") == created
    )
    if share != wanted:
        return Progress(
            f"{at}: revision {created} has {share}% of traffic, waiting for {wanted}% ({state})", acted=True
        )
    done = ready.get("status") == "True"
    return Progress(f"{at}: revision {created}, {share}% of traffic: {state}", done=done, acted=True)


def raw_progress(obj: dict[str, Any], generation: int, deployment: Any | None, name: str) -> Progress:
    """Raw deployment mode: the predictor's Deployment ``name`` has this spec in its pod template
    and has rolled out, and Ready is True.

    KServe's Ready alone is not enough: it is True while the old pods keep the Deployment
    Available in the middle of a rolling update, and it is computed from the Deployment's status
    as it was before KServe's own update (``PropagateRawStatus``; ``Reconcile`` in
    reconcilers/deployment/deployment_reconciler.go). The rollout is judged as ``kubectl rollout
    status`` judges it (kubernetes/kubectl pkg/polymorphichelpers/rollout_status.go), on the
    Deployment's own generation, which an autoscaler's scaling moves too.
    """
    ready, state = _ready(obj.get("status") or {})
    at = f"generation {generation}"
    if deployment is None:
        return Progress(f"{at}: waiting for KServe to create Deployment {name} ({state})")
    template = deployment.spec.template.metadata
    if not of_spec(obj, template.labels if template else None):
        return Progress(f"{at}: waiting for KServe to update Deployment {name} to it ({state})")
    status = deployment.status
    if status is None or (status.observed_generation or 0) < (deployment.metadata.generation or 0):
        return Progress(f"{at}: Deployment {name} has not started its rollout yet ({state})", acted=True)
    progressing = next((c for c in status.conditions or [] if c.type == "Progressing"), None)
    if progressing is not None and progressing.reason == PROGRESS_DEADLINE:
        said = one_line(progressing.message or "") or "no message"
        return Progress(
            f"{at}: Deployment {name}: {PROGRESS_DEADLINE}",
            failure=f"Deployment {name} exceeded its progress deadline: {said}",
            acted=True,
        )
    # kubectl waits on: a refused pod is retried, but by then the deploy is better told (and the
    # deadline is 600 s away). KServe says the same as Ready=False (PropagateRawStatus, 0.16 on).
    refused = next((c for c in status.conditions or [] if c.type == REPLICA_FAILURE), None)
    if refused is not None and refused.status == "True":
        said = one_line(refused.message or "") or "no message"
        return Progress(
            f"{at}: Deployment {name}: {REPLICA_FAILURE} ({refused.reason})",
            failure=f"Deployment {name} cannot make its pods ({refused.reason}): {said}",
            acted=True,
        )
    wanted, updated = deployment.spec.replicas, status.updated_replicas or 0
    replicas, available = status.replicas or 0, status.available_replicas or 0
    if wanted is not None and updated < wanted:
        waiting = f"{updated} of {wanted} replicas updated"
    elif replicas > updated:
        waiting = f"{replicas - updated} old replicas still running"
    elif available < updated:
        waiting = f"{available} of {updated} updated replicas available"
    else:
        done = ready.get("status") == "True"
        return Progress(
            f"{at}: Deployment {name} rolled out ({available} replicas): {state}", done=done, acted=True
        )
    return Progress(f"{at}: Deployment {name}: {waiting} ({state})", acted=True)


def _terminated_said(state: Any) -> str:
    return one_line(state.message or "") or f"exit code {state.exit_code} ({state.reason or 'no reason'})"


def pod_problem(pods: list[Any], restarts: dict[tuple[str, str], int]) -> str | None:
    """Why the new version's pods will not become ready on their own, or None.

    Crash loops, containers that exited with an error (the storage initializer included: a model
    that cannot be downloaded) and restarts since the watch began; ``restarts`` keeps the counts
    first seen, so restarts from before a retried deploy started do not count again.
    """
    for pod in pods:
        status = pod.status
        if status is None:
            continue
        for container in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
            name = f"pod {pod.metadata.name} container {container.name}"
            count = container.restart_count or 0
            first = restarts.setdefault((pod.metadata.name, container.name), count)
            state, last = container.state, container.last_state
            terminated = state.terminated if state else None
            before = last.terminated if last else None
            waiting = state.waiting if state else None
            if waiting is not None and waiting.reason == "CrashLoopBackOff":
                said = _terminated_said(before) if before else one_line(waiting.message or "")
                return f"{name} is crash-looping ({count} restarts): {said}"
            if terminated is not None and terminated.exit_code:
                return f"{name} failed: {_terminated_said(terminated)}"
            if count > first:
                said = _terminated_said(before) if before else "no termination message"
                return f"{name} restarted ({first} → {count} restarts): {said}"
    return None


def smoke_url(obj: dict[str, Any]) -> str | None:
    """Where to reach the newest revision: its ``latest`` tag URL, else the service URL."""
    status = obj.get("status") or {}
    predictor = (status.get("components") or {}).get("predictor") or {}
    for target in predictor.get("traffic") or []:
        if target.get("tag") == "latest" and target.get("url"):
            return str(target["url"])
    url = status.get("url")
    return str(url) if url else None
