"""Serving on a cluster: the project's KServe InferenceService, rolled out so a bad model never stays.

One InferenceService per project, named after it, in handoff.yaml's ``namespace``. A deploy:

1. creates it (the first version takes all traffic) or patches it to the new version with
   ``canaryTrafficPercent`` (``serving.kserve.canary_percent``; 0 = all at once);
2. waits until it is Ready *for the spec the patch wrote* (below): right after a patch the status
   still shows the previous spec as Ready, which says nothing about the new model;
3. meanwhile watches the new spec's predictor pods and stops at the first crash loop, restart
   or failed container, with that container's own message;
4. replays the contract example over Open Inference Protocol v2 against the new revision (KServe's
   ``latest`` tag URL during a canary, so the old revision's share cannot answer for it);
5. promotes (removes ``canaryTrafficPercent``: all traffic to the new revision) or rolls back.

What KServe reports is tied to the spec it is about by the predictor's ``handoff.dev/predictor-spec``
label, a digest of the spec that KServe copies onto its pods and onto the Deployment or Knative
revision it makes from it. Serverless (``Knative`` since KServe 0.16): the latest created revision
is this spec's (its pods carry the label; while it has no pod, because none has started, admission
refused them or they scaled to zero, it is the one KServe made after the patch, or the one it had
if the patch left the pods' spec as it was), it is the latest ready one, Ready is True, and the
traffic is what the spec asks; Knative giving up on it (``RevisionFailed``) is a failure.
RawDeployment (``Standard`` since 0.16): the predictor's Deployment carries the label in its pod
template and has rolled out as ``kubectl rollout status`` judges it (every replica updated and
available, none of the old ones left; its progress deadline passed, or pods it cannot make, is a
failure), and Ready is True; KServe alone says Ready while the old pods still serve. A deploy
that may not list the pods stops before changing anything: without them neither a crash loop nor
a status left from before the patch can be told. ``status.observedGeneration`` is of no use:
KServe copies it from the Knative Service or the Deployment (``PropagateStatus``/
``PropagateRawStatus``, kserve#6081), whose generations count their own changes (an
autoscaler's scaling, a KServe upgrade re-rendering them).

On the ``handoff-onnx`` runtime the predictor gets handoff.yaml's serving settings (batching,
body and in-flight limits, concurrency, header timeout, shutdown grace) and the version number,
as one JSON environment variable its prologue writes into the server's spec; Triton ignores them.
Stopping a pod lets the server finish what it received (it exits 0 within
``serving.shutdown_grace_s``). In raw deployment mode the pod also waits ``PRE_STOP_S`` before
SIGTERM (a ``preStop`` sleep, so the Service's endpoints drop it before it stops accepting) and
gets a termination grace period that covers both. Knative (Serverless mode) refuses both fields
and does the same itself: its queue-proxy drains the pod before the server's SIGTERM, and the
grace period is the revision's timeout (300 s by default). A first deploy cannot know the mode
(the cluster's default decides it), so it leaves them out; later deploys read it from the service.

Rolling back restores the previous predictor spec and handoff's annotations, so the spec says
again what serves. KServe splits canary traffic between the newest *ready* revision and the last
revision that had all traffic (``latestRolledoutRevision``). While the new revision never had all
traffic, the restore also sets ``canaryTrafficPercent: 0``: the previous revision keeps every
request at once, even if the failed revision is Ready and would otherwise count as the newest
ready one until the restored spec's revision is up. Once the new revision had all traffic
(canary_percent 0, or after promotion), and in raw deployment mode (no traffic split), the
restore goes without it and the restored revision takes over when Ready. A service left with
``canaryTrafficPercent: 0`` by a rollback keeps it until the next deploy, which starts its new
revision at 0% as well and promotes it after its smoke test. A first deploy that fails is left
in place, marked as never having served (``handoff.dev/never-served``), for inspection: it takes
no traffic from anything, and the next deploy treats it as a first deploy again. The step's Role
has no ``delete`` (get, create and patch on the InferenceService are all a deploy needs), and
reads no more than its pods (``list``) and, in raw deployment mode, the predictor's Deployment
(``get``).

The spec each rollout replaced is kept in the ``handoff.dev/rollback-to`` annotation, so a retried
deploy step that finds its own half-finished rollout still knows what to go back to. Every call
to the API server is retried on transient failures (5xx, 429, no connection), and patches carry
the ``resourceVersion`` they were computed from: a concurrent change is re-read, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from handoff.errors import HandoffError
from handoff.kube.client import api_error, describe, reason
from handoff.labels import labels
from handoff.serving.smoke import SmokeResult
from handoff.serving.spec import SETTINGS_ENV, server_settings
from handoff.settings import Settings

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
# KServe's ClusterServingRuntime for NVIDIA Triton (ships with KServe; serves ONNX over V2).
TRITON_RUNTIME = "kserve-tritonserver"
# The project's own ServingRuntime (manifests/): the KServe Python server over ONNX Runtime.
KSERVE_RUNTIME = "handoff-onnx"
MODEL_FORMAT = {"name": "onnx", "version": "1"}
PROTOCOL = "v2"
# The label KServe puts on every pod of an InferenceService.
ISVC_LABEL = "serving.kserve.io/inferenceservice"
# Makes KServe publish per-revision URLs (tags `latest` and `prev`), which the smoke test needs to
# reach the new revision while a canary shares traffic with the old one.
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
# No Knative revisions: no traffic split, no canary. KServe 0.16 renamed RawDeployment to Standard
# (and Serverless to Knative); it reads either name and reports the new one (pkg/constants).
RAW_MODES = ("RawDeployment", "Standard")
PREFIX = "handoff.dev/"
MODEL_NAME_KEY = PREFIX + "model-name"
VERSION_KEY = PREFIX + "model-version"  # an annotation on the service and a label on its pods
SHA_KEY = PREFIX + "onnx-sha256"
ROLLBACK_KEY = PREFIX + "rollback-to"
NEVER_SERVED_KEY = PREFIX + "never-served"
# On the predictor (so on its pods, its Deployment's pod template and its Knative revision): a
# digest of the predictor spec, which tells what KServe reports about this spec from what it
# still reports about the previous one.
SPEC_KEY = PREFIX + "predictor-spec"
# Knative's label on a revision's pods (knative/serving pkg/reconciler/revision/resources/meta.go).
REVISION_LABEL = "serving.knative.dev/revision"
# What the status says of a revision Knative gave up on (Configuration's MarkLatestCreatedFailed,
# propagated by KServe), and of a Deployment whose rollout stopped progressing (kubectl's
# TimedOutReason) or whose ReplicaSet cannot make its pods (admission refused them: Pod Security,
# a ResourceQuota; the ReplicaSet's FailedCreate, which the Deployment controller copies).
REVISION_FAILED = "RevisionFailed"
PROGRESS_DEADLINE = "ProgressDeadlineExceeded"
REPLICA_FAILURE = "ReplicaFailure"
# The users the runtimes' images run as (Pod Security "restricted" needs a non-root user):
# Triton's images have `triton-server` (1000), the platform image 10001.
RUN_AS_USER = {"triton": 1000, "kserve": 10001}
# Raw deployment mode: how long a stopping pod waits before SIGTERM, so that the Service's
# endpoints (kube-proxy, ingress) stop sending it connections first; and the time kept beyond
# shutdown_grace_s for the server's exit.
PRE_STOP_S = 5
EXIT_MARGIN_S = 5
MAX_API_FAILURES = 30  # transient API failures in a row before a deploy gives up
MAX_CONFLICTS = 10  # concurrent writers in a row before a patch gives up
ROLLBACK_OBSERVE_S = 60.0  # how long to wait for KServe to act on a rollback before reporting

T = TypeVar("T")


def flat(text: str) -> str:
    """Any text (a response body, an API message) on one line."""
    return " ".join(text.split())


def log(message: str) -> None:
    """One line per transition, on stderr with the other step logs."""
    print(f"handoff: deploy: {flat(message)}", file=sys.stderr, flush=True)


def one_line(text: str, limit: int = 500) -> str:
    """A container message (often a traceback) as one line: its last lines carry the error."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    joined = " | ".join(lines[-3:])
    return joined if len(joined) <= limit else "…" + joined[-limit:]


