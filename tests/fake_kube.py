"""A small, faithful stand-in for the Kubernetes API server, for the custom resources the steps use.

The steps talk to it through the official ``kubernetes`` client over loopback HTTP, so requests,
paths, bodies and error handling are the real ones. What the fake keeps honest:

- every object it receives or ends up with (after a patch) is validated against its kind's
  published CRD schema (``tests/schemas/``, strict about unknown fields) and rejected with 422
  ``Invalid`` and a ``Status`` body naming the path, as the API server does;
- names follow the API server's rules (409 ``AlreadyExists``, 404 ``NotFound``);
- ``metadata.generation``, ``uid``, ``creationTimestamp`` and ``resourceVersion`` are set on create;
  ``generation`` moves only when the spec changes (the resources have a status subresource, so
  ``status`` in a create or patch body is ignored and metadata changes leave ``generation`` alone),
  ``resourceVersion`` on every write, and a patch carrying a stale ``resourceVersion`` gets 409;
- PATCH takes server-side apply (``application/apply-patch+yaml``: create if absent, merge into
  the live object, remove what the same field manager applied before and leaves out now, 409 on
  another manager's field unless forced, ``uid``/``resourceVersion`` preconditions, 422 without
  ``fieldManager``; see "server-side apply" below), JSON merge patches (RFC 7386, what
  ``CustomObjectsApi.patch_*`` sends) and JSON patches (RFC 6902); strategic merge patches, and
  any other content type, get 415, as for any custom resource. Field managers are kept per object
  and shown as ``metadata.managedFields``; a write that changes nothing is not written.

What an operator would do (start pods, set conditions) is played by a *controller*, a function
each test passes in: it gets the stored object after a create and after every spec change, and may
update its status and pods from a thread. ``KServe`` is one for InferenceServices.

Every request is authorized first, for ``caller`` against the RBAC objects in ``rbac``, as the API
server's RBAC authorizer does (``fake_rbac.py``; the default caller is a cluster admin).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import kubernetes_validate
import yaml
from kubernetes import client

from . import fake_rbac

SCHEMAS = Path(__file__).parent / "schemas"
RFC_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@functools.cache
def _validator(schema_file: str) -> jsonschema.Draft7Validator:
    # Parsed once per session: the InferenceService schema alone is 0.7 MB.
    return jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / schema_file).read_text())))


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    schema_file: str

    def validator(self) -> jsonschema.Draft7Validator:
        return _validator(self.schema_file)


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever it lists the known ones.

    The API server drops fields a CRD does not declare (silently, unless the client asks for
    field validation), so a typo would be lost on a real cluster; the fake refuses it instead.
    """
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


INFERENCESERVICE = Resource(
    "serving.kserve.io",
    "v1beta1",
    "inferenceservices",
    "InferenceService",
    "kserve-inferenceservice-v1beta1.schema.json",
)
INFERENCEGRAPH = Resource(
    "serving.kserve.io",
    "v1alpha1",
    "inferencegraphs",
    "InferenceGraph",
    "kserve-inferencegraph-v1alpha1.schema.json",
)
RESOURCES = [
    Resource(
        "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "kubeflow-trainjob-v1alpha1.schema.json"
    ),
    Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "kubeflow-pytorchjob-v1.schema.json"),
    INFERENCESERVICE,
    INFERENCEGRAPH,
]
BY_PLURAL = {r.plural: r for r in RESOURCES}

Controller = Callable[["FakeKube", dict[str, Any]], None]
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.4",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.22.10",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now(),
    }


def schema_problems(resource: Resource, obj: dict[str, Any]) -> list[str]:
    """The CRD schema's complaints about ``obj``, each with the path it is about."""
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in resource.validator().iter_errors(obj)
    ]


@dataclass
class FakeKube:
    url: str = ""
    controller: Controller | None = None
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (plural, ns, name)
    # Every state an object was in after a create or patch, oldest first.
    history: dict[tuple[str, str, str], list[dict[str, Any]]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    # Every PATCH as received: (path, Content-Type, query parameters).
    patches: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    # Who owns which fields of each object (server-side apply's field managers; see below).
    managed: dict[tuple[str, str, str], Managers] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)  # the messages of every 4xx/5xx answer
    gets: dict[tuple[str, str, str], int] = field(default_factory=dict)  # GETs answered per object
    unavailable_gets: int = 0  # answer this many GETs of objects with 503, as a restarting server does
    unavailable_requests: int = 0  # the same for any request (reads, writes, pod lists)
    unavailable_answered: int = 0
    # Cluster facts `handoff doctor` reads: namespaces (name -> labels), nodes, the custom
    # resources discovery lists (group/version -> plurals), and what access reviews refuse.
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    served: dict[str, set[str]] = field(
        default_factory=lambda: {f"{r.group}/{r.version}": {r.plural} for r in RESOURCES}
    )
    # Who sends the requests, and the RBAC objects each one is authorized against (fake_rbac.py);
    # other plain objects doctor reads (ConfigMaps, Deployments) by (plural, namespace, name).
    caller: fake_rbac.User = fake_rbac.CLUSTER_ADMIN
    rbac: fake_rbac.Rbac = field(default_factory=fake_rbac.Rbac)
    stored: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    closed: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)
    _resource_version: int = 0

    def add_node(self, name: str, labels: dict[str, str], gpus: int, *, unschedulable: bool = False) -> None:
        allocatable = {"cpu": "8", "memory": "32Gi", "pods": "110"}
        if gpus:
            allocatable["nvidia.com/gpu"] = str(gpus)
        self.nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": {"unschedulable": unschedulable},
                "status": {"allocatable": allocatable, "capacity": allocatable},
            }
        )

    def apply(self, *objects: dict[str, Any]) -> None:
        """Store objects as `kubectl apply` would: RBAC kinds for authorization, others to be read."""
        with self.lock:
            for obj in objects:
                if not self.rbac.apply(obj):
                    meta = obj["metadata"]
                    key = (f"{obj['kind'].lower()}s", meta.get("namespace", ""), meta["name"])
                    self.stored[key] = copy.deepcopy(obj)

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration(host=self.url)
        configuration.retries = 0
        return client.ApiClient(configuration)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.objects[(plural, namespace, name)])

    def gets_of(self, plural: str, namespace: str, name: str) -> int:
        with self.lock:
            return self.gets.get((plural, namespace, name), 0)

    def next_resource_version(self) -> str:
        with self.lock:
            self._resource_version += 1
            return str(self._resource_version)

    def set_status(self, plural: str, namespace: str, name: str, *conditions: dict[str, Any]) -> None:
        """Append conditions, replacing any of the same type (a list-map keyed on ``type``)."""
        with self.lock:
            obj = self.objects[(plural, namespace, name)]
            kept = [
                c
                for c in obj.setdefault("status", {}).get("conditions", [])
                if c["type"] not in {n["type"] for n in conditions}
            ]
            obj["status"]["conditions"] = kept + list(conditions)
            obj["metadata"]["resourceVersion"] = self.next_resource_version()

    def replace_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any], *, generation: int
    ) -> bool:
        """What an operator's status update does, if the object is still at ``generation``.

        The status is checked against the CRD schema too: a mistake in a test's simulated
        operator must not pass for something a real one would write.
        """
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            if obj is None or obj["metadata"]["generation"] != generation:
                return False
            updated = {**obj, "status": status}
            problems = schema_problems(BY_PLURAL[plural], updated)
            assert not problems, f"simulated status is invalid: {problems}"
            updated["metadata"]["resourceVersion"] = self.next_resource_version()
            self.objects[(plural, namespace, name)] = updated
            return True

    def add_pod(
        self,
        name: str,
        labels: dict[str, str],
        *,
        exit_code: int = 0,
        message: str = "",
        waiting: str = "",
        running: bool = False,
        restart_count: int = 0,
        last_exit_code: int | None = None,
        last_message: str = "",
        container: str = "node",
        namespace: str = "x",
    ) -> None:
        """Add a pod with one container in the given state, or replace the pod of that name."""
        state: dict[str, Any]
        if waiting:
            state = {"waiting": {"reason": waiting, "message": message}}
        elif running:
            state = {"running": {"startedAt": now()}}
        else:
            state = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Error" if exit_code else "Completed",
                    "message": message,
                }
            }
        status: dict[str, Any] = {
            "name": container,
            "ready": running,
            "restartCount": restart_count,
            "image": "i",
            "imageID": "",
            "state": state,
        }
        if last_exit_code is not None:
            status["lastState"] = {
                "terminated": {"exitCode": last_exit_code, "reason": "Error", "message": last_message}
            }
        pod = {
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "status": {"containerStatuses": [status]},
        }
        with self.lock:
            self.pods = [p for p in self.pods if p["metadata"]["name"] != name] + [pod]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def _selects(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``a=b,c=d``), the kind the steps send."""
    for requirement in filter(None, selector.split(",")):
        key, _, value = requirement.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def _invalid_message(resource: Resource, name: str, problems: list[str]) -> str:
    return f'{resource.kind}.{resource.group} "{name}" is invalid: ' + "; ".join(problems)


def _modified(resource: Resource, name: str) -> str:
    return (
        f'Operation cannot be fulfilled on {resource.plural}.{resource.group} "{name}": the object has '
        "been modified; please apply your changes to the latest version and try again"
    )


class PatchError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(422, "Invalid", f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(target: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 add/remove/replace/test, applied all or nothing."""
    doc = copy.deepcopy(target)
    for op in operations:
        parts = _pointer(op.get("path", ""))
        if not parts:
            raise PatchError(422, "Invalid", "patching the whole object is not supported")
        parent: Any = doc
        for part in parts[:-1]:
            try:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            except (KeyError, IndexError, ValueError):
                raise PatchError(422, "Invalid", f"{op['op']} {op['path']}: path does not exist") from None
        last = parts[-1]
        kind = op.get("op")
        exists = (
            (last in parent) if isinstance(parent, dict) else (last.isdigit() and int(last) < len(parent))
        )
        if kind == "test":
            if not exists or (parent[int(last)] if isinstance(parent, list) else parent[last]) != op.get(
                "value"
            ):
                raise PatchError(422, "Invalid", f"test {op['path']} failed")
        elif kind in ("remove", "replace") and not exists:
            raise PatchError(422, "Invalid", f"{kind} {op['path']}: path does not exist")
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(index, copy.deepcopy(op["value"]))
                else:
                    parent[index] = copy.deepcopy(op["value"])
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise PatchError(422, "Invalid", f"unsupported JSON patch op {kind!r}")
    return doc


