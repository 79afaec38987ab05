"""The project's InferenceService as handoff writes it: plain data, no API calls.

Everything a deploy applies is built here from handoff.yaml and the registered release, so the
same dicts are what tests validate against the KServe CRD, what the compiled output shows, and
what the server-side apply sends (:mod:`handoff.kube.isvc_client`). Each builder returns the whole
of what handoff manages on the service (its labels, its ``handoff.dev/`` annotations and tag
routing, ``spec.predictor``): with server-side apply, a field handoff applied before and leaves out
now is removed, so a partial configuration would drop the rest.

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

The predictor's ``handoff.dev/predictor-spec`` label is a digest of the spec (``spec_digest``):
KServe copies it onto the pods and onto the Deployment or Knative revision it makes from the
spec, which ties what KServe reports to the spec it is about (:mod:`handoff.kube.isvc_status`).

A rollout records what it replaces (``handoff.dev/rollback-to``, :class:`Served`) as handoff set
it: the fields of the predictor handoff applied (its ``managedFields`` entry), not the whole live
predictor. A rollback restores the record by a forced apply, so a record of the live predictor
would take over KServe's defaults and other managers' fields (a platform team's tolerations, at
their value from before the rollout), which the next deploy, leaving them out, would then remove.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from handoff.errors import HandoffError
from handoff.labels import labels
from handoff.serving.spec import SETTINGS_ENV, server_settings
from handoff.settings import Settings

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
# The field manager of handoff's server-side applies (isvc_client), whose fields a rollback record
# keeps (Served.of).
FIELD_MANAGER = "handoff"
# KServe's ClusterServingRuntime for NVIDIA Triton (ships with KServe; serves ONNX over V2).
TRITON_RUNTIME = "kserve-tritonserver"
# The project's own ServingRuntime (manifests/): the KServe Python server over ONNX Runtime.
KSERVE_RUNTIME = "handoff-onnx"
MODEL_FORMAT = {"name": "onnx", "version": "1"}
PROTOCOL = "v2"
# Makes KServe publish per-revision URLs (tags `latest` and `prev`), which the smoke test needs to
# reach the new revision while a canary shares traffic with the old one.
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
# The annotation that asks KServe for a deployment mode, and the names of the raw one (no Knative
# revisions: no traffic split, no canary). KServe 0.16 renamed RawDeployment to Standard (and
# Serverless to Knative); it reads either name and reports the new one (pkg/constants).
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
RAW_MODES = ("RawDeployment", "Standard")
PREFIX = "handoff.dev/"
MODEL_NAME_KEY = PREFIX + "model-name"
VERSION_KEY = PREFIX + "model-version"  # an annotation on the service and a label on its pods
SHA_KEY = PREFIX + "onnx-sha256"
ROLLBACK_KEY = PREFIX + "rollback-to"
NEVER_SERVED_KEY = PREFIX + "never-served"
CANARY_KEY = "canaryTrafficPercent"  # in spec.predictor
# What handoff removes by leaving it out of an apply: the canary share and its marks. The apply
# only drops handoff's claim on a field, which stays while another manager owns it too (one that
# set the same value: a `kubectl patch` of the share, a merge patch of an older handoff), so the
# client removes what is left of these after each apply (``leftovers``, ``removing``).
DROPPABLE = (
    ("spec", "predictor", CANARY_KEY),
    ("metadata", "annotations", ROLLBACK_KEY),
    ("metadata", "annotations", NEVER_SERVED_KEY),
)
# On the predictor (so on its pods, its Deployment's pod template and its Knative revision): a
# digest of the predictor spec, which tells what KServe reports about this spec from what it
# still reports about the previous one.
SPEC_KEY = PREFIX + "predictor-spec"
# The users the runtimes' images run as (Pod Security "restricted" needs a non-root user):
# Triton's images have `triton-server` (1000), the platform image 10001.
RUN_AS_USER = {"triton": 1000, "kserve": 10001}
# Raw deployment mode: how long a stopping pod waits before SIGTERM, so that the Service's
# endpoints (kube-proxy, ingress) stop sending it connections first; and the time kept beyond
# shutdown_grace_s for the server's exit.
PRE_STOP_S = 5
EXIT_MARGIN_S = 5
# The payload collector's Service (manifests/monitoring/collector.yaml), one per namespace. With a
# payload store set (handoff.yaml monitoring.store) the predictor asks KServe for its logger: the
# agent sidecar KServe adds then sends every request and 200 response to the collector, which
# writes them to that store (handoff.payload_collector). ``metadataAnnotations`` makes the agent
# forward the service's VERSION_KEY annotation with each event (KServe copies the service's
# annotations onto the pods it makes, and the agent reads them from its pod), so each row names
# the version the pod that answered serves, on Triton too.
PAYLOAD_COLLECTOR = "handoff-payload-collector"


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
    logger = payload_logger(settings)
    if logger is not None:
        spec["logger"] = logger
    if canary is not None:
        spec[CANARY_KEY] = canary
    spec["labels"][SPEC_KEY] = spec_digest(spec)
    return spec


def payload_logger(settings: Settings) -> dict[str, Any] | None:
    """``spec.predictor.logger`` when the project keeps a payload store on the cluster, else None
    (no store: no payload log there). The model server logs nothing itself on a cluster
    (server_settings gets no monitoring settings here), so each pair is logged once."""
    if settings.monitoring.store is None:
        return None
    return {
        "mode": "all",
        "url": f"http://{PAYLOAD_COLLECTOR}.{settings.namespace}.svc.cluster.local/",
        "metadataAnnotations": [VERSION_KEY],
    }


def spec_digest(predictor: dict[str, Any]) -> str:
    """What ``SPEC_KEY`` says: a digest of what KServe makes the predictor's pods from, so neither
    the canary share (traffic, not pods) nor the label itself is in it."""
    marks = {k: v for k, v in (predictor.get("labels") or {}).items() if k != SPEC_KEY}
    rest = {k: v for k, v in predictor.items() if k not in (CANARY_KEY, "labels")}
    text = json.dumps({**rest, "labels": marks}, sort_keys=True, separators=(",", ":"))
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


# --- reading a service as the API server returns it ----------------------------------------------


def predictor_of(obj: dict[str, Any]) -> dict[str, Any]:
    return dict((obj.get("spec") or {}).get("predictor") or {})


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def canary_of(obj: dict[str, Any]) -> int | None:
    value = predictor_of(obj).get(CANARY_KEY)
    return value if isinstance(value, int) else None


def mode_of(obj: dict[str, Any]) -> str | None:
    """KServe's deployment mode for the service: its status says; the annotation asks for one."""
    mode = (obj.get("status") or {}).get("deploymentMode") or annotations_of(obj).get(DEPLOYMENT_MODE)
    return str(mode) if mode else None


