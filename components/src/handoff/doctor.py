"""`handoff doctor`: what would make a cluster run fail, found before the run.

Each check is independent and ends as pass, fail (with what to do) or skip (with why it could
not be checked, e.g. a permission the caller lacks). They use the caller's own credentials, the
same ones `handoff submit` uses, and only read: discovery, namespaces, nodes, access reviews,
the registry's manifest endpoint and the MLflow and pipeline servers' health endpoints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import requests
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from handoff.errors import HandoffError
from handoff.kube.client import api_client, reason
from handoff.project import Project

Outcome = Literal["pass", "fail", "skip"]
HTTP_TIMEOUT_S = 10
GPU = "nvidia.com/gpu"
# What the pipeline's steps do in the namespace (the Role in manifests/ grants exactly this).
INFERENCE_SERVICE_VERBS = ("get", "list", "watch", "create", "patch")
JOB_VERBS = ("get", "list", "watch", "create", "delete")
# The manifest media types a registry may answer with for a tag (single image or multi-platform).
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
# registry/repository[:tag][@digest]; whether the first part is a registry is decided below.
IMAGE = re.compile(
    r"^(?:(?P<registry>[^/]+)/)?(?P<repository>[^:@]+)(?::(?P<tag>[^@/]+))?(?:@(?P<digest>.+))?$"
)


@dataclass(frozen=True)
class Finding:
    check: str
    outcome: Outcome
    detail: str


@dataclass(frozen=True)
class ApiRule:
    """One verb on one resource, as a SelfSubjectAccessReview asks it."""

    group: str
    resource: str
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}{'.' + self.group if self.group else ''}"


def needed_rules(project: Project) -> list[ApiRule]:
    """The namespace permissions the steps use for this project's settings."""
    rules = [ApiRule("serving.kserve.io", "inferenceservices", v) for v in INFERENCE_SERVICE_VERBS]
    rules += [ApiRule("", "pods", v) for v in ("get", "list", "watch")]
    training = project.settings.training
    if training.distributed_job:
        group, plural = (
            ("trainer.kubeflow.org", "trainjobs")
            if training.job.api == "trainjob"
            else ("kubeflow.org", "pytorchjobs")
        )
        rules += [ApiRule(group, plural, v) for v in JOB_VERBS]
    return rules


def needed_apis(project: Project) -> list[tuple[str, str]]:
    """(group/version, plural) of each custom resource the project's runs create."""
    apis = [("serving.kserve.io/v1beta1", "inferenceservices")]
    if project.settings.orchestrator in ("argo", "both"):
        apis += [("argoproj.io/v1alpha1", "workflows"), ("argoproj.io/v1alpha1", "workflowtemplates")]
    training = project.settings.training
    if training.distributed_job:
        apis.append(
            ("trainer.kubeflow.org/v1alpha1", "trainjobs")
            if training.job.api == "trainjob"
            else ("kubeflow.org/v1", "pytorchjobs")
        )
    return apis


def check_cluster(project: Project, api: client.ApiClient) -> Iterator[Finding]:
    """The checks that need the API server; all are skipped when it cannot be reached."""
    try:
        server = client.VersionApi(api).get_code()
    except (ApiException, OSError, ValueError) as exc:
        detail = reason(exc) if isinstance(exc, ApiException) else str(exc)
        yield Finding("api server", "fail", f"cannot reach {api.configuration.host}: {detail}")
        return
    yield Finding("api server", "pass", f"{api.configuration.host} (Kubernetes {server.git_version})")
    checks: list[tuple[str, Callable[[], Iterator[Finding] | Finding]]] = [
        ("namespace", lambda: check_namespace(project, api)),
        ("api", lambda: check_apis(project, api)),
        ("access", lambda: check_access(project, api)),
        ("gpus", lambda: check_gpus(project, api)),
    ]
    for name, run in checks:
        try:
            found = run()
            yield from ([found] if isinstance(found, Finding) else list(found))
        except ApiException as exc:  # an answer no check expects: report it, go on with the rest
            yield Finding(name, "fail", reason(exc))


def check_namespace(project: Project, api: client.ApiClient) -> Finding:
    namespace = project.settings.namespace
    try:
        found = client.CoreV1Api(api).read_namespace(namespace)
    except ApiException as exc:
        if exc.status == 404:
            return Finding(
                "namespace",
                "fail",
                f"namespace {namespace!r} (handoff.yaml namespace) does not exist: create it with "
                "`kubectl apply -k manifests/overlays/<env>`",
            )
        if exc.status == 403:
            return Finding("namespace", "skip", f"not allowed to read namespace {namespace!r}: {reason(exc)}")
        return Finding("namespace", "fail", f"reading namespace {namespace!r}: {reason(exc)}")
    enforce = (found.metadata.labels or {}).get("pod-security.kubernetes.io/enforce", "not set")
    return Finding("namespace", "pass", f"{namespace} (Pod Security enforce: {enforce})")


