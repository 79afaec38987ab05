"""A small, faithful stand-in for the Kubernetes API server, for the custom resources the steps use.

The steps talk to it through the official ``kubernetes`` client over loopback HTTP, so requests,
paths, bodies and error handling are the real ones. What the fake keeps honest:

- every object it receives is validated against its kind's published CRD schema
  (``tests/schemas/``) and rejected with 422 ``Invalid`` and a ``Status`` body as the API server does;
- names follow the API server's rules (409 ``AlreadyExists``, 404 ``NotFound``);
- ``metadata.generation``, ``uid`` and ``creationTimestamp`` are set on create.

What an operator would do (start pods, set conditions) is played by a *controller*, a function
each test passes in: it gets the stored object and may update its status and pods from a thread.
"""

from __future__ import annotations

import json
import re
import threading
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
from kubernetes import client

SCHEMAS = Path(__file__).parent / "schemas"
RFC_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    schema_file: str

    def validator(self) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / self.schema_file).read_text())))


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


RESOURCES = [
    Resource(
        "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "kubeflow-trainjob-v1alpha1.schema.json"
    ),
    Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "kubeflow-pytorchjob-v1.schema.json"),
]

Controller = Callable[["FakeKube", dict[str, Any]], None]


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


@dataclass
class FakeKube:
    url: str = ""
    controller: Controller | None = None
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (plural, ns, name)
    pods: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    unavailable_gets: int = 0  # answer this many GETs of objects with 503, as a restarting server does
    lock: threading.Lock = field(default_factory=threading.Lock)

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration(host=self.url)
        configuration.retries = 0
        return client.ApiClient(configuration)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps(self.objects[(plural, namespace, name)]))

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

    def add_pod(
        self, name: str, labels: dict[str, str], *, exit_code: int = 0, message: str = "", waiting: str = ""
    ) -> None:
        state: dict[str, Any] = (
            {"waiting": {"reason": waiting, "message": message}}
            if waiting
            else {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Error" if exit_code else "Completed",
                    "message": message,
                }
            }
        )
        with self.lock:
            self.pods.append(
                {
                    "metadata": {"name": name, "namespace": "x", "labels": labels},
                    "status": {
                        "containerStatuses": [
                            {
                                "name": "node",
                                "ready": False,
                                "restartCount": 0,
                                "image": "i",
                                "imageID": "",
                                "state": state,
                            }
                        ]
                    },
                }
            )


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


def _handler(fake: FakeKube, validators: dict[str, tuple[Resource, jsonschema.Draft7Validator]]) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[Resource | None, str, str, str]:
            path = urlparse(self.path).path
            fake.requests.append((self.command, path))
            match = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", path)
            if not match:
                return None, "", "", path
            group, version, namespace, plural, name = match.groups()
            resource, _ = validators.get(plural, (None, None))
            if resource is None or (resource.group, resource.version) != (group, version):
                return None, "", "", path
            return resource, namespace, name or "", path

        def do_GET(self) -> None:
            parsed = urlparse(self.path)
            pods = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", parsed.path)
            if pods:
                fake.requests.append(("GET", parsed.path))
                selector = parse_qs(parsed.query).get("labelSelector", [""])[0]
                key, _, value = selector.partition("=")
                with fake.lock:
                    items = [p for p in fake.pods if p["metadata"]["labels"].get(key) == value]
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                return
            resource, namespace, name, path = self._route()
            if resource is None or not name:
                self._send(404, _status(404, "NotFound", f"the server could not find {path}"))
                return
            with fake.lock:
                unavailable = fake.unavailable_gets > 0
                fake.unavailable_gets = max(0, fake.unavailable_gets - 1)
            if unavailable:
                self._send(503, _status(503, "ServiceUnavailable", "the server is unable to handle it"))
                return
            try:
                self._send(200, fake.get(resource.plural, namespace, name))
            except KeyError:
                self._send(
                    404, _status(404, "NotFound", f'{resource.plural}.{resource.group} "{name}" not found')
                )

        def do_POST(self) -> None:
            resource, namespace, name, path = self._route()
            if resource is None or name:
                self._send(404, _status(404, "NotFound", f"the server could not find {path}"))
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            problems = [
                f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
                for error in validators[resource.plural][1].iter_errors(body)
            ]
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
            if problems:
                message = f'{resource.kind}.{resource.group} "{name}" is invalid: ' + "; ".join(problems)
                self._send(422, _status(422, "Invalid", message))
                return
            key = (resource.plural, namespace, name)
            with fake.lock:
                if key in fake.objects:
                    exists = f'{resource.plural}.{resource.group} "{name}" already exists'
                    self._send(409, _status(409, "AlreadyExists", exists))
                    return
                meta.update(namespace=namespace, generation=1, uid=str(uuid.uuid4()), creationTimestamp=now())
                fake.objects[key] = body
            self._send(201, body)
            if fake.controller is not None:
                fake.controller(fake, json.loads(json.dumps(body)))

        def do_DELETE(self) -> None:
            resource, namespace, name, path = self._route()
            with fake.lock:
                removed = fake.objects.pop((resource.plural, namespace, name), None) if resource else None
            if removed is None:
                self._send(404, _status(404, "NotFound", f"the server could not find {path}"))
                return
            self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    return Handler


@contextmanager
def fake_kube(controller: Controller | None = None) -> Iterator[FakeKube]:
    """Serve a fresh fake API server on 127.0.0.1 for the duration of the block."""
    fake = FakeKube(controller=controller)
    validators = {r.plural: (r, r.validator()) for r in RESOURCES}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake, validators))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