# --- server-side apply --------------------------------------------------------------------------
#
# What the API server's field manager does (k8s.io/apiserver pkg/endpoints/handlers/fieldmanager,
# sigs.k8s.io/structured-merge-diff), for what the deploy relies on. A field set is every path an
# object sets: object keys, items of a `x-kubernetes-list-type: map` list by their keys, and the
# fields inside (other lists are atomic: one leaf). Each manager owns a set: an apply's manager
# (operation Apply) owns exactly what it sent last, an update's (POST, merge and JSON patches,
# operation Update) the fields it changed. An apply merges its object into the live one, and removes
# what its manager applied before and leaves out now, unless another manager owns it too. Changing
# a field another manager owns is a conflict (409), unless the apply is forced: then it takes the
# field over. Simplified: every path of a set is a member (SSA marks leaves and list items only, so
# a struct whose fields all go is removed here with them), and managedFields carry no "." markers.

Path = tuple[Any, ...]  # object keys, and (key, value) pairs naming an item of a list-map
APPLY = "application/apply-patch+yaml"
_MISSING = object()
# Set by the API server, not by whoever writes the object: never in a field set.
SYSTEM = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")
UNOWNED = {("apiVersion",), ("kind",), ("status",), ("metadata", "name"), ("metadata", "namespace")} | {
    ("metadata", key) for key in SYSTEM
}
Managers = dict[tuple[str, str], frozenset[Path]]  # (manager, operation) -> the fields it owns


def _child(schema: dict[str, Any], key: str) -> dict[str, Any]:
    found = (schema.get("properties") or {}).get(key, schema.get("additionalProperties"))
    return found if isinstance(found, dict) else {}


def _list_keys(schema: dict[str, Any]) -> list[str]:
    return (
        list(schema.get("x-kubernetes-list-map-keys") or [])
        if schema.get("x-kubernetes-list-type") == "map"
        else []
    )


def _item(item: Any, keys: list[str]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, item.get(k)) for k in keys) if isinstance(item, dict) else ()


def field_set(value: Any, schema: dict[str, Any], path: Path = ()) -> frozenset[Path]:
    """Every field ``value`` sets (see above), less those the API server owns."""
    found: set[Path] = set()
    if isinstance(value, dict) and schema.get("x-kubernetes-map-type") != "atomic":
        for key, child in value.items():
            at = (*path, key)
            found |= {at, *field_set(child, _child(schema, key), at)}
    elif isinstance(value, list) and (keys := _list_keys(schema)):
        for item in value:
            at = (*path, _item(item, keys))
            found |= {at, *field_set(item, schema.get("items") or {}, at)}
    return frozenset(p for p in found if not any(p[: len(u)] == u for u in UNOWNED))


def _at(obj: Any, path: Path) -> Any:
    for segment in path:
        if isinstance(segment, tuple) and isinstance(obj, list):
            obj = next((i for i in obj if _item(i, [k for k, _ in segment]) == segment), _MISSING)
        elif isinstance(obj, dict):
            obj = obj.get(segment, _MISSING)
        else:
            return _MISSING
    return obj


def _remove(obj: Any, path: Path) -> None:
    parent, last = _at(obj, path[:-1]), path[-1]
    if isinstance(last, tuple) and isinstance(parent, list):
        parent[:] = [i for i in parent if _item(i, [k for k, _ in last]) != last]
    elif isinstance(parent, dict):
        parent.pop(last, None)


def _merged(live: Any, applied: Any, schema: dict[str, Any]) -> Any:
    """``applied`` merged into ``live``: objects key by key, list-maps item by item, else replaced."""
    if (
        isinstance(live, dict)
        and isinstance(applied, dict)
        and schema.get("x-kubernetes-map-type") != "atomic"
    ):
        merged = dict(live)
        for key, value in applied.items():
            merged[key] = (
                _merged(live[key], value, _child(schema, key)) if key in live else copy.deepcopy(value)
            )
        return merged
    keys = _list_keys(schema)
    if keys and isinstance(live, list) and isinstance(applied, list):
        merged_items = copy.deepcopy(live)
        for item in applied:
            at = next((n for n, i in enumerate(merged_items) if _item(i, keys) == _item(item, keys)), None)
            if at is None:
                merged_items.append(copy.deepcopy(item))
            else:
                merged_items[at] = _merged(merged_items[at], item, schema.get("items") or {})
        return merged_items
    return copy.deepcopy(applied)


def _leaves(fields: frozenset[Path]) -> frozenset[Path]:
    return fields - {p[:-1] for p in fields}


def _dotted(path: Path) -> str:
    return "".join(
        f"[{','.join(f'{k}={v}' for k, v in s)}]" if isinstance(s, tuple) else f".{s}" for s in path
    )


def server_side_apply(
    current: dict[str, Any],
    body: dict[str, Any],
    schema: dict[str, Any],
    managers: Managers,
    who: str,
    force: bool,
) -> tuple[dict[str, Any], Managers]:
    """``body`` applied by ``who`` to ``current``: the object and its managers. PatchError on a conflict."""
    applied = field_set(body, schema)
    others = {m: f for m, f in managers.items() if m != (who, "Apply")}
    changed = frozenset(p for p in _leaves(applied) if _at(current, p) != _at(body, p))
    taken = sorted({(m[0], p) for m, f in others.items() for p in changed & f}, key=repr)
    if taken and not force:
        said = "; ".join(f'conflict with "{m}": {_dotted(p)}' for m, p in taken)
        raise PatchError(409, "Conflict", f"Apply failed with {len(taken)} conflict(s): {said}")
    others = {m: f - changed for m, f in others.items()}  # a changed field changes owner
    updated = _merged(current, body, schema)
    kept = {p[:n] for f in others.values() for p in f for n in range(1, len(p) + 1)}  # and their parents
    for path in sorted(managers.get((who, "Apply"), frozenset()) - applied - kept, key=len):
        _remove(updated, path)
    return updated, {**others, (who, "Apply"): applied}