def is_raw(obj: dict[str, Any]) -> bool:
    return mode_of(obj) in RAW_MODES


def applied_fields(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The fields handoff applied last to ``obj`` (its ``managedFields`` entry, a FieldsV1 tree),
    or None when handoff never applied to it (a service written by merge patches)."""
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if (
            (entry.get("manager"), entry.get("operation")) == (FIELD_MANAGER, "Apply")
            and not entry.get("subresource")
            and entry.get("fieldsType", "FieldsV1") == "FieldsV1"
        ):
            return dict(entry.get("fieldsV1") or {})
    return None


def _children(tree: dict[str, Any]) -> list[str]:
    return [key for key in tree if key != "."]  # ".": the node itself is a member


def owned_part(value: Any, tree: dict[str, Any]) -> Any:
    """The part of ``value`` a FieldsV1 ``tree`` names: ``f:<key>`` an object key, ``k:<json>`` the
    item of a list-map with those keys, ``v:<json>`` an item of a set; a tree with none of them (an
    atomic list or map, a scalar) is the whole value."""
    if not _children(tree):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        return {
            key[2:]: owned_part(value[key[2:]], tree[key])
            for key in _children(tree)
            if key.startswith("f:") and key[2:] in value
        }
    if isinstance(value, list):
        items = []
        for item in value:
            for key in _children(tree):
                if key.startswith("k:") and isinstance(item, dict):
                    if all(item.get(k) == v for k, v in json.loads(key[2:]).items()):
                        items.append(owned_part(item, tree[key]))
                        break
                elif key.startswith("v:") and json.loads(key[2:]) == item:
                    items.append(copy.deepcopy(item))
                    break
        return items
    return copy.deepcopy(value)


def fields_of(value: Any) -> dict[str, Any]:
    """A FieldsV1 tree of what ``value`` (handoff's own predictor) sets: its lists of named
    objects (``env``) are list-maps keyed by name, as the CRD declares them; other lists atomic."""
    if isinstance(value, dict):
        return {f"f:{key}": fields_of(child) for key, child in value.items()}
    if isinstance(value, list) and value and all(isinstance(i, dict) and "name" in i for i in value):
        return {_item_key("k:", {"name": i["name"]}): fields_of(i) for i in value}
    return {}


def _item_key(kind: str, value: Any) -> str:
    return kind + json.dumps(value, sort_keys=True, separators=(",", ":"))


def _canonical(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with its item keys spelt one way, so trees from different writers merge."""
    return {
        (_item_key(key[:2], json.loads(key[2:])) if key[:2] in ("k:", "v:") else key): _canonical(child)
        for key, child in tree.items()
    }


def _union(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if not _children(a) or not _children(b):
        return {}  # one of them has all of it
    return {key: _union(a[key], b[key]) if key in a and key in b else {**b, **a}[key] for key in {**a, **b}}


def handoffs_predictor(obj: dict[str, Any], taking: dict[str, Any] | None = None) -> dict[str, Any]:
    """What of ``obj``'s predictor is handoff's: the fields it applied, and those of ``taking`` (the
    predictor a deploy is about to apply, which takes over what someone edited since). KServe's
    defaults and other managers' fields (a platform team's tolerations) are not, so a rollback
    that restores this leaves them to their owners. A service handoff never applied to (written
    by the merge patches of an older handoff) has no record of its fields: all of it, as then."""
    applied = applied_fields(obj)
    live = predictor_of(obj)
    if applied is None:
        return live
    tree = (applied.get("f:spec") or {}).get("f:predictor")
    tree = None if tree is None else _canonical(tree)
    if taking:
        tree = fields_of(taking) if tree is None else _union(tree, fields_of(taking))
    return owned_part(live, tree) if tree is not None else {}


@dataclass(frozen=True)
class Served:
    """What a service ran, as handoff set it: handoff's part of its predictor (without the canary
    share) and handoff's annotations, exactly restorable."""

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
    def of(cls, obj: dict[str, Any], taking: dict[str, Any] | None = None) -> Served:
        """What ``obj`` runs (``taking``: see ``handoffs_predictor``)."""
        predictor = {k: v for k, v in handoffs_predictor(obj, taking).items() if k != CANARY_KEY}
        annotations = {
            k: v for k, v in annotations_of(obj).items() if k.startswith(PREFIX) and k != ROLLBACK_KEY
        }
        return cls(predictor=predictor, annotations=annotations)


def served_before(obj: dict[str, Any], taking: dict[str, Any] | None = None) -> Served:
    """What takes the traffic a rollout would take over: during a rollout, the spec it replaced
    (``taking``: the predictor the rollout applies, see ``handoffs_predictor``)."""
    recorded = annotations_of(obj).get(ROLLBACK_KEY)
    if canary_of(obj) is not None and recorded:
        found = Served.decode(recorded)
        if found is not None:
            return found
    return Served.of(obj, taking)


def _has(obj: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = obj
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def leftovers(config: dict[str, Any], stored: dict[str, Any]) -> list[tuple[str, ...]]:
    """What ``config`` leaves out of ``DROPPABLE`` and the object as stored after applying it
    still has (another manager owns it too)."""
    return [path for path in DROPPABLE if _has(stored, path) and not _has(config, path)]


def removing(stored: dict[str, Any], paths: list[tuple[str, ...]]) -> list[dict[str, Any]]:
    """A JSON patch (RFC 6902) that removes ``paths`` from ``stored`` if each still has the value
    it has there: a ``test`` before each ``remove``, so a value someone set since stays (the patch
    fails whole instead), while other writes (a controller's status) do not get in the way."""
    operations: list[dict[str, Any]] = []
    for path in paths:
        pointer = "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in path)
        node: Any = stored
        for key in path:
            node = node[key]
        operations += [{"op": "test", "path": pointer, "value": node}, {"op": "remove", "path": pointer}]
    return operations


# --- what the later steps of a rollout apply, from what its first step applied -------------------


def promoted(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without its canary share: all traffic to the revision it made."""
    result = copy.deepcopy(config)
    result["spec"]["predictor"].pop(CANARY_KEY, None)
    return result


def never_served(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` marked as a failed first deploy, left for inspection (the next deploy replaces it)."""
    result = copy.deepcopy(config)
    result["metadata"]["annotations"][NEVER_SERVED_KEY] = "true"
    return result


def restoring(config: dict[str, Any], target: Served, *, pin: bool) -> dict[str, Any]:
    """``config`` (what the failed rollout applied) turned back into what ``target`` ran: handoff's
    part of its predictor and its annotations (so the rollback record goes), with
    ``canaryTrafficPercent: 0`` when ``pin``: the revision that served keeps every request while
    the restored spec's starts."""
    predictor = copy.deepcopy(target.predictor)
    if pin:
        predictor[CANARY_KEY] = 0
    meta = config["metadata"]
    return {
        "apiVersion": config["apiVersion"],
        "kind": config["kind"],
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": dict(meta.get("labels") or {}),
            "annotations": {**target.annotations, TAG_ROUTING: "true"},
        },
        "spec": {"predictor": predictor},
    }
