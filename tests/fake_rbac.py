"""Authorization for the fake API server, as kube-apiserver's RBAC authorizer decides it.

Every request the fake answers is first authorized for ``FakeKube.caller`` against the Roles,
RoleBindings, ClusterRoles and ClusterRoleBindings stored in ``FakeKube.rbac``, and refused with
the API server's 403 ``Forbidden`` Status when nothing allows it; SubjectAccessReviews (what
``handoff doctor`` sends) are answered by the same evaluation. The default caller is in
``system:masters``, which the API server allows everything (its privileged-group authorizer runs
before RBAC), so tests that do not care about authorization see no difference.

Read from kubernetes/kubernetes (master as of 2026; behaviour stable since 1.14):
- ``staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go``: the request's verb,
  group, resource, subresource, namespace and name from its method and path (GET without a name is
  ``list``, or ``watch`` with ``?watch=true``; discovery paths are non-resource requests);
- ``plugin/pkg/auth/authorizer/rbac/rbac.go`` (``RuleAllows``) and
  ``pkg/apis/rbac/v1/evaluation_helpers.go`` (verb, group, resource, ``*/subresource``,
  resourceNames and non-resource URL matching);
- ``pkg/registry/rbac/validation/rule.go`` (``VisitRulesFor``: every ClusterRoleBinding, then the
  RoleBindings of the request's namespace; ``appliesToUser``: a ServiceAccount subject without a
  namespace means the binding's; a binding to a missing role grants nothing);
- ``plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go``: the default ClusterRoles and
  bindings that bear on these tests (cluster-admin for ``system:masters``, discovery for
  ``system:authenticated``, public-info-viewer for everyone);
- ``staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go`` and
  apimachinery's ``NewForbidden``: the 403 message;
- ``pkg/registry/authorization/subjectaccessreview/rest.go``: a SubjectAccessReview evaluates
  exactly the user and groups it names (none are added).

Left out, as nothing here sends them: SelfSubjectAccessReviews, non-resource reviews, the
reasons RBAC gives with its decisions, and the validation of a review's spec.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

Obj = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
NAMESPACE_SUBRESOURCES = {"status", "finalize"}


@dataclass(frozen=True)
class User:
    """Who a request is from, as the authenticator hands it to the authorizer."""

    name: str
    groups: tuple[str, ...] = (AUTHENTICATED,)


CLUSTER_ADMIN = User("kubernetes-admin", (MASTERS, AUTHENTICATED))


def service_account(namespace: str, name: str) -> User:
    """The user a ServiceAccount token authenticates as (with the groups the authenticator adds)."""
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
    )


@dataclass(frozen=True)
class Attributes:
    """What is asked: a verb on a resource (namespaced or not), or on a non-resource path."""

    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    @property
    def resource_request(self) -> bool:
        return bool(self.resource)


def request_attributes(method: str, path: str, query: str = "") -> Attributes:
    """requestinfo.go's ``NewRequestInfo`` for the prefixes the API server serves (api, apis)."""
    parts = [p for p in path.strip("/").split("/") if p]
    non_resource = Attributes(verb=method.lower(), path=path)
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return non_resource
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix == "apis":
        if len(parts) < 3:
            return non_resource
        group, parts = parts[0], parts[1:]
    parts = parts[1:]  # the version
    verb = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch"}.get(
        method, "delete" if method == "DELETE" else ""
    )
    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
            parts = parts[2:]
    resource = parts[0]
    name = parts[1] if len(parts) > 1 else ""
    subresource = parts[2] if len(parts) > 2 else ""
    if not name and verb == "get":
        watch = parse_qs(query).get("watch", [])
        verb = "watch" if watch and watch[0].lower() not in ("false", "0") else "list"
    return Attributes(verb, group, resource, subresource, namespace, name, path)


def _rule_allows(rule: Obj, asked: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and asked.verb not in verbs:
        return False
    if not asked.resource_request:
        return any(
            url == "*" or url == asked.path or (url.endswith("*") and asked.path.startswith(url.rstrip("*")))
            for url in rule.get("nonResourceURLs") or []
        )
    groups = rule.get("apiGroups") or []
    if "*" not in groups and asked.group not in groups:
        return False
    combined = f"{asked.resource}/{asked.subresource}" if asked.subresource else asked.resource
    resources = rule.get("resources") or []
    if not any(
        r in ("*", combined) or (asked.subresource and r == f"*/{asked.subresource}") for r in resources
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or asked.name in names


def _applies(user: User, subject: Obj, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return user.name == name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and user.name == f"system:serviceaccount:{namespace}:{name}"
    return False


def _cluster_role(name: str, rules: list[Obj]) -> Obj:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": rules,
    }


def _cluster_binding(name: str, groups: list[str]) -> Obj:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups],
    }


def bootstrap_policy() -> list[Obj]:
    """The default ClusterRoles and ClusterRoleBindings that bear on what tests ask (policy.go)."""
    info = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
    discovery = ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*"]
    discovery += ["/readyz", "/version", "/version/"]
    return [
        _cluster_role(
            "cluster-admin",
            [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ],
        ),
        _cluster_binding("cluster-admin", [MASTERS]),
        _cluster_role("system:discovery", [{"nonResourceURLs": discovery, "verbs": ["get"]}]),
        _cluster_binding("system:discovery", [AUTHENTICATED]),
        _cluster_role("system:public-info-viewer", [{"nonResourceURLs": info, "verbs": ["get"]}]),
        _cluster_binding("system:public-info-viewer", [AUTHENTICATED, UNAUTHENTICATED]),
    ]