def updated_managers(
    before: dict[str, Any] | None, after: dict[str, Any], schema: dict[str, Any], managers: Managers, who: str
) -> Managers:
    """An update's (a create, a merge or JSON patch) managers: ``who`` owns the fields it changed."""
    was, now_set = field_set(before or {}, schema), field_set(after, schema)
    leaves = _leaves(now_set)
    changed = frozenset(
        p for p in now_set if p not in was or (p in leaves and _at(before, p) != _at(after, p))
    )
    result = {m: f - changed for m, f in managers.items() if m != (who, "Update")}
    result[(who, "Update")] = managers.get((who, "Update"), frozenset()) | changed
    return result


def pruned(managers: Managers, obj: dict[str, Any]) -> Managers:
    """Each manager's fields that ``obj`` still has; a manager left with none is gone."""
    kept = {m: frozenset(p for p in f if _at(obj, p) is not _MISSING) for m, f in managers.items()}
    return {m: f for m, f in kept.items() if f}


def managed_fields(managers: Managers, obj: dict[str, Any]) -> list[dict[str, Any]]:
    """``metadata.managedFields`` as the API server shows it (FieldsV1)."""
    entries = []
    for (manager, operation), fields in sorted(managers.items()):
        tree: dict[str, Any] = {}
        for path in sorted(fields, key=repr):
            node = tree
            for s in path:
                node = node.setdefault(
                    f"k:{json.dumps(dict(s), sort_keys=True)}" if isinstance(s, tuple) else f"f:{s}", {}
                )
        if tree:
            entries.append(
                {"manager": manager, "operation": operation, "apiVersion": obj["apiVersion"], "time": now(),
                 "fieldsType": "FieldsV1", "fieldsV1": tree}
            )  # fmt: skip
    return entries