def check_apis(project: Project, api: client.ApiClient) -> Iterator[Finding]:
    """Discovery (readable by every authenticated user) says which custom resources are served."""
    served: dict[str, set[str] | None] = {}
    for group_version, plural in needed_apis(project):
        if group_version not in served:
            served[group_version] = discovered(api, group_version)
        resources = served[group_version]
        check = f"api {plural}.{group_version.split('/')[0]}"
        if resources is not None and plural in resources:
            yield Finding(check, "pass", f"{group_version} serves {plural}")
        else:
            yield Finding(
                check,
                "fail",
                f"{group_version} {plural} is not served: install its operator (CRD) in the cluster",
            )


def discovered(api: client.ApiClient, group_version: str) -> set[str] | None:
    try:
        body, _, _ = api.call_api(
            f"/apis/{group_version}", "GET", response_type="object", auth_settings=["BearerToken"]
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {r["name"] for r in body.get("resources", [])}


def check_access(project: Project, api: client.ApiClient) -> Finding:
    namespace = project.settings.namespace
    authorization = client.AuthorizationV1Api(api)
    denied = []
    for rule in needed_rules(project):
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, group=rule.group, resource=rule.resource, verb=rule.verb
                )
            )
        )
        answer = authorization.create_self_subject_access_review(review)
        if not answer.status.allowed:
            denied.append(str(rule))
    if denied:
        return Finding(
            "access",
            "fail",
            f"in {namespace} you may not: {', '.join(denied)}; grant them with the Role in manifests/base",
        )
    return Finding(
        "access", "pass", f"the steps' {len(needed_rules(project))} verbs are allowed in {namespace}"
    )


def check_gpus(project: Project, api: client.ApiClient) -> Finding:
    training = project.settings.training
    if not training.gpus:
        return Finding("gpus", "skip", "training.gpus is 0: nothing to check")
    selector = ",".join(f"{k}={v}" for k, v in sorted(training.node_selector.items())) or None
    try:
        nodes = client.CoreV1Api(api).list_node(label_selector=selector).items
    except ApiException as exc:
        return Finding("gpus", "skip", f"cannot list nodes ({reason(exc)}): ask the cluster admin")
    fitting = [
        n.metadata.name
        for n in nodes
        if int((n.status.allocatable or {}).get(GPU, "0")) >= training.gpus and not n.spec.unschedulable
    ]
    where = f"nodes matching {selector}" if selector else "nodes"
    if len(fitting) < training.nodes:
        return Finding(
            "gpus",
            "fail",
            f"training needs {training.nodes} node(s) with {training.gpus} allocatable {GPU} each; "
            f"{len(fitting)} of {len(nodes)} {where} have that",
        )
    return Finding(
        "gpus", "pass", f"{len(fitting)} {where} with ≥ {training.gpus} {GPU}: {', '.join(fitting)}"
    )


