"""The API calls a deploy makes for one InferenceService, retried while the API server is away.

Writes are server-side apply (``PATCH`` with ``application/apply-patch+yaml``) under the field
manager ``handoff``: each one sends everything handoff manages on the service
(:mod:`handoff.kube.isvc_manifest`), and the API server merges it into the live object, removes
what handoff applied before and leaves out now (the canary share on promotion, the rollback record
on a restore), and leaves every other manager's fields alone (KServe's finalizer, another tool's
labels and annotations). There is nothing left to diff on the client. The one ``kubernetes``
client of the pinned range (30.x) sends only merge patches from ``CustomObjectsApi``, so the apply
goes through ``ApiClient.call_api`` with its own content type, as the client's dynamic module does.

Leaving a field out removes it only if no other manager owns it too, and one that set the same
value does: ``kubectl patch`` setting ``canaryTrafficPercent: 0`` before a deploy that starts dark
at 0, or an older handoff's merge patches of the share or of its marks. The promotion's apply
would then leave the share in place and change nothing. So after each apply the client looks in
the object it got back for what handoff meant to remove (``isvc_manifest.DROPPABLE``) and removes
what is left of it with a JSON patch (the ``patch`` verb the apply needs anyway) that tests each
field still has the value the apply left: a value someone set since is not removed (the patch
fails, 422, and the deploy reads the service again, as on a conflict). A merge patch could only
guard with the ``resourceVersion``, which KServe's status writes move within moments of an apply.

A create is an apply too (one manager owns every field from the start; a POST would record them
under an ``Update`` manager whose fields a later apply cannot remove), sent without ``force``: if
another manager created the service since it was read, the values that differ conflict (409)
instead of being taken over. Every later apply is forced: a field handoff sets that someone changed
since (``kubectl edit`` of ``minReplicas``) gets handoff's value again and becomes handoff's. What
others added that handoff does not set (labels, annotations, ``tolerations``) stays theirs, and
stays; of what handoff leaves out, only the canary share and its own marks are removed. Each apply
carries the ``uid`` and ``resourceVersion`` it was decided from: a concurrent change is read
again, never overwritten, and a deleted service is not recreated. Every call is retried on
transient failures (5xx, 429, no connection).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from handoff.errors import HandoffError
from handoff.kube.client import api_error, describe, reason
from handoff.kube.isvc_manifest import FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION, leftovers, removing

APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON
JSON_PATCH = "application/json-patch+json"
MAX_API_FAILURES = 30  # transient API failures in a row before a deploy gives up
MAX_CONFLICTS = 10  # concurrent writers in a row before an update gives up

T = TypeVar("T")


def flat(text: str) -> str:
    """Any text (a response body, an API message) on one line."""
    return " ".join(text.split())


def log(message: str) -> None:
    """One line per transition, on stderr with the other step logs."""
    print(f"handoff: deploy: {flat(message)}", file=sys.stderr, flush=True)


class Conflict(Exception):
    """The object changed between reading it and writing it, or (a create) someone else's values
    are in the way: 409, the API server's optimistic lock or an apply conflict."""


class Decision(Protocol):
    """What an update decided from the object it read: the configuration to apply."""

    @property
    def config(self) -> dict[str, Any]: ...


D = TypeVar("D", bound=Decision)


class Services(Protocol):
    """What a rollout needs of a client: :class:`ServiceClient`, or an in-memory one in tests."""

    namespace: str
    name: str

    @property
    def what(self) -> str: ...

    @property
    def deployment_name(self) -> str: ...

    def say(self, message: str) -> None: ...

    def get(self) -> dict[str, Any] | None: ...

    def create(self, config: dict[str, Any]) -> dict[str, Any] | None: ...

    def update(self, decide: Callable[[dict[str, Any]], D]) -> tuple[D, dict[str, Any]]: ...

    def pods(self, selector: str) -> list[Any]: ...

    def deployment(self) -> Any | None: ...