def _handler(fake: FakeKube) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            if code >= 400:
                with fake.lock:
                    fake.rejected.append(
                        f"{code} {self.command} {urlparse(self.path).path}: {body.get('message')}"
                    )
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _unavailable(self, *, get: bool = False) -> bool:
            """Answer 503 while the test says the server is away."""
            with fake.lock:
                if fake.unavailable_requests > 0:
                    fake.unavailable_requests -= 1
                elif get and fake.unavailable_gets > 0:
                    fake.unavailable_gets -= 1
                else:
                    return False
                fake.unavailable_answered += 1
            self._send(503, _status(503, "ServiceUnavailable", "the server is unable to handle it"))
            return True

        def _route(self) -> tuple[Resource | None, str, str, str]:
            path = urlparse(self.path).path
            fake.requests.append((self.command, path))
            match = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", path)
            if not match:
                return None, "", "", path
            group, version, namespace, plural, name = match.groups()
            resource = BY_PLURAL.get(plural)
            if resource is None or (resource.group, resource.version) != (group, version):
                return None, "", "", path
            return resource, namespace, name or "", path

        def _body(self) -> Any:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")

        def _invalid(self, resource: Resource, name: str, problems: list[str]) -> None:
            self._send(422, _status(422, "Invalid", _invalid_message(resource, name, problems)))

        def _cluster_get(self, path: str, query: str) -> bool:
            """Version, namespaces, nodes, discovery, ConfigMaps, Deployments: what `handoff doctor` reads."""
            if path.rstrip("/") == "/version":
                self._send(200, VERSION)
                return True
            plain = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(configmaps)/([^/]+)", path) or re.fullmatch(
                r"/apis/apps/v1/namespaces/([^/]+)/(deployments)/([^/]+)", path
            )
            if plain:
                namespace, plural, name = plain.groups()
                found = fake.stored.get((plural, namespace, name))
                if found is not None:
                    self._send(200, found)
                else:  # as the API server words it: `configmaps "x"`, `deployments.apps "x"`
                    qualified = "configmaps" if plural == "configmaps" else "deployments.apps"
                    self._send(404, _status(404, "NotFound", f'{qualified} "{name}" not found'))
                return True
            namespace = re.fullmatch(r"/api/v1/namespaces/([^/]+)", path)
            if namespace:
                name = namespace.group(1)
                if name not in fake.namespaces:
                    self._send(404, _status(404, "NotFound", f'namespaces "{name}" not found'))
                else:
                    meta = {"name": name, "labels": fake.namespaces[name]}
                    self._send(200, {"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
                return True
            if path == "/api/v1/nodes":
                selector = parse_qs(query).get("labelSelector", [""])[0]
                items = [n for n in fake.nodes if _selects(selector, n["metadata"]["labels"])]
                self._send(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items})
                return True
            discovery = re.fullmatch(r"/apis/([^/]+/[^/]+)", path)
            if discovery:
                plurals = fake.served.get(discovery.group(1))
                if plurals is None:
                    self._send(
                        404, _status(404, "NotFound", "the server could not find the requested resource")
                    )
                else:
                    resources = [
                        {"name": p, "namespaced": True, "kind": p, "verbs": []} for p in sorted(plurals)
                    ]
                    body = {
                        "kind": "APIResourceList",
                        "groupVersion": discovery.group(1),
                        "resources": resources,
                    }
                    self._send(200, body)
                return True
            return False

        def do_GET(self) -> None:
            parsed = urlparse(self.path)
            if self._cluster_get(parsed.path, parsed.query):
                return
            pods = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", parsed.path)
            if pods:
                fake.requests.append(("GET", parsed.path))
                if self._unavailable():
                    return
                selector = parse_qs(parsed.query).get("labelSelector", [""])[0]
                with fake.lock:
                    items = [p for p in fake.pods if _selects(selector, p["metadata"]["labels"])]
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                return
            resource, namespace, name, path = self._route()
            if resource is None or not name:
                self._send(404, _status(404, "NotFound", f"the server could not find {path}"))
                return
            if self._unavailable(get=True):
                return
            key = (resource.plural, namespace, name)
            with fake.lock:
                found = copy.deepcopy(fake.objects.get(key))
                fake.gets[key] = fake.gets.get(key, 0) + 1
            if found is None:
                self._send(
                    404, _status(404, "NotFound", f'{resource.plural}.{resource.group} "{name}" not found')
                )
                return
            self._send(200, found)

        def _manager(self, query: dict[str, list[str]]) -> str:
            """The request's field manager: its fieldManager, else its User-Agent up to the first "/"."""
            given = (query.get("fieldManager") or [""])[-1]
            return given or (self.headers.get("User-Agent") or "unknown").split("/")[0][:128]

        def _creation_problems(self, resource: Resource, namespace: str, body: dict[str, Any]) -> list[str]:
            problems = schema_problems(resource, body)
            meta = body.get("metadata") or {}
            name = meta.get("name", "")
            if (
                body.get("kind") != resource.kind
                or body.get("apiVersion") != f"{resource.group}/{resource.version}"
            ):
                problems.append(
                    f"kind/apiVersion {body.get('kind')}/{body.get('apiVersion')} do not match the path"
                )
            if not RFC_1035.match(name) or len(name) > 63:
                problems.append(f"metadata.name {name!r} must be an RFC 1035 label of at most 63 characters")
            if meta.get("namespace", namespace) != namespace:
                problems.append("metadata.namespace does not match the request's namespace")
            return problems

        def _write(
            self,
            key: tuple[str, str, str],
            obj: dict[str, Any],
            managers: Managers,
            current: dict[str, Any] | None,
        ) -> dict[str, Any]:
            """Store ``obj`` (created from nothing when ``current`` is None) with its managers."""
            meta = obj["metadata"]
            if current is None:
                meta.update(generation=1, uid=str(uuid.uuid4()), creationTimestamp=now())
            else:
                for system in ("uid", "creationTimestamp", "generation"):
                    meta[system] = current["metadata"][system]
                meta["generation"] += int(obj.get("spec") != current.get("spec"))
            managers = pruned(managers, obj)
            if current is not None and managers == fake.managed.get(key):
                meta["managedFields"] = current["metadata"].get("managedFields", [])
            else:
                meta["managedFields"] = managed_fields(managers, obj)
            meta["resourceVersion"] = fake.next_resource_version()
            fake.objects[key], fake.managed[key] = obj, managers
            fake.history.setdefault(key, []).append(copy.deepcopy(obj))
            return copy.deepcopy(obj)

        def do_POST(self) -> None:
            resource, namespace, name, path = self._route()
            if resource is None or name:
                self._send(404, _status(404, "NotFound", f"the server could not find {path}"))
                return
            if self._unavailable():
                return
            body = self._body()
            body.pop("status", None)  # the status subresource: only the operator writes status
            meta = body.setdefault("metadata", {})
            name = meta.get("name", "")
            problems = self._creation_problems(resource, namespace, body)
            if problems:
                self._invalid(resource, name, problems)
                return
            key = (resource.plural, namespace, name)
            schema = resource.validator().schema
            with fake.lock:
                if key in fake.objects:
                    exists = f'{resource.plural}.{resource.group} "{name}" already exists'
                    self._send(409, _status(409, "AlreadyExists", exists))
                    return
                meta["namespace"] = namespace
                who = self._manager(parse_qs(urlparse(self.path).query))
                stored = self._write(key, body, updated_managers(None, body, schema, {}, who), None)
            self._send(201, stored)
            if fake.controller is not None:
                fake.controller(fake, copy.deepcopy(stored))

        def _options_problem(self, content_type: str, query: dict[str, list[str]]) -> str:
            """ValidatePatchOptions, which the API server checks before it looks the object up."""
            if content_type == APPLY and not (query.get("fieldManager") or [""])[-1]:
                return "fieldManager: Required value: is required for apply patch"
            if content_type != APPLY and "force" in query:
                return "force: Forbidden: may not be specified for non-apply patch"
            return ""

        def do_PATCH(self) -> None:
            resource, namespace, name, path = self._route()
            if resource is None or not name:
                self._send(404, _status(404, "NotFound", f"the server could not find {path}"))
                return
            if self._unavailable():
                return
            query = parse_qs(urlparse(self.path).query)
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            with fake.lock:
                fake.patches.append((path, content_type, {k: v[-1] for k, v in query.items()}))
            problem = self._options_problem(content_type, query)
            if problem:
                self._send(422, _status(422, "Invalid", f'PatchOptions.meta.k8s.io "" is invalid: {problem}'))
                return
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            key = (resource.plural, namespace, name)
            with fake.lock:
                try:
                    code, stored, changed = self._patched(resource, key, content_type, raw, query)
                except PatchError as exc:
                    self._send(exc.code, _status(exc.code, exc.reason, str(exc)))
                    return
            self._send(code, stored)
            if changed and fake.controller is not None:
                fake.controller(fake, copy.deepcopy(stored))

        def _patched(
            self,
            resource: Resource,
            key: tuple[str, str, str],
            content_type: str,
            raw: bytes,
            query: dict[str, list[str]],
        ) -> tuple[int, dict[str, Any], bool]:
            """The answer to a PATCH: its code, the object, whether its spec changed (or it was
            created). PatchError as the API server answers."""
            namespace, name = key[1], key[2]
            schema, who, managers = (
                resource.validator().schema,
                self._manager(query),
                fake.managed.get(key, {}),
            )
            current = fake.objects.get(key)
            if content_type == APPLY:
                body = self._applied(resource, raw, name, current)
                if current is None:
                    return 201, self._apply_create(resource, namespace, key, body, schema, who), True
                force = (query.get("force") or ["false"])[-1].lower() not in ("false", "0", "no")
                updated, managers = server_side_apply(current, body, schema, managers, who, force)
            elif current is None:
                raise PatchError(404, "NotFound", f'{resource.plural}.{resource.group} "{name}" not found')
            elif content_type == "application/merge-patch+json" and isinstance(
                body := json.loads(raw or b"null"), dict
            ):
                wanted = (body.get("metadata") or {}).get("resourceVersion")
                if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                    raise PatchError(409, "Conflict", _modified(resource, name))
                updated = merge_patch(copy.deepcopy(current), body)
                managers = updated_managers(current, updated, schema, managers, who)
            elif content_type == "application/json-patch+json" and isinstance(
                body := json.loads(raw or b"null"), list
            ):
                updated = json_patch(current, body)
                managers = updated_managers(current, updated, schema, managers, who)
            else:
                raise PatchError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format: {content_type}",
                )
            updated["status"] = copy.deepcopy(current.get("status"))  # status is a subresource
            if updated["status"] is None:
                del updated["status"]
            problems = schema_problems(resource, updated)
            for immutable in ("name", "namespace", "uid", "creationTimestamp"):
                if updated["metadata"].get(immutable) != current["metadata"].get(immutable):
                    problems.append(f"metadata.{immutable}: field is immutable")
            if (updated.get("kind"), updated.get("apiVersion")) != (current["kind"], current["apiVersion"]):
                problems.append("kind/apiVersion are immutable")
            if problems:
                raise PatchError(422, "Invalid", _invalid_message(resource, name, problems))
            if updated == current and pruned(managers, updated) == fake.managed.get(key):
                return 200, copy.deepcopy(current), False  # nothing changed: nothing written
            spec_changed = updated.get("spec") != current.get("spec")
            return 200, self._write(key, updated, managers, current), spec_changed

        def _applied(
            self, resource: Resource, raw: bytes, name: str, current: dict[str, Any] | None
        ) -> dict[str, Any]:
            """An apply's object (YAML, so JSON too), checked against its preconditions and stripped of
            what the API server sets. PatchError as the API server answers."""
            try:
                body = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise PatchError(400, "BadRequest", f"error decoding YAML: {exc}") from None
            if not isinstance(body, dict):
                raise PatchError(400, "BadRequest", "the body of an apply must be an object")
            meta = body.get("metadata") or {}
            if meta.get("managedFields") is not None:
                raise PatchError(400, "BadRequest", "metadata.managedFields must be nil")
            if meta.get("name", name) != name:
                raise PatchError(
                    400,
                    "BadRequest",
                    f"the name of the object ({meta['name']}) does not match the name on the URL ({name})",
                )
            live = (current or {}).get("metadata") or {}
            uid = meta.get("uid")
            if uid is not None and uid != live.get("uid"):
                raise PatchError(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: {uid}, "
                    f"UID in object meta: {live.get('uid', '')}",
                )
            version = meta.get("resourceVersion")
            if version is not None and current is not None and version != live["resourceVersion"]:
                raise PatchError(409, "Conflict", _modified(resource, name))
            body.pop("status", None)  # the status subresource: only the operator writes status
            body["metadata"] = {k: v for k, v in meta.items() if k not in SYSTEM}
            return body

        def _apply_create(
            self,
            resource: Resource,
            namespace: str,
            key: tuple[str, str, str],
            body: dict[str, Any],
            schema: dict[str, Any],
            who: str,
        ) -> dict[str, Any]:
            """An apply of an object that is not there creates it, if the caller may also create
            (the API server authorizes the create as well as the patch)."""
            asked = dataclasses.replace(
                fake_rbac.request_attributes("PATCH", urlparse(self.path).path), verb="create"
            )
            if not fake.rbac.authorize(fake.caller, asked):
                denied = fake_rbac.forbidden(fake.caller, asked)
                raise PatchError(403, denied["reason"], denied["message"])
            body.setdefault("metadata", {}).setdefault("name", key[2])
            problems = self._creation_problems(resource, namespace, body)
            if problems:
                raise PatchError(422, "Invalid", _invalid_message(resource, key[2], problems))
            body["metadata"]["namespace"] = namespace
            return self._write(key, body, {(who, "Apply"): field_set(body, schema)}, None)

        def do_DELETE(self) -> None:
            resource, namespace, name, path = self._route()
            if resource is not None and self._unavailable():
                return
            removed = None
            with fake.lock:
                if resource is not None:
                    removed = fake.objects.pop((resource.plural, namespace, name), None)
                    fake.managed.pop((resource.plural, namespace, name), None)
            if removed is None:
                self._send(404, _status(404, "NotFound", f"the server could not find {path}"))
                return
            self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    return fake_rbac.authorizing(Handler, fake)