def check_image(image: str, get: Callable[..., requests.Response] = requests.get) -> Finding:
    """Is the image's manifest in its registry (anonymous, or with the registry's bearer token dance)?"""
    match = IMAGE.match(image)
    if not match:
        return Finding("image", "fail", f"{image!r} (handoff.yaml image) is not an image reference")
    registry, repository = match["registry"], match["repository"]
    if not registry or ("." not in registry and ":" not in registry and registry != "localhost"):
        registry, repository = "registry-1.docker.io", "/".join(filter(None, [match["registry"], repository]))
    ref = match["digest"] or match["tag"] or "latest"
    local = registry.split(":")[0] in ("localhost", "127.0.0.1") or registry.startswith("[::1]")
    url = f"{'http' if local else 'https'}://{registry}/v2/{repository}/manifests/{ref}"
    headers = {"Accept": MANIFEST_TYPES}
    try:
        answer = get(url, headers=headers, timeout=HTTP_TIMEOUT_S)
        if answer.status_code == 401 and "bearer" in answer.headers.get("WWW-Authenticate", "").lower():
            token = anonymous_token(answer.headers["WWW-Authenticate"], get)
            if token:
                answer = get(
                    url, headers={**headers, "Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S
                )
    except requests.RequestException as exc:
        return Finding("image", "fail", f"cannot reach registry {registry}: {exc}")
    if answer.status_code == 200:
        digest = answer.headers.get("Docker-Content-Digest", "digest not given")
        return Finding("image", "pass", f"{image} ({digest})")
    if answer.status_code == 404:
        return Finding("image", "fail", f"{image} is not in {registry}: build and push it (`make image`)")
    if answer.status_code in (401, 403):
        return Finding(
            "image",
            "skip",
            f"{registry} needs credentials to read {repository}; the cluster's pull secret may have them",
        )
    return Finding("image", "fail", f"{registry} answered HTTP {answer.status_code} for {url}")


def anonymous_token(challenge: str, get: Callable[..., requests.Response]) -> str | None:
    """The token a registry's ``WWW-Authenticate: Bearer realm=…,service=…,scope=…`` offers."""
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", None)
    if not realm:
        return None
    answer = get(realm, params=params, timeout=HTTP_TIMEOUT_S)
    if answer.status_code != 200:
        return None
    body = answer.json()
    token = body.get("token") or body.get("access_token")
    return str(token) if token else None


def check_mlflow(project: Project, get: Callable[..., requests.Response] = requests.get) -> Finding:
    """The pods need an MLflow server: a sqlite file on this machine is out of their reach."""
    settings = project.settings
    uri = settings.cluster.mlflow_tracking_uri or settings.mlflow.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return Finding(
            "mlflow",
            "fail",
            f"{uri} is local to this machine; pipeline pods need an MLflow server: set "
            "cluster.mlflow_tracking_uri in handoff.yaml",
        )
    return check_health("mlflow", f"{uri.rstrip('/')}/health", get)


def check_mlflow_artifacts(project: Project, get: Callable[..., requests.Response] = requests.get) -> Finding:
    """Where the tracking server keeps the experiment's artifacts: KServe must fetch models there.

    Asked over MLflow's REST API with one request, as the health check (MLflow's own client would
    retry an unreachable server for minutes).
    """
    from handoff.artifact_store import SERVER_FIX, kserve_readable

    uri = str(project.settings.cluster.mlflow_tracking_uri).rstrip("/")
    name = project.settings.mlflow.experiment
    url = f"{uri}/api/2.0/mlflow/experiments/get-by-name"
    try:
        answer = get(url, params={"experiment_name": name}, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        return Finding("mlflow artifacts", "fail", f"cannot reach {url}: {exc}")
    if answer.status_code == 404:
        return Finding(
            "mlflow artifacts",
            "skip",
            f"experiment {name!r} does not exist on {uri} yet; the pipeline's first step checks where "
            "the server puts its artifacts",
        )
    if answer.status_code >= 400:
        return Finding(
            "mlflow artifacts", "fail", f"{url} answered HTTP {answer.status_code}: {answer.text[:300]}"
        )
    location = str(answer.json()["experiment"]["artifact_location"])
    if kserve_readable(location):
        return Finding("mlflow artifacts", "pass", f"experiment {name!r} keeps its artifacts at {location}")
    return Finding(
        "mlflow artifacts",
        "fail",
        f"experiment {name!r} keeps its artifacts at {location}, where KServe's storage initializer "
        f"cannot download models from: {SERVER_FIX}",
    )


def check_health(check: str, url: str, get: Callable[..., requests.Response]) -> Finding:
    try:
        answer = get(url, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        return Finding(check, "fail", f"cannot reach {url}: {exc}")
    if answer.status_code >= 400:
        return Finding(check, "fail", f"{url} answered HTTP {answer.status_code}")
    return Finding(check, "pass", f"{url} answered HTTP {answer.status_code}")


def check_pipeline_servers(project: Project, get: Callable[..., requests.Response]) -> Iterator[Finding]:
    cluster, orchestrator = project.settings.cluster, project.settings.orchestrator
    if orchestrator in ("kfp", "both"):
        if cluster.kfp_endpoint:
            yield check_health("kfp", f"{cluster.kfp_endpoint.rstrip('/')}/apis/v2beta1/healthz", get)
        else:
            yield Finding("kfp", "skip", "cluster.kfp_endpoint is not set: `handoff submit` cannot reach KFP")
    if orchestrator in ("argo", "both"):
        if cluster.argo_server:
            yield check_health("argo", f"{cluster.argo_server.rstrip('/')}/api/v1/version", get)
        else:
            yield Finding(
                "argo", "skip", "cluster.argo_server is not set: `handoff submit` cannot reach Argo"
            )


def run_doctor(
    project: Project,
    connect: Callable[[], client.ApiClient] = api_client,
    get: Callable[..., requests.Response] = requests.get,
) -> list[Finding]:
    """Every check, in the order a person would fix them."""
    findings: list[Finding] = []
    try:
        api = connect()
    except HandoffError as exc:
        findings.append(Finding("api server", "fail", str(exc)))
    else:
        findings.extend(check_cluster(project, api))
    findings.append(check_image(project.settings.image, get))
    mlflow = check_mlflow(project, get)
    findings.append(mlflow)
    if mlflow.outcome == "pass":  # the server answers: ask it where it keeps artifacts
        findings.append(check_mlflow_artifacts(project, get))
    findings.extend(check_pipeline_servers(project, get))
    return findings