# --- what to serve ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One registered model version and where the cluster can download its Triton repository."""

    model_name: str  # the contract's name: the Triton model folder and the V2 model name
    version: str
    sha256: str
    triton_uri: str  # the artifact URI of the repository root, as the registry recorded it


# What KServe's storage initializer downloads a folder from.
FETCHABLE = ("s3://", "gs://", "hdfs://", "webhdfs://", "pvc://", "file://")
# MLflow names Azure Blob locations wasbs://container@account.blob.core.windows.net/path; KServe
# reads the same place as https://account.blob.core.windows.net/container/path.
AZURE_BLOB = re.compile(
    r"^wasbs?://(?P<container>[^@/]+)@(?P<host>[^/]+\.blob\.core\.windows\.net)/?(?P<path>.*)$"
)


def storage_uri(artifact_uri: str) -> str:
    """The registry's artifact URI as a storageUri KServe can download from."""
    azure = AZURE_BLOB.match(artifact_uri)
    if azure:
        return f"https://{azure['host']}/{azure['container']}/{azure['path']}".rstrip("/")
    if artifact_uri.startswith(FETCHABLE):
        return artifact_uri.rstrip("/")
    raise HandoffError(
        f"the registered model's Triton repository is at {artifact_uri}, which KServe's storage "
        "initializer cannot download (it reads s3://, gs://, Azure Blob, hdfs:// and pvc://); store "
        "MLflow artifacts in object storage (`mlflow server --artifacts-destination s3://… "
        "--no-serve-artifacts`, or `--default-artifact-root s3://…`) and register the model again",
        file="handoff.yaml",
        field="mlflow.tracking_uri",
    )