@contextmanager
def fake_kube(controller: Controller | None = None) -> Iterator[FakeKube]:
    """Serve a fresh fake API server on 127.0.0.1 for the duration of the block."""
    fake = FakeKube(controller=controller)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll interval: shutting the server down at the end of each test waits for one.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.closed = True
        server.shutdown()
        server.server_close()


# --- KServe -------------------------------------------------------------------------------------
#
# Read from kserve/kserve at v0.20.0 (1fb781055dd1) and master (aaac4e294dae, 2026-08-21), the
# same in what is played here as v0.16.0 (5b033a402444); v0.15 differs in names and the raw status:
# - pkg/constants/constants.go: 0.16 renamed the modes Serverless to ``Knative`` and RawDeployment
#   to ``Standard`` (kserve#4608); the controller still reads the old names (``ParseDeploymentMode``)
#   and writes the new one into ``status.deploymentMode`` (``updateStatus``, controller.go). 0.15
#   knows only the old names: it refuses ``Standard`` as the default mode (kserve#4701) and ignores
#   it in the annotation.
# - pkg/apis/serving/v1beta1/inference_service_status.go: ``PropagateStatus`` (Serverless) copies
#   the Knative Service's revisions, traffic, Ready *and observedGeneration*; ``PropagateRawStatus``
#   (RawDeployment) derives Ready from the Deployment's Available/Progressing conditions and copies
#   *its* observedGeneration (kserve#6081). Neither is the InferenceService's own generation.
#   From 0.16 on, the Deployment's ``ReplicaFailure`` (pods it cannot create) makes Ready False.
# - pkg/controller/v1beta1/inferenceservice/reconcilers/knative/ksvc_reconciler.go: the traffic
#   split (canary share to the latest ready revision only once a revision was rolled out).
# - pkg/controller/v1beta1/inferenceservice/reconcilers/deployment/deployment_reconciler.go:
#   the predictor's Deployment ``<name>-predictor`` (constants.PredictorServiceName) with the
#   predictor's labels and the service's annotations on its pod template, RollingUpdate 25%/25%;
#   updates leave ``replicas`` to the HPA, and the status propagated right after an update is the
#   Deployment's status from before it.
# Knative (knative/serving 98e5ef90aa70): a revision's pods carry ``serving.knative.dev/revision``
# (pkg/reconciler/revision/resources/meta.go). A revision whose pods admission refuses fails:
# the Deployment's ReplicaFailure becomes the revision's ResourcesAvailable=False
# (TransformDeploymentStatus in pkg/apis/serving/k8s_lifecycle.go, PropagateDeploymentStatus in
# pkg/apis/serving/v1/revision_lifecycle.go), and its Configuration and Service say RevisionFailed,
# "Revision %q failed with message: %s." (MarkLatestCreatedFailed, configuration_lifecycle.go). A
# revision scaled to zero stays Ready (revisionCondSet leaves out Active, revision_lifecycle.go).
# The Deployment controller's rollout and its conditions are Kubernetes' (pkg/controller/deployment,
# as ``kubectl rollout status`` reads them; a ReplicaSet's FailedCreate becomes the Deployment's
# ReplicaFailure in progress.go, with the API server's refusal as its message).

ISVC_LABEL = "serving.kserve.io/inferenceservice"
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
MODE_NAMES = {"Serverless": "Knative", "RawDeployment": "Standard"}  # KServe 0.16's, in the status
RAW_MODES = ("RawDeployment", "Standard")  # "Standard" is the raw mode's name since KServe 0.16
KNATIVE_REVISION = "serving.knative.dev/revision"
KUBERNETES_VERSION = "1.31"  # the Deployment is checked against this version's schema
RUNNING, STARTING = "running", "starting"  # raw-mode pod states (any other: a crash's message)


@dataclass
class Revision:
    name: str
    template: str  # what Knative makes a new revision for: the pod template (predictor, annotations)
    url: str
    ready: bool
    failure: str = ""  # why Knative gave up on it: its pods crash, or admission refused them


@dataclass
class _Service:
    revisions: list[Revision] = field(default_factory=list)
    latest_ready: Revision | None = None
    latest_rolled_out: Revision | None = None
    previous_rolled_out: Revision | None = None
    # Serverless: the Knative Service's spec as KServe last wrote it, and its generation.
    ksvc: str = ""
    ksvc_generation: int = 0
    # RawDeployment: the ReplicaSet (pod-template-hash) whose pods serve, and where they answer.
    serving: str = ""
    serving_url: str = ""


def _crash_looping(fake: FakeKube, pod: str, labels: dict[str, str], message: str, namespace: str) -> None:
    """A predictor pod whose server keeps exiting with ``message``, as the kubelet reports it."""
    fake.add_pod(
        pod, labels, waiting="CrashLoopBackOff", restart_count=3, last_exit_code=1,
        last_message=message, container="kserve-container", namespace=namespace,
        message="back-off 40s restarting failed container=kserve-container",
    )  # fmt: skip