@dataclass
class Rbac:
    """The RBAC objects the fake stores, and the decisions they make."""

    roles: dict[tuple[str, str], Obj] = field(default_factory=dict)  # (namespace, name)
    role_bindings: dict[tuple[str, str], Obj] = field(default_factory=dict)
    cluster_roles: dict[str, Obj] = field(default_factory=dict)
    cluster_role_bindings: dict[str, Obj] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for obj in bootstrap_policy():
            self.apply(obj)

    def apply(self, obj: Obj) -> bool:
        """Store an RBAC object (create or replace, as ``kubectl apply``); False for other kinds."""
        kind, meta = obj.get("kind"), obj.get("metadata") or {}
        if obj.get("apiVersion") != f"{RBAC_GROUP}/v1" or kind not in (
            "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
        ):  # fmt: skip
            return False
        stored, name = copy.deepcopy(obj), meta["name"]
        if kind in ("Role", "RoleBinding"):
            namespace = meta.get("namespace")
            assert namespace, f"{kind} {name} has no metadata.namespace: render it for a namespace first"
            (self.roles if kind == "Role" else self.role_bindings)[(namespace, name)] = stored
        else:
            (self.cluster_roles if kind == "ClusterRole" else self.cluster_role_bindings)[name] = stored
        return True

    def _rules(self, ref: Obj, namespace: str) -> list[Obj]:
        if ref.get("kind") == "Role":
            role = self.roles.get((namespace, ref["name"]))
        elif ref.get("kind") == "ClusterRole":
            role = self.cluster_roles.get(ref["name"])
        else:
            role = None
        return (role.get("rules") or []) if role is not None else []

    def authorize(self, user: User, asked: Attributes) -> bool:
        """The privileged group first, then RBAC's visit of the bindings."""
        if MASTERS in user.groups:
            return True
        bindings = [("", b) for b in self.cluster_role_bindings.values()]
        if asked.namespace:
            bindings += [(ns, b) for (ns, _), b in self.role_bindings.items() if ns == asked.namespace]
        return any(
            any(_applies(user, s, namespace) for s in binding.get("subjects") or [])
            and any(_rule_allows(rule, asked) for rule in self._rules(binding["roleRef"], namespace))
            for namespace, binding in bindings
        )


def forbidden(user: User, asked: Attributes) -> Obj:
    """The 403 Status the API server answers a request its authorizers did not allow."""
    if not asked.resource_request:
        message = f'forbidden: User "{user.name}" cannot {asked.verb} path "{asked.path}"'
    else:
        resource = f"{asked.resource}/{asked.subresource}" if asked.subresource else asked.resource
        scope = f'in the namespace "{asked.namespace}"' if asked.namespace else "at the cluster scope"
        denial = f'User "{user.name}" cannot {asked.verb} resource "{resource}" in API group "{asked.group}"'
        denial += f" {scope}"
        qualified = f"{asked.resource}.{asked.group}" if asked.group else asked.resource
        named = f'{qualified} "{asked.name}"' if asked.name else qualified
        message = f"{named} is forbidden: {denial}"
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Forbidden",
        "details": {"name": asked.name, "group": asked.group, "kind": asked.resource},
        "code": 403,
    }


REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


def review(rbac: Rbac, body: Obj) -> Obj:
    """A SubjectAccessReview, answered for the user and groups it names: the created review with
    its ``status``."""
    spec = body.get("spec") or {}
    user = User(spec.get("user") or "", tuple(spec.get("groups") or ()))
    resource = spec.get("resourceAttributes") or {}
    asked = Attributes(
        verb=resource.get("verb", ""),
        group=resource.get("group", ""),
        resource=resource.get("resource", ""),
        subresource=resource.get("subresource", ""),
        namespace=resource.get("namespace", ""),
        name=resource.get("name", ""),
    )
    answer = {**copy.deepcopy(body), "status": {"allowed": rbac.authorize(user, asked)}}
    answer.setdefault("metadata", {})
    return answer


def authorizing(handler: type, fake: Any) -> type:
    """``handler`` (the fake API server's) with every request authorized for ``fake.caller`` first,
    and the access reviews answered, as the API server's filters and authorization API do."""

    class Authorizing(handler):  # type: ignore[valid-type, misc]
        def _authorized(self) -> bool:
            parsed = urlparse(self.path)
            asked = request_attributes(self.command, parsed.path, parsed.query)
            with fake.lock:
                allowed = fake.rbac.authorize(fake.caller, asked)
            if not allowed:
                self._send(403, forbidden(fake.caller, asked))
            return allowed

        def do_GET(self) -> None:
            if self._authorized():
                super().do_GET()

        def do_POST(self) -> None:
            if not self._authorized():
                return
            if urlparse(self.path).path != REVIEWS:
                super().do_POST()
                return
            with fake.lock:
                answer = review(fake.rbac, self._body())
            self._send(201, answer)

        def do_PATCH(self) -> None:
            if self._authorized():
                super().do_PATCH()

        def do_DELETE(self) -> None:
            if self._authorized():
                super().do_DELETE()

    return Authorizing