def predictor_spec(
    settings: Settings, release: Release, canary: int | None, *, raw: bool = False
) -> dict[str, Any]:
    """``spec.predictor`` for ``release`` with handoff.yaml's serving settings; ``raw``: the service
    runs in raw deployment mode (see the module docstring)."""
    kserve = settings.serving.kserve
    root = storage_uri(release.triton_uri)
    amounts: dict[str, Any] = {"cpu": kserve.cpu, "memory": kserve.memory}
    if kserve.gpus:
        amounts["nvidia.com/gpu"] = kserve.gpus
    model: dict[str, Any] = {
        "modelFormat": dict(MODEL_FORMAT),
        "protocolVersion": PROTOCOL,
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if kserve.runtime == "triton":
        # tritonserver --model-store=/mnt/models finds /mnt/models/<model-name>/1/model.onnx.
        model.update(runtime=TRITON_RUNTIME, runtimeVersion=kserve.runtime_version, storageUri=root)
    else:
        # The project's runtime pins its own image (the platform version); it reads one model folder.
        model.update(runtime=KSERVE_RUNTIME, storageUri=f"{root}/{release.model_name}")
        # The same settings as a local server's; the runtime's prologue merges them into its spec.
        tuned = json.dumps(
            server_settings(settings.serving, release.version), sort_keys=True, separators=(",", ":")
        )
        model["env"] = [{"name": SETTINGS_ENV, "value": tuned}]
    if raw:
        model["lifecycle"] = {"preStop": {"sleep": {"seconds": PRE_STOP_S}}}
    spec: dict[str, Any] = {
        "minReplicas": kserve.min_replicas,
        "maxReplicas": kserve.max_replicas,
        # On the pods, so a crash loop is told apart from the previous version's healthy pods.
        "labels": {VERSION_KEY: release.version},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER[kserve.runtime],
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "model": model,
        # A predictor never calls the API server; KServe hands the storage credentials to its
        # storage initializer itself.
        "automountServiceAccountToken": False,
    }
    if kserve.service_account:
        spec["serviceAccountName"] = kserve.service_account
    if raw:
        grace = PRE_STOP_S + math.ceil(settings.serving.shutdown_grace_s) + EXIT_MARGIN_S
        spec["terminationGracePeriodSeconds"] = grace
    if canary is not None:
        spec["canaryTrafficPercent"] = canary
    spec["labels"][SPEC_KEY] = spec_digest(spec)
    return spec


def spec_digest(predictor: dict[str, Any]) -> str:
    """What ``SPEC_KEY`` says: a digest of what KServe makes the predictor's pods from, so neither
    the canary share (traffic, not pods) nor the label itself is in it."""
    labels = {k: v for k, v in (predictor.get("labels") or {}).items() if k != SPEC_KEY}
    rest = {k: v for k, v in predictor.items() if k not in ("canaryTrafficPercent", "labels")}
    text = json.dumps({**rest, "labels": labels}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def manifest(
    settings: Settings,
    release: Release,
    *,
    canary: int | None = None,
    rollback_to: str | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """The whole InferenceService for ``release`` (``raw``: for a service in raw deployment mode)."""
    annotations = {
        TAG_ROUTING: "true",
        MODEL_NAME_KEY: release.model_name,
        VERSION_KEY: release.version,
        SHA_KEY: release.sha256,
    }
    if rollback_to is not None:
        annotations[ROLLBACK_KEY] = rollback_to
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": settings.project,
            "namespace": settings.namespace,
            "labels": labels(settings.project, "serving"),
            "annotations": annotations,
        },
        "spec": {"predictor": predictor_spec(settings, release, canary, raw=raw)},
    }


# --- what was served before ---------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What a service ran: its predictor and handoff's annotations, exactly restorable."""

    predictor: dict[str, Any]
    annotations: dict[str, str]

    @property
    def version(self) -> str:
        return self.annotations.get(VERSION_KEY, "?")

    @property
    def sha256(self) -> str:
        return self.annotations.get(SHA_KEY, "")

    def encode(self) -> str:
        # Deterministic, so a retried deploy writes the same annotation (no needless change).
        return json.dumps(
            {"predictor": self.predictor, "annotations": self.annotations},
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> Served | None:
        try:
            data = json.loads(text)
            return cls(predictor=dict(data["predictor"]), annotations=dict(data["annotations"]))
        except (ValueError, KeyError, TypeError):
            return None

    @classmethod
    def of(cls, obj: dict[str, Any]) -> Served:
        predictor = {k: v for k, v in _predictor(obj).items() if k != "canaryTrafficPercent"}
        annotations = {
            k: v for k, v in _annotations(obj).items() if k.startswith(PREFIX) and k != ROLLBACK_KEY
        }
        return cls(predictor=predictor, annotations=annotations)


def _predictor(obj: dict[str, Any]) -> dict[str, Any]:
    return dict((obj.get("spec") or {}).get("predictor") or {})


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _canary(obj: dict[str, Any]) -> int | None:
    value = _predictor(obj).get("canaryTrafficPercent")
    return value if isinstance(value, int) else None


def served_before(obj: dict[str, Any]) -> Served:
    """What takes the traffic a rollout would take over: during a rollout, the spec it replaced."""
    recorded = _annotations(obj).get(ROLLBACK_KEY)
    if _canary(obj) is not None and recorded:
        found = Served.decode(recorded)
        if found is not None:
            return found
    return Served.of(obj)


def _mode(obj: dict[str, Any]) -> str | None:
    """KServe's deployment mode for the service: its status says; the annotation asks for one."""
    mode = (obj.get("status") or {}).get("deploymentMode") or _annotations(obj).get(
        "serving.kserve.io/deploymentMode"
    )
    return str(mode) if mode else None


def _raw_mode(obj: dict[str, Any]) -> bool:
    return _mode(obj) in RAW_MODES


# --- JSON merge patches (RFC 7386), the patch type the kubernetes client sends --------------------


class _Same:
    """No change (a merge patch cannot say this with None, which means delete)."""


SAME = _Same()


def merge_patch(current: Any, desired: Any) -> Any:
    """The merge patch that turns ``current`` into ``desired``, or ``SAME``."""
    if isinstance(current, dict) and isinstance(desired, dict):
        patch: dict[str, Any] = {key: None for key in current.keys() - desired.keys()}
        for key, value in desired.items():
            change = merge_patch(current[key], value) if key in current else value
            if change is not SAME:
                patch[key] = change
        return patch or SAME
    return SAME if current == desired else desired


def _owned(obj: dict[str, Any], label_keys: set[str]) -> dict[str, Any]:
    """The parts of the service handoff manages; everything else (other tools' labels and
    annotations, transformer, status) is left alone by the patches."""
    return {
        "metadata": {
            "labels": {
                k: v for k, v in ((obj.get("metadata") or {}).get("labels") or {}).items() if k in label_keys
            },
            "annotations": {
                k: v for k, v in _annotations(obj).items() if k.startswith(PREFIX) or k == TAG_ROUTING
            },
        },
        "spec": {"predictor": _predictor(obj)},
    }


def patch_to(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
    """The patch from ``current`` to ``desired`` in what handoff owns; None when nothing changes."""
    keys = set(desired["metadata"].get("labels", {}))
    patch = merge_patch(_owned(current, keys), _owned(desired, keys))
    return None if patch is SAME else patch


# --- the API calls ------------------------------------------------------------------------------


class Conflict(Exception):
    """The object changed between reading it and patching it (409 on resourceVersion)."""


@dataclass
class ServiceClient:
    """The calls a deploy makes for one InferenceService, retried while the API server is away."""

    namespace: str
    name: str
    api: client.ApiClient
    retry_s: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    say: Callable[[str], None] = log
    objects: client.CustomObjectsApi = field(init=False)
    core: client.CoreV1Api = field(init=False)
    apps: client.AppsV1Api = field(init=False)

    def __post_init__(self) -> None:
        self.objects = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    @property
    def what(self) -> str:
        return describe(KIND, self.namespace, self.name)

    def _retry(self, action: str, call: Callable[[], T]) -> T:
        """``call()``, again after transient failures (a restarting or overloaded API server)."""
        failures = 0
        while True:
            try:
                return call()
            except ApiException as exc:
                if not ((exc.status or 0) >= 500 or exc.status == 429):
                    raise
                why = reason(exc)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                why = f"API server unreachable: {exc}"
            failures += 1
            if failures >= MAX_API_FAILURES:
                raise HandoffError(
                    f"gave up on {self.what} after {failures} failed API calls in a row: {why}"
                )
            self.say(f"{self.what}: {action} failed ({why}); retrying in {self.retry_s:g} s")
            self.sleep(self.retry_s)

    def get(self) -> dict[str, Any] | None:
        try:
            return self._retry(
                "read",
                lambda: self.objects.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name
                ),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(exc, "read", self.what) from None

    def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when it already exists (another deploy, or our own retry)."""
        try:
            return self._retry(
                "create",
                lambda: self.objects.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, body
                ),
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise api_error(exc, "create", self.what) from None

    def patch(self, body: dict[str, Any]) -> dict[str, Any]:
        """Apply a merge patch; Conflict if its ``metadata.resourceVersion`` is no longer current."""
        try:
            return self._retry(
                "patch",
                lambda: self.objects.patch_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self.name, body
                ),
            )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(reason(exc)) from None
            raise api_error(exc, "patch", self.what) from None

    def pods(self, selector: str) -> list[Any]:
        """The predictor pods ``selector`` picks (``pod_selector``: one spec's, not the serving one's)."""
        try:
            found = self._retry(
                "list pods", lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector)
            )
        except ApiException as exc:
            raise api_error(exc, "list the pods of", self.what) from None
        return list(found.items)

    @property
    def deployment_name(self) -> str:
        # KServe's name for the predictor's Deployment in raw deployment mode (pkg/constants/
        # constants.go, PredictorServiceName, in 0.15 and 0.20). A service an older KServe made
        # as `<name>-predictor-default` keeps that name (predictor.go) and is not looked for.
        return f"{self.name}-predictor"

    def deployment(self) -> Any | None:
        """The predictor's Deployment (raw deployment mode), or None while KServe has made none."""
        name = self.deployment_name
        try:
            return self._retry(
                "read Deployment", lambda: self.apps.read_namespaced_deployment(name, self.namespace)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(
                exc, f"read Deployment {self.namespace}/{name}, the predictor of", self.what
            ) from None

    def apply(self, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        """Read, compute a patch with ``change`` (None: nothing to do), patch it if unchanged since."""
        for _ in range(MAX_CONFLICTS):
            current = self.get()
            if current is None:
                raise HandoffError(f"{self.what} was deleted by someone else during the deploy")
            body = change(current)
            if body is None:
                return current
            body.setdefault("metadata", {})["resourceVersion"] = current["metadata"].get("resourceVersion")
            try:
                return self.patch(body)
            except Conflict:
                self.say(f"{self.what}: changed since it was read; reading it again")
        raise HandoffError(f"{self.what} kept changing under the deploy ({MAX_CONFLICTS} conflicts in a row)")


# --- watching a rollout -------------------------------------------------------------------------


class RolloutFailed(Exception):
    """The new version did not come up healthy; the message says why."""


@dataclass(frozen=True)
class Progress:
    """Where a rollout stands, judged from what KServe reports about the spec it is waiting for."""

    summary: str  # one line for the log
    done: bool = False  # Ready, for this spec, with the traffic the spec asks for
    failure: str | None = None  # why it will not get there on its own
    acted: bool = False  # KServe made this spec's revision or updated its Deployment to it


@dataclass(frozen=True)
class Before:
    """What the status said just before a patch (Serverless): it tells the patched spec's revision
    when no pod can, because there is none yet, admission refused them, or they scaled to zero."""

    revision: str | None = None  # status.components.predictor.latestCreatedRevision then
    same_spec: bool = False  # the patch left the pods' spec (its digest) as it was

    @classmethod
    def patch(cls, current: dict[str, Any], desired: dict[str, Any]) -> Before:
        """Before patching ``current`` to ``desired``."""
        return cls(_created(current), spec_mark(current) == spec_mark(desired))

    def claims(self, created: str) -> bool:
        """Whether ``created`` is the patched spec's revision as far as the status alone tells:
        KServe made it after the patch, or the patch changed nothing KServe makes revisions of.
        (Only the pods tell a status that is stale from before an earlier, identical patch.)"""
        return self.same_spec or created != self.revision


def _created(obj: dict[str, Any]) -> str | None:
    predictor = ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}
    return predictor.get("latestCreatedRevision")


def pod_selector(name: str) -> str:
    """The label selector of every predictor pod of the service ``name``, of any spec: a pod of
    another spec tells that the revision it belongs to is not this spec's."""
    return f"{ISVC_LABEL}={name}"


def spec_mark(obj: dict[str, Any]) -> tuple[str, str | None]:
    """The pod label that marks ``obj``'s predictor spec: its digest, or its version for a spec
    written before ``SPEC_KEY`` existed (None: the spec has neither)."""
    marks = _predictor(obj).get("labels") or {}
    key = SPEC_KEY if SPEC_KEY in marks else VERSION_KEY
    return key, marks.get(key)


def _of_spec(obj: dict[str, Any], found: dict[str, str] | None) -> bool:
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
    obj: dict[str, Any], generation: int, revisions: dict[str, bool], before: Before
) -> Progress:
    """Serverless mode: the latest created revision is this spec's, it is the latest ready one,
    Ready is True and the traffic is what the spec asks.

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
    canary = _canary(obj)
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
    if not _of_spec(obj, template.labels if template else None):
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


# --- the rollout --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """A finished rollout: the service's URL and what its smoke test saw."""

    url: str
    generation: int
    smoke: SmokeResult
    canary_percent: int | None  # the share the new version had before promotion (None: all)


@dataclass
class Watch:
    """Polling with a clock that tests can drive."""

    services: ServiceClient
    poll_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def pods(self) -> list[Any]:
        """Every predictor pod of the service, of any spec. HandoffError when the step may not list
        them: the Role grants it and ``handoff doctor`` checks it, and without the pods neither a
        crash loop nor (in Serverless mode) a status left from before the patch can be told."""
        return self.services.pods(pod_selector(self.services.name))

    def progress(self, obj: dict[str, Any], generation: int, pods: list[Any], before: Before) -> Progress:
        """How far ``obj`` (at ``generation``) has got, read in its deployment mode's own terms."""
        mode = _mode(obj)
        if mode is None:
            return Progress(f"generation {generation}: waiting for KServe to act on it (no status yet)")
        if mode in RAW_MODES:
            services = self.services
            return raw_progress(obj, generation, services.deployment(), services.deployment_name)
        revisions: dict[str, bool] = {}
        for pod in pods:
            found = pod.metadata.labels or {}
            if found.get(REVISION_LABEL):
                revisions[found[REVISION_LABEL]] = _of_spec(obj, found)
        return serverless_progress(obj, generation, revisions, before)

    def ready(self, generation: int, timeout_s: float, before: Before) -> dict[str, Any]:
        """Poll until Ready at ``generation`` (patched from what ``before`` says); RolloutFailed on
        a pod failure or the timeout."""
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
            progress = self.progress(obj, generation, pods, before)
            if progress.summary != last:
                services.say(f"{services.what}: {progress.summary}")
                last = progress.summary
            if progress.done:
                # The status read after the Deployment or pods: its URL is no older than they are.
                newest = services.get()
                at = (newest or {}).get("metadata", {}).get("generation")
                return newest if newest is not None and at == generation else obj
            problem = pod_problem([p for p in pods if _of_spec(obj, p.metadata.labels)], restarts)
            if problem or progress.failure:
                raise RolloutFailed(problem or str(progress.failure))
            if self.clock() >= deadline:
                raise RolloutFailed(
                    f"not Ready at generation {generation} within serving.kserve.ready_timeout_s = "
                    f"{timeout_s:g} s (last: {last})"
                )
            self.sleep(self.poll_s)

    def observed(self, generation: int, timeout_s: float, before: Before) -> bool:
        """Whether KServe acted on ``generation`` (of a rollback) within ``timeout_s``: made the
        restored spec's revision, or updated the predictor's Deployment to it."""
        deadline = self.clock() + timeout_s
        while True:
            obj = self.services.get()
            if obj is None or obj["metadata"].get("generation") != generation:
                return True  # gone, or changed again: nothing left to observe
            try:
                pods = [] if _raw_mode(obj) else self.pods()
                if self.progress(obj, generation, pods, before).acted:
                    return True
            except HandoffError:  # e.g. the Deployment may not be read: the rollback itself is done
                return False
            if self.clock() >= deadline:
                return False
            self.sleep(self.poll_s)


@dataclass
class _Started:
    obj: dict[str, Any]
    target: Served | None  # what to go back to; None: nothing served before (marked on failure)
    changed: bool  # whether this deploy (or the one it resumes) changed what the service runs
    before: Before  # what the status said before the patch (tells its revision when no pod can)


def _start(services: ServiceClient, settings: Settings, release: Release) -> _Started:
    """Create the service or patch it to ``release``; resumes a rollout a retried step left."""
    if services.get() is None:
        created = services.create(manifest(settings, release))
        if created is not None:
            services.say(
                f"created {services.what}: {release.model_name} version {release.version}, all traffic "
                f"once Ready (generation {created['metadata'].get('generation')})"
            )
            return _Started(created, None, True, Before())
        services.say(f"{services.what} appeared meanwhile; updating it instead")
    plan: dict[str, Any] = {}

    def change(obj: dict[str, Any]) -> dict[str, Any] | None:
        owner = ((obj.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/managed-by")
        if owner != "handoff":
            raise HandoffError(
                f"{services.what} exists but is not managed by handoff (label app.kubernetes.io/managed-by "
                f"is {owner!r}); delete or rename it, or change `project`",
                file="handoff.yaml",
                field="project",
            )
        if _annotations(obj).get(NEVER_SERVED_KEY):  # a failed first deploy: still a first deploy
            plan.update(target=None, canary=None, generation=obj["metadata"].get("generation"))
            desired = manifest(settings, release, raw=_raw_mode(obj))
            plan.update(in_flight=False, before=Before.patch(obj, desired))
            return patch_to(obj, desired)
        target = served_before(obj)
        same_model = (target.version, target.sha256) == (release.version, release.sha256)
        canary: int | None = settings.serving.kserve.canary_percent
        if _raw_mode(obj):
            canary = None  # no Knative revisions: a rolling update, no traffic split
        elif _canary(obj) == 0:
            # Rolled back earlier: a failed revision may still be the newest ready one, so any
            # share for "latest" would reach it until the new revision is up. Start dark.
            canary = 0
        elif same_model or not canary:
            canary = None  # the same model needs no canary
        # A rollout records what it replaced; a redeploy of the same model keeps the record it has.
        recorded = _annotations(obj).get(ROLLBACK_KEY) if same_model else target.encode()
        plan.update(target=target, canary=canary, generation=obj["metadata"].get("generation"))
        desired = manifest(settings, release, canary=canary, rollback_to=recorded, raw=_raw_mode(obj))
        plan.update(in_flight=_canary(obj) is not None, before=Before.patch(obj, desired))
        return patch_to(obj, desired)

    updated = services.apply(change)
    target: Served | None = plan["target"]
    generation = updated["metadata"].get("generation")
    if target is None:
        services.say(
            f"patched {services.what} (never served): {release.model_name} version {release.version}, "
            f"all traffic once Ready (generation {generation})"
        )
    elif generation != plan["generation"]:
        share = {None: "all traffic once Ready", 0: "no traffic until its smoke test passes"}.get(
            plan["canary"], f"{plan['canary']}% of traffic once Ready"
        )
        services.say(
            f"patched {services.what}: version {target.version} → {release.version}, {share} "
            f"(generation {generation})"
        )
    else:
        services.say(
            f"{services.what} already has this spec: version {release.version} (generation {generation})"
        )
    changed = generation != plan["generation"] or plan["in_flight"]
    return _Started(updated, target, changed, plan["before"])


def _roll_back(
    services: ServiceClient, watch: Watch, started: _Started, had_all_traffic: bool, timeout_s: float
) -> str:
    """Undo the rollout (see the module docstring); returns what happened, for the error message."""
    target = started.target
    try:
        if target is None:
            services.apply(
                lambda obj: patch_to(
                    obj,
                    {
                        **obj,
                        "metadata": {
                            **obj["metadata"],
                            "annotations": {**_annotations(obj), NEVER_SERVED_KEY: "true"},
                        },
                    },
                )
            )
            services.say(f"{services.what} is left for inspection: nothing was serving before this deploy")
            return (
                "nothing served before this deploy, so no traffic is affected; the InferenceService is "
                f"left for inspection (kubectl -n {services.namespace} describe inferenceservice "
                f"{services.name}) and the next deploy replaces it"
            )
        plan: dict[str, Any] = {}

        def restore(obj: dict[str, Any]) -> dict[str, Any] | None:
            predictor = dict(target.predictor)
            pin = not had_all_traffic and not _raw_mode(obj)
            if pin:
                predictor["canaryTrafficPercent"] = 0
            desired = {
                "metadata": {"annotations": {**target.annotations, TAG_ROUTING: "true"}},
                "spec": {"predictor": predictor},
            }
            plan.update(pin=pin, before=Before.patch(obj, desired))
            return patch_to(obj, desired)

        obj = services.apply(restore)
        outcome = f"rolled back: version {target.version}'s spec is restored" + (
            " with canaryTrafficPercent 0, so its revision keeps all traffic"
            if plan["pin"]
            else " and its revision takes all traffic back once Ready"
        )
        generation = obj["metadata"].get("generation", 0)
        seen = watch.observed(generation, min(ROLLBACK_OBSERVE_S, timeout_s), plan["before"])
        services.say(
            f"{services.what}: {outcome} (generation {generation}{'' if seen else ', not yet observed'})"
        )
        return outcome
    except HandoffError as exc:
        return (
            f"rolling back failed too ({exc}); repair it by hand: "
            f"kubectl -n {services.namespace} edit inferenceservice {services.name}"
        )


def rollout(
    services: ServiceClient,
    settings: Settings,
    release: Release,
    smoke: Callable[[str], SmokeResult],
    watch: Watch,
) -> Rollout:
    """Serve ``release`` (steps in the module docstring); HandoffError after rolling back."""
    timeout_s = settings.serving.kserve.ready_timeout_s
    try:
        watch.pods()  # the wait needs them (Watch.pods): a step that may not list them changes nothing
    except HandoffError as exc:
        raise HandoffError(flat(f"{exc}; the deploy watches them, so it changed nothing")) from None
    started = _start(services, settings, release)
    generation = int(started.obj["metadata"]["generation"])
    canary = _canary(started.obj)
    had_all_traffic = False  # whether the new revision ever had every request (see _roll_back)
    try:
        obj = watch.ready(generation, timeout_s, started.before)
        had_all_traffic = canary is None
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
        if canary is not None:

            def promote(obj: dict[str, Any]) -> dict[str, Any] | None:
                if obj["metadata"].get("generation") != generation:
                    raise HandoffError(f"someone else changed {services.what} during its rollout")
                return {"spec": {"predictor": {"canaryTrafficPercent": None}}}

            promoted = services.apply(promote)
            had_all_traffic = True
            generation = int(promoted["metadata"]["generation"])
            services.say(
                f"promoted version {release.version} of {services.what} to all traffic "
                f"(generation {generation})"
            )
            obj = watch.ready(generation, timeout_s, Before(same_spec=True))  # traffic only
    except (RolloutFailed, HandoffError) as failure:
        if not started.changed:
            raise HandoffError(
                flat(f"{services.what}: {failure}; this deploy changed nothing, so nothing was rolled back")
            ) from None
        outcome = _roll_back(services, watch, started, had_all_traffic, timeout_s)
        raise HandoffError(flat(f"{services.what}: {failure}; {outcome}")) from None
    services.say(f"{services.what} serves {release.model_name} version {release.version} with all traffic")
    return Rollout(
        url=str((obj.get("status") or {}).get("url") or url),
        generation=generation,
        smoke=result,
        canary_percent=canary,
    )