@dataclass
class KServe:
    """Plays KServe's controller for InferenceServices, as a fake's controller.

    Each new generation is reconciled in a thread, as KServe would. The deployment mode is the
    service's ``serving.kserve.io/deploymentMode`` annotation, else ``mode`` (the cluster default),
    either name of it; ``status.deploymentMode`` says the name KServe 0.16 gave it.

    Serverless (Knative): a changed pod template (predictor without ``canaryTrafficPercent``,
    annotations) makes a new revision with predictor pods. Traffic follows KServe's ksvc
    reconciler: with ``canaryTrafficPercent`` and a rolled-out revision, the canary share goes to
    the newest *ready* revision and the rest to ``latestRolledoutRevision`` (tag ``prev``);
    otherwise all of it goes to the newest ready revision. A revision that gets all traffic becomes
    the rolled-out one. Tag ``latest`` (a URL for the newest ready revision) exists only with
    ``serving.kserve.io/enable-tag-routing``. The status reports ``Ready`` (the newest revision's),
    URLs, revisions, and the *Knative Service's* generation as ``observedGeneration``: it moves
    when KServe changes the Knative Service (template or traffic), and ``upgrade`` moves it alone.
    ``idle`` scales revisions to zero where ``minReplicas: 0`` lets Knative.

    RawDeployment: KServe keeps the Deployment ``<name>-predictor``; the Deployment controller
    rolls a changed pod template out (one surge pod, then all), each step lasting ``step_gets``
    reads of the InferenceService or ``step_s`` seconds; ``autoscale_to`` is an HPA that scales the
    Deployment mid-rollout (a new generation of the Deployment, not of the InferenceService). The
    status is ``PropagateRawStatus``'s: Ready from the Deployment's conditions (True while the old
    pods keep it Available; False on ReplicaFailure), the Deployment's ``observedGeneration``, and
    the URL of the pods that answer (the old ones until the rollout completes).

    ``url_for`` says where the pods of a spec answer (a real local model server); ``crash`` gives
    the container's message when a spec's pods should crash-loop (and never get ready); ``refuse``
    gives admission's reason when it refuses a spec's pods (Pod Security, a ResourceQuota);
    ``stale_gets`` keeps the previous generation's status for that many GETs of the object (a
    busy controller: a client that trusts a stale Ready condition is caught by that).
    """

    url_for: Callable[[dict[str, Any]], str]
    crash: Callable[[dict[str, Any]], str | None] = lambda obj: None
    refuse: Callable[[dict[str, Any]], str | None] = lambda obj: None
    stale_gets: int = 0
    mode: str = "Serverless"
    autoscale_to: int | None = None
    step_gets: int = 2
    step_s: float = 2.0
    stale_answers: int = 0  # GETs answered while a newer generation waited to be reconciled
    release: int = 0  # KServe's version: an upgrade re-renders what it made
    services: dict[tuple[str, str], _Service] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, fake: FakeKube, obj: dict[str, Any]) -> None:
        threading.Thread(target=self._reconcile, args=(fake, obj), daemon=True).start()

    def upgrade(self, fake: FakeKube) -> None:
        """KServe upgraded (or its inferenceservice-config changed, say a new storage-initializer
        image): its controller renders every Knative Service anew, so each gets a new revision of
        the same spec and a new generation, while the InferenceServices' generations stay."""
        self.release += 1
        with fake.lock:
            current = [
                copy.deepcopy(o) for (plural, *_), o in fake.objects.items() if plural == "inferenceservices"
            ]
        with self.lock:
            for obj in current:
                if self._mode(obj) not in RAW_MODES:
                    self._apply(fake, obj)

    def _mode(self, obj: dict[str, Any]) -> str:
        return (obj["metadata"].get("annotations") or {}).get(DEPLOYMENT_MODE, self.mode)

    def _status_mode(self, obj: dict[str, Any]) -> str:
        """What ``status.deploymentMode`` says: the mode's name since KServe 0.16."""
        return MODE_NAMES.get(self._mode(obj), self._mode(obj))

    def idle(self, fake: FakeKube) -> None:
        """No requests for a while: Knative's autoscaler scales the revisions of every Serverless
        service whose predictor allows it to zero (``minReplicas: 0``, which KServe passes on as
        the revision's min-scale: SetAutoScalingAnnotations, pkg/controller/v1alpha1/utils). They
        stay Ready; their pods are gone."""
        with fake.lock:
            idle = {
                o["metadata"]["name"]
                for (plural, *_), o in fake.objects.items()
                if plural == "inferenceservices"
                and self._mode(o) not in RAW_MODES
                and o["spec"]["predictor"].get("minReplicas") == 0
            }
            fake.pods = [
                p
                for p in fake.pods
                if p["metadata"]["labels"].get(ISVC_LABEL) not in idle
                or KNATIVE_REVISION not in p["metadata"]["labels"]
            ]

    def _reconcile(self, fake: FakeKube, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (INFERENCESERVICE.plural, meta["namespace"], meta["name"])
        start = fake.gets_of(*key)
        while fake.gets_of(*key) < start + self.stale_gets:
            if (
                fake.closed
                or fake.objects.get(key, {}).get("metadata", {}).get("generation") != meta["generation"]
            ):
                return
            time.sleep(0.002)
        self.stale_answers += fake.gets_of(*key) - start
        with self.lock:
            if self._mode(obj) in RAW_MODES:
                self._apply_raw(fake, obj)
            else:
                self._apply(fake, obj)

    def _apply(self, fake: FakeKube, obj: dict[str, Any]) -> None:
        meta, predictor = obj["metadata"], obj["spec"]["predictor"]
        name, generation = meta["name"], meta["generation"]
        service = self.services.setdefault((meta["namespace"], name), _Service())
        template = json.dumps(
            {
                "predictor": {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"},
                "annotations": meta.get("annotations") or {},
                "kserve": self.release,
            },
            sort_keys=True,
        )
        if not service.revisions or service.revisions[-1].template != template:
            crash, refused = self.crash(obj), self.refuse(obj)
            revision_name = f"{name}-predictor-{len(service.revisions) + 1:05d}"
            pod = f"{revision_name}-deployment-7d9f8"  # the ReplicaSet's generateName, then a suffix
            failure = ""
            if refused is not None:  # the API server's refusal, the ReplicaSet's FailedCreate
                failure = f'pods "{pod}-" is forbidden: {refused}'
            elif crash is not None:
                failure = f"Container failed with: {crash}"
            revision = Revision(revision_name, template, self.url_for(obj), not failure, failure)
            service.revisions.append(revision)
            pod_labels = {
                ISVC_LABEL: name,
                **(predictor.get("labels") or {}),
                KNATIVE_REVISION: revision.name,
                "app": revision.name,
            }
            pod, namespace = f"{pod}-abcde", meta["namespace"]
            if refused is not None:  # no pod at all
                pass
            elif crash is None:
                fake.add_pod(pod, pod_labels, running=True, container="kserve-container", namespace=namespace)
            else:
                _crash_looping(fake, pod, pod_labels, crash, namespace)
        latest = service.revisions[-1]
        if latest.ready:
            service.latest_ready = latest
        canary = predictor.get("canaryTrafficPercent")
        tagged = (meta.get("annotations") or {}).get(TAG_ROUTING) == "true"
        newest, rolled = service.latest_ready, service.latest_rolled_out
        # The Knative Service KServe writes: the template, and the split it asks for.
        split = canary if canary is not None and rolled is not None else None
        ksvc = json.dumps([template, split, rolled.name if split is not None and rolled else "", tagged])
        if ksvc != service.ksvc:
            service.ksvc, service.ksvc_generation = ksvc, service.ksvc_generation + 1
        traffic: list[dict[str, Any]] = []
        if newest is not None:
            if canary is not None and rolled is not None:
                traffic = [self._target(newest, canary, "latest" if tagged else "", latest=True)]
                if canary < 100:
                    traffic.append(self._target(rolled, 100 - canary, "prev", latest=False))
            else:
                traffic = [self._target(newest, 100, "latest" if tagged else "", latest=True)]
            if traffic[0]["percent"] == 100 and rolled is not newest:
                service.previous_rolled_out, service.latest_rolled_out = rolled, newest
        ready = condition("Ready", "", "") if latest.ready else condition(
            "Ready", "RevisionFailed", f"Revision \"{latest.name}\" failed with message: {latest.failure}.",
            status="False",
        )  # fmt: skip
        ready = {k: v for k, v in ready.items() if v != ""}
        components: dict[str, Any] = {
            "latestCreatedRevision": latest.name,
            "traffic": traffic,
        }
        for field_name, revision in (
            ("latestReadyRevision", service.latest_ready),
            ("latestRolledoutRevision", service.latest_rolled_out),
            ("previousRolledoutRevision", service.previous_rolled_out),
        ):
            if revision is not None:
                components[field_name] = revision.name
        status: dict[str, Any] = {
            "observedGeneration": service.ksvc_generation,  # the Knative Service's (PropagateStatus)
            "deploymentMode": self._status_mode(obj),
            "conditions": [ready],
            "components": {"predictor": components},
        }
        if traffic:
            # The service URL splits traffic; a single URL stands in for it: the majority's.
            majority = max(traffic, key=lambda t: (t["percent"], t["latestRevision"]))
            status["url"] = next(r.url for r in service.revisions if r.name == majority["revisionName"])
            # The in-cluster address (http://<name>.<namespace>.svc.cluster.local, through the mesh
            # to the same revisions): on the fake's loopback network, the same URL.
            status["address"] = {"url": status["url"]}
        fake.replace_status(INFERENCESERVICE.plural, meta["namespace"], name, status, generation=generation)

    @staticmethod
    def _target(revision: Revision, percent: int, tag: str, *, latest: bool) -> dict[str, Any]:
        target: dict[str, Any] = {"revisionName": revision.name, "percent": percent, "latestRevision": latest}
        if tag:  # only tagged targets get a URL of their own
            target.update(tag=tag, url=revision.url)
        return target

    # --- RawDeployment --------------------------------------------------------------------------

    def _apply_raw(self, fake: FakeKube, obj: dict[str, Any]) -> None:
        """KServe updates the predictor's Deployment; the Deployment controller rolls it out."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        service = self.services.setdefault((namespace, name), _Service())
        deployment = self._deployment(obj)
        template = deployment["spec"]["template"]
        new = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        with fake.lock:
            previous = copy.deepcopy(
                fake.stored.get(("deployments", namespace, deployment["metadata"]["name"]))
            )
        if previous is not None:
            if previous["spec"]["template"] == template:  # e.g. only maxReplicas (the HPA's) changed
                self._raw_status(fake, obj, previous, service.serving_url)
                return
            deployment["metadata"] = {
                **previous["metadata"],
                "generation": previous["metadata"]["generation"] + 1,
            }
            deployment["spec"]["replicas"] = previous["spec"]["replicas"]  # the HPA's, not KServe's
            deployment["status"] = previous["status"]
        self._store(fake, deployment)
        # The status KServe writes with its update is the Deployment's status from before it.
        self._raw_status(fake, obj, previous or deployment, service.serving_url)
        if new == service.serving:  # back to the serving ReplicaSet (a rollback): it is all there
            self._rolled_out(fake, obj, deployment, new, service.serving_url)
            return
        if not self._step(fake, obj):
            return
        # The Deployment controller starts a ReplicaSet for the new template with one surge pod
        # (25% of one replica, rounded up); the old pods stay and keep the Deployment Available.
        crash, url, refused = self.crash(obj), self.url_for(obj), self.refuse(obj)
        old = deployment["spec"]["replicas"] if service.serving else 0
        if refused is not None:
            # Admission refuses the surge pod: the ReplicaSet says FailedCreate, the Deployment
            # controller copies it as ReplicaFailure, and the rollout stays where it is.
            deployment["status"] = self._rolling(deployment, new, old, 0)
            deployment["status"]["conditions"].append(
                _deployment_condition(
                    "ReplicaFailure", True, "FailedCreate",
                    f'pods "{deployment["metadata"]["name"]}-{new}-" is forbidden: {refused}',
                )
            )  # fmt: skip
            self._store(fake, deployment)
            self._raw_status(fake, obj, deployment, service.serving_url if old else "")
            return
        self._pod(fake, obj, deployment, new, 0, STARTING)
        deployment["status"] = self._rolling(deployment, new, old, 1)
        self._store(fake, deployment)
        self._raw_status(fake, obj, deployment, service.serving_url if old else "")
        if self.autoscale_to is not None and self.autoscale_to != deployment["spec"]["replicas"]:
            if not self._step(fake, obj):
                return
            # The HPA scales the Deployment (its scale subresource): the Deployment's generation
            # moves, the InferenceService's does not; the rollout goes on at the new size.
            deployment["spec"]["replicas"] = self.autoscale_to
            deployment["metadata"]["generation"] += 1
            for index in range(1, self.autoscale_to):
                self._pod(fake, obj, deployment, new, index, STARTING)
            deployment["status"] = self._rolling(deployment, new, old, self.autoscale_to)
            self._store(fake, deployment)
            self._raw_status(fake, obj, deployment, service.serving_url if old else "")
        if not self._step(fake, obj):
            return
        if crash is not None:
            # The new pods' containers fail, again and again: they never become available, and
            # the rollout stays where it is (until its progress deadline, 600 s).
            for index in range(deployment["status"]["updatedReplicas"]):
                self._pod(fake, obj, deployment, new, index, crash)
            return
        self._rolled_out(fake, obj, deployment, new, url)

    @staticmethod
    def _deployment(obj: dict[str, Any]) -> dict[str, Any]:
        """The Deployment KServe makes for the service's predictor (as new, at generation 1)."""
        meta, predictor = obj["metadata"], obj["spec"]["predictor"]
        model = predictor["model"]
        name = f"{meta['name']}-predictor"
        labels = {
            **(meta.get("labels") or {}),
            **(predictor.get("labels") or {}),
            ISVC_LABEL: meta["name"],
            "component": "predictor",
            "app": f"isvc.{name}",
        }
        container: dict[str, Any] = {
            "name": "kserve-container",
            "image": f"{model.get('runtime', 'runtime')}:{model.get('runtimeVersion', 'latest')}",
            "args": ["--model_dir=/mnt/models"],
            **{k: model[k] for k in ("env", "resources", "securityContext", "lifecycle") if k in model},
        }
        pod_spec: dict[str, Any] = {
            "initContainers": [
                {
                    "name": "storage-initializer",
                    "image": "kserve/storage-initializer",
                    "args": [model["storageUri"], "/mnt/models"],
                }
            ],
            "containers": [container],
            **{
                k: predictor[k]
                for k in (
                    "securityContext",
                    "serviceAccountName",
                    "automountServiceAccountToken",
                    "terminationGracePeriodSeconds",
                )
                if k in predictor
            },
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "generation": 1,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now(),
            },
            "spec": {
                "replicas": 1,  # the API server's default: KServe leaves the count to the HPA
                "selector": {"matchLabels": {"app": f"isvc.{name}"}},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
                },
                "progressDeadlineSeconds": 600,
                "template": {
                    "metadata": {"labels": labels, "annotations": dict(meta.get("annotations") or {})},
                    "spec": pod_spec,
                },
            },
            "status": {},
        }

    def _step(self, fake: FakeKube, obj: dict[str, Any]) -> bool:
        """Let a rollout step be seen: ``step_gets`` reads of the service, or ``step_s`` without
        any; False when the service moved to another generation (KServe reconciles that one)."""
        meta = obj["metadata"]
        key = (INFERENCESERVICE.plural, meta["namespace"], meta["name"])
        start, deadline = fake.gets_of(*key), time.monotonic() + self.step_s
        while fake.gets_of(*key) < start + self.step_gets and time.monotonic() < deadline:
            if (
                fake.closed
                or fake.objects.get(key, {}).get("metadata", {}).get("generation") != meta["generation"]
            ):
                return False
            time.sleep(0.002)
        return (
            not fake.closed
            and fake.objects.get(key, {}).get("metadata", {}).get("generation") == meta["generation"]
        )

    @staticmethod
    def _rolling(deployment: dict[str, Any], new: str, old: int, updated: int) -> dict[str, Any]:
        """The status mid-rollout: ``updated`` new pods not yet available, ``old`` old ones serving."""
        wanted = deployment["spec"]["replicas"]
        # Available: no more than maxUnavailable (25% of the replicas, rounded down) missing.
        available = old >= wanted - wanted // 4
        replica_set = f"{deployment['metadata']['name']}-{new}"
        status: dict[str, Any] = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": old + updated,
            "updatedReplicas": updated,
            "conditions": [
                _deployment_condition("Available", available),
                _deployment_condition(
                    "Progressing", True, "ReplicaSetUpdated", f'ReplicaSet "{replica_set}" is progressing.'
                ),
            ],
        }
        if old:
            status.update(readyReplicas=old, availableReplicas=old)
        if wanted > old:
            status["unavailableReplicas"] = wanted - old
        return status

    def _rolled_out(
        self, fake: FakeKube, obj: dict[str, Any], deployment: dict[str, Any], new: str, url: str
    ) -> None:
        """The rollout done: every replica of the new ReplicaSet available, the old ones gone."""
        # The Service's endpoints follow the pods: with the old ones gone only the new ones answer,
        # before the Deployment's status says so (and long before KServe's does).
        self._raw_status(fake, obj, copy.deepcopy(deployment), url)
        wanted = deployment["spec"]["replicas"]
        for index in range(wanted):
            self._pod(fake, obj, deployment, new, index, RUNNING)
        app = deployment["spec"]["selector"]["matchLabels"]["app"]
        with fake.lock:
            fake.pods = [
                p
                for p in fake.pods
                if p["metadata"]["labels"].get("app") != app
                or p["metadata"]["labels"].get("pod-template-hash") == new
            ]
        replica_set = f"{deployment['metadata']['name']}-{new}"
        deployment["status"] = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": wanted,
            "updatedReplicas": wanted,
            "readyReplicas": wanted,
            "availableReplicas": wanted,
            "conditions": [
                _deployment_condition("Available", True),
                _deployment_condition(
                    "Progressing",
                    True,
                    "NewReplicaSetAvailable",
                    f'ReplicaSet "{replica_set}" has successfully progressed.',
                ),
            ],
        }
        self._store(fake, deployment)
        service = self.services[(obj["metadata"]["namespace"], obj["metadata"]["name"])]
        service.serving, service.serving_url = new, url
        self._raw_status(fake, obj, deployment, url)

    def _pod(
        self,
        fake: FakeKube,
        obj: dict[str, Any],
        deployment: dict[str, Any],
        new: str,
        index: int,
        state: str,
    ) -> None:
        """Pod ``index`` of the ReplicaSet ``new``: STARTING, RUNNING, or crash-looping with ``state``
        as its container's last message."""
        labels = {**deployment["spec"]["template"]["metadata"]["labels"], "pod-template-hash": new}
        pod = f"{deployment['metadata']['name']}-{new}-{index}"
        namespace = obj["metadata"]["namespace"]
        if state == RUNNING:
            fake.add_pod(pod, labels, running=True, container="kserve-container", namespace=namespace)
        elif state == STARTING:
            fake.add_pod(
                pod, labels, waiting="ContainerCreating", container="kserve-container", namespace=namespace
            )
        else:
            _crash_looping(fake, pod, labels, state, namespace)

    @staticmethod
    def _store(fake: FakeKube, deployment: dict[str, Any]) -> None:
        """Keep the Deployment where the fake API server serves it, as Kubernetes' schema allows."""
        try:
            kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"simulated Deployment is invalid: {str(exc).splitlines()[0]}") from None
        meta = deployment["metadata"]
        with fake.lock:
            meta["resourceVersion"] = fake.next_resource_version()
            fake.stored[("deployments", meta["namespace"], meta["name"])] = copy.deepcopy(deployment)

    def _raw_status(self, fake: FakeKube, obj: dict[str, Any], deployment: dict[str, Any], url: str) -> None:
        """``PropagateRawStatus``: Ready from the Deployment's conditions, its observedGeneration."""
        found = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions") or []}
        available, progressing = found.get("Available"), found.get("Progressing")
        ready: tuple[str, str, str] = ("False", "", "")
        if available is not None and available["status"] == "True":
            ready = ("True", available["reason"], available["message"])
        if progressing is not None:
            said = (progressing["reason"], progressing["message"])
            if progressing["status"] == "False" and progressing["message"]:
                ready = ("False", *said)
            elif progressing["status"] == "True" and progressing["reason"] == "NewReplicaSetAvailable":
                ready = ("True", *said)
            elif progressing["status"] == "True" and ready[0] != "True":
                ready = ("Unknown", *said)
        if available is not None and available["status"] == "False":
            ready = ("False", available["reason"], available["message"])
        failure = found.get("ReplicaFailure")
        if failure is not None and failure["status"] == "True":  # since KServe 0.16
            ready = ("False", failure["reason"], failure["message"])
        status: dict[str, Any] = {
            "deploymentMode": self._status_mode(obj),
            "conditions": [
                {k: v for k, v in condition("Ready", ready[1], ready[2], status=ready[0]).items() if v != ""}
            ],
            "components": {"predictor": {"url": url} if url and ready[0] == "True" else {}},
        }
        observed = (deployment.get("status") or {}).get("observedGeneration")
        if observed:
            status["observedGeneration"] = observed  # the Deployment's, not the InferenceService's
        if url:
            status["url"] = url  # the Service reaches the pods that are available
            status["address"] = {"url": url}  # <name>-predictor.<namespace>.svc.cluster.local, here loopback
        meta = obj["metadata"]
        fake.replace_status(
            INFERENCESERVICE.plural, meta["namespace"], meta["name"], status, generation=meta["generation"]
        )