@dataclass
class ServiceClient:
    """The calls a deploy makes for one InferenceService, retried while the API server is away."""

    # The resource it reads and applies; a subclass names another kind (an InferenceGraph).
    group: ClassVar[str] = GROUP
    version: ClassVar[str] = VERSION
    plural: ClassVar[str] = PLURAL
    kind: ClassVar[str] = KIND
    namespace: str
    name: str
    api: client.ApiClient
    retry_s: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    say: Callable[[str], None] = log
    core: client.CoreV1Api = field(init=False)
    apps: client.AppsV1Api = field(init=False)
    objects: client.CustomObjectsApi = field(init=False)

    def __post_init__(self) -> None:
        self.objects = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    @property
    def what(self) -> str:
        return describe(self.kind, self.namespace, self.name)

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
                    self.group, self.version, self.namespace, self.plural, self.name
                ),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(exc, "read", self.what) from None

    def _patch(
        self, body: Any, content_type: str, query: list[tuple[str, str]], action: str
    ) -> dict[str, Any]:
        """PATCH the service with ``body``; the object as stored. Conflict on 409, and on 422 for a
        JSON patch (a ``test`` that failed: the object changed since it was read)."""
        path = f"/apis/{self.group}/{self.version}/namespaces/{self.namespace}/{self.plural}/{self.name}"

        def send() -> dict[str, Any]:
            found: dict[str, Any] = self.api.call_api(
                path,
                "PATCH",
                query_params=query,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
            return found

        try:
            return self._retry(action, send)
        except ApiException as exc:
            if exc.status == 409 or (exc.status == 422 and content_type == JSON_PATCH):
                raise Conflict(reason(exc)) from None
            raise api_error(exc, action, self.what) from None

    def apply(self, config: dict[str, Any], *, force: bool = True, action: str = "apply") -> dict[str, Any]:
        """Server-side apply ``config`` (its ``metadata.uid`` and ``resourceVersion``, when set, are
        preconditions), then remove what it left out of ``DROPPABLE`` that another manager kept
        (the module docstring); the object as stored. Conflict on 409."""
        query = [("fieldManager", FIELD_MANAGER)] + ([("force", "true")] if force else [])
        stored = self._patch(config, APPLY_PATCH, query, action)
        paths = leftovers(config, stored)
        if not paths:
            return stored
        self.say(
            f"{self.what}: {', '.join(path[-1] for path in paths)} stayed after the apply (another "
            "field manager set it too); removing it"
        )
        manager = [("fieldManager", FIELD_MANAGER)]
        return self._patch(removing(stored, paths), JSON_PATCH, manager, "remove what the apply left")

    def create(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when someone else's service is there since it was read."""
        try:
            return self.apply(config, force=False, action="create")
        except Conflict:
            return None

    def update(self, decide: Callable[[dict[str, Any]], D]) -> tuple[D, dict[str, Any]]:
        """Read the service, ``decide`` what to apply from it, apply that as of what was read; again
        while someone else writes in between. What was decided, and the object as stored."""
        for _ in range(MAX_CONFLICTS):
            current = self.get()
            if current is None:
                raise HandoffError(f"{self.what} was deleted by someone else during the deploy")
            decision = decide(current)
            config = {**decision.config}
            read = current["metadata"]
            config["metadata"] = {
                **config["metadata"],
                "uid": read.get("uid"),
                "resourceVersion": read.get("resourceVersion"),
            }
            try:
                return decision, self.apply(config)
            except Conflict:
                self.say(f"{self.what}: changed since it was read; reading it again")
        raise HandoffError(f"{self.what} kept changing under the deploy ({MAX_CONFLICTS} conflicts in a row)")

    def delete(self) -> bool:
        """Delete the object (its controller then removes what it made); False if it was gone."""
        try:
            self._retry(
                "delete",
                lambda: self.objects.delete_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, self.name
                ),
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise api_error(exc, "delete", self.what) from None
        return True

    def pods(self, selector: str) -> list[Any]:
        """The predictor pods ``selector`` picks."""
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