def _deployment_condition(type_: str, true: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    """A Deployment condition as the Deployment controller words it (pkg/controller/deployment/util)."""
    if type_ == "Available" and not reason:
        reason = "MinimumReplicasAvailable" if true else "MinimumReplicasUnavailable"
        message = (
            "Deployment has minimum availability."
            if true
            else "Deployment does not have minimum availability."
        )
    stamp = now()
    return {
        "type": type_,
        "status": "True" if true else "False",
        "reason": reason,
        "message": message,
        "lastUpdateTime": stamp,
        "lastTransitionTime": stamp,
    }


# --- KServe's InferenceGraph controller and router ------------------------------------------------
#
# Read from kserve/kserve at v0.20.0 (1fb781055dd1):
# - pkg/controller/v1alpha1/inferencegraph/controller.go: each step with a ``serviceName`` needs that
#   InferenceService (else the reconcile requeues, writing no status); an empty ``serviceUrl`` is
#   filled, in the router's copy of the spec only, from the service's ``status.address.url`` and
#   ``/v2/models/<model>/infer`` (GetPredictorEndpoint; <model> is the service's name unless its
#   predictor names another in --model_name or MLSERVER_MODEL_NAME), and requeues while the
#   service has no address. In Knative mode the graph's conditions are its Knative Service's
#   (ConfigurationsReady, Ready, RoutesReady) plus ``Stopped`` False, and ``status.url`` the
#   Knative Service's URL while Ready; no observedGeneration.
# - cmd/router/main.go: every request, whatever its path, is POSTed to one step's URL; a Splitter
#   draws it per request (``pickupRoute``: crypto/rand below 100 against the running sum of
#   weights); the step's status and body come back, not its headers.


@dataclass
class KServeGraphs:
    """Plays KServe for InferenceServices (``kserve``) and for InferenceGraphs, as a fake's controller.

    A graph is reconciled in a thread: once every step's service exists (and has an address where
    a step needs its URL filled), a router for it starts on 127.0.0.1, Knative-style Ready
    conditions are written and ``status.url`` is the router's. The router plays KServe's for
    ``Splitter`` nodes; ``picks`` records the step each request went to. ``close`` stops the routers.
    """

    kserve: KServe
    requeue_s: float = 0.01
    picks: list[str] = field(default_factory=list)
    routers: dict[tuple[str, str], ThreadingHTTPServer] = field(default_factory=dict)

    def __call__(self, fake: FakeKube, obj: dict[str, Any]) -> None:
        if obj.get("kind") == INFERENCEGRAPH.kind:
            threading.Thread(target=self._reconcile, args=(fake, obj), daemon=True).start()
        else:
            self.kserve(fake, obj)

    def close(self) -> None:
        for server in self.routers.values():
            server.shutdown()
            server.server_close()
        self.routers.clear()

    def _reconcile(self, fake: FakeKube, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (INFERENCEGRAPH.plural, meta["namespace"], meta["name"])
        spec = copy.deepcopy(obj["spec"])
        while not self._resolved(fake, meta["namespace"], spec):  # the controller's requeue
            if (
                fake.closed
                or fake.objects.get(key, {}).get("metadata", {}).get("generation") != meta["generation"]
            ):
                return
            time.sleep(self.requeue_s)
        url = self._serve(meta["namespace"], meta["name"], spec)
        status = {
            "conditions": [
                {k: v for k, v in condition(t, "", "").items() if v != ""}
                for t in ("ConfigurationsReady", "Ready", "RoutesReady")
            ]
            + [{k: v for k, v in condition("Stopped", "", "", status="False").items() if v != ""}],
            "url": url,
        }
        fake.replace_status(*key, status, generation=meta["generation"])

    @staticmethod
    def _resolved(fake: FakeKube, namespace: str, spec: dict[str, Any]) -> bool:
        for node in spec["nodes"].values():
            for step in node.get("steps") or []:
                if not step.get("serviceName"):
                    continue
                with fake.lock:
                    isvc = fake.objects.get((INFERENCESERVICE.plural, namespace, step["serviceName"]))
                if isvc is None:
                    return False
                if not step.get("serviceUrl"):
                    address = ((isvc.get("status") or {}).get("address") or {}).get("url")
                    if not address:
                        return False
                    step["serviceUrl"] = f"{address}/v2/models/{isvc['metadata']['name']}/infer"
        return True

    def _serve(self, namespace: str, name: str, spec: dict[str, Any]) -> str:
        picks = self.picks

        class Router(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                node = spec["nodes"]["root"]
                assert node["routerType"] == "Splitter", "the fake router plays Splitter nodes only"
                point, end, step = secrets.randbelow(100), 0, None
                for candidate in node["steps"]:
                    end += int(candidate["weight"])
                    if point < end:
                        step = candidate
                        break
                if step is None:
                    code, answer = 500, b'{"error": "no route was selected by the splitter"}'
                else:
                    picks.append(step.get("name", ""))
                    sent = urllib.request.Request(
                        step["serviceUrl"],
                        data=body,
                        headers={"Content-Type": self.headers.get("Content-Type") or "application/json"},
                    )
                    try:
                        with urllib.request.urlopen(sent, timeout=30) as response:
                            code, answer = response.status, response.read()
                    except urllib.error.HTTPError as exc:
                        code, answer = exc.code, exc.read()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Router)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        old = self.routers.pop((namespace, name), None)
        self.routers[(namespace, name)] = server
        if old is not None:
            old.shutdown()
            old.server_close()
        return f"http://127.0.0.1:{server.server_address[1]}"
