"""`handoff doctor`: what would make a cluster run fail, found before the run.

Each check is independent and ends as pass, fail (with what to do) or skip (with why it could
not be checked, e.g. a permission the caller lacks). They use the caller's own credentials, the
same ones `handoff submit` uses, and only read: discovery, namespaces, nodes, the engines'
ConfigMaps and Deployments (KFP's API server, Argo's controller), the registry's manifest endpoint
and the MLflow and pipeline servers' health endpoints; the one thing they create is
SubjectAccessReviews, which store nothing.

Access is reviewed for the account the pipeline's pods run as, not for the caller
(``handoff.doctor_access``); the engines' checks (Argo's executor security context and image,
artifact repositories, KFP's mode, version and pipeline root) are in ``handoff.doctor_engines``;
every check reports a ``handoff.doctor_findings.Finding``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator

import requests
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from handoff import doctor_engines as engines
from handoff.doctor_access import check_access
from handoff.doctor_engines import KfpServer, Locations, kfp_healthz
from handoff.doctor_findings import HTTP_TIMEOUT_S, Finding, Get, check_health
from handoff.errors import HandoffError
from handoff.kube.client import api_client, reason
from handoff.kube.pod_security import ENFORCE_LABEL
from handoff.project import Project

__all__ = ["Finding", "check_cluster", "check_image", "check_mlflow_artifacts", "run_doctor"]

GPU = "nvidia.com/gpu"
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


def check_cluster(
    project: Project,
    api: client.ApiClient,
    where: Locations | None = None,
    kfp_server: KfpServer | None = None,
) -> Iterator[Finding]:
    """The checks that need the API server; all are skipped when it cannot be reached."""
    where = where or Locations()
    try:
        server = client.VersionApi(api).get_code()
    except (ApiException, OSError, ValueError) as exc:
        detail = reason(exc) if isinstance(exc, ApiException) else str(exc)
        yield Finding("api server", "fail", f"cannot reach {api.configuration.host}: {detail}")
        return
    yield Finding("api server", "pass", f"{api.configuration.host} (Kubernetes {server.git_version})")
    namespace, labels = check_namespace(project, api)
    yield namespace
    orchestrator = project.settings.orchestrator
    on_kfp = orchestrator in ("kfp", "both")
    try:  # KFP's mode says where its pods run, which the access check needs
        mode = engines.resolve_kfp_mode(api, where, kfp_server or KfpServer()) if on_kfp else None
    except ApiException as exc:
        mode = engines.KfpMode(None, f"reading KFP's mode: {reason(exc)}", project.settings.namespace)
    kfp_pods_in = (mode.pods_in or project.settings.namespace) if mode else None
    # The pipeline root where KFP runs the pods says whether its launcher reads KFP's MinIO
    # Secret, a call the access check reviews too.
    kfp_root = functools.cache(lambda runs_in: engines.kfp_pipeline_root(api, runs_in))

    def access() -> Finding:
        minio_secret = kfp_pods_in is not None and kfp_root(kfp_pods_in).reads_minio_secret
        return check_access(project, api, kfp_pods_in, minio_secret=minio_secret)

    checks: list[tuple[str, Callable[[], Iterator[Finding] | Finding]]] = [
        ("api", lambda: check_apis(project, api)),
        ("access", access),
        ("gpus", lambda: check_gpus(project, api)),
    ]
    if orchestrator in ("argo", "both"):
        argo = functools.cache(lambda: engines.controller_config(api, *where.argo_config))
        checks += [
            ("argo executor", lambda: engines.check_argo_executor(project, argo(), labels)),
            ("argo artifacts", lambda: engines.check_argo_artifacts(project, api, argo())),
        ]
    if mode is not None and kfp_pods_in is not None:
        runs_in = kfp_pods_in
        checks += [
            ("kfp mode", lambda: engines.check_kfp_mode(project, mode, labels)),
            ("kfp executor", lambda: _kfp_executor(api, where, runs_in, project, labels)),
            ("kfp artifacts", lambda: engines.check_kfp_artifacts(kfp_root(runs_in))),
        ]
    for name, run in checks:
        try:
            found = run()
            yield from ([found] if isinstance(found, Finding) else list(found))
        except ApiException as exc:  # an answer no check expects: report it, go on with the rest
            yield Finding(name, "fail", reason(exc))


def _kfp_executor(
    api: client.ApiClient, where: Locations, runs_in: str, project: Project, labels: dict[str, str] | None
) -> Finding:
    """KFP's executor, held to the Pod Security level of the namespace KFP runs the pods in: its
    own when single-user, the project's when multi-user."""
    config = engines.controller_config(api, *where.kfp_argo_config)
    if runs_in != project.settings.namespace:
        labels = engines.namespace_labels(api, runs_in)
    return engines.check_kfp_executor(api, config, runs_in, labels)


def check_namespace(project: Project, api: client.ApiClient) -> tuple[Finding, dict[str, str] | None]:
    """The namespace line, and the namespace's labels (None when it could not be read)."""
    namespace = project.settings.namespace
    try:
        found = client.CoreV1Api(api).read_namespace(namespace)
    except ApiException as exc:
        if exc.status == 404:
            detail = (
                f"namespace {namespace!r} (handoff.yaml namespace) does not exist: create it with "
                "`kubectl apply -k manifests/overlays/<env>`"
            )
            return Finding("namespace", "fail", detail), None
        if exc.status == 403:
            detail = f"not allowed to read namespace {namespace!r}: {reason(exc)}"
            return Finding("namespace", "skip", detail), None
        return Finding("namespace", "fail", f"reading namespace {namespace!r}: {reason(exc)}"), None
    labels = dict(found.metadata.labels or {})
    enforce = labels.get(ENFORCE_LABEL, "not set")
    return Finding("namespace", "pass", f"{namespace} (Pod Security enforce: {enforce})"), labels


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


def check_image(image: str, get: Get = requests.get) -> Finding:
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


def anonymous_token(challenge: str, get: Get) -> str | None:
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


def check_mlflow(project: Project, get: Get = requests.get) -> Finding:
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


def check_mlflow_artifacts(project: Project, get: Get = requests.get) -> Finding:
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


def check_pipeline_servers(project: Project, get: Get, kfp: Finding | None = None) -> Iterator[Finding]:
    cluster, orchestrator = project.settings.cluster, project.settings.orchestrator
    if orchestrator in ("kfp", "both"):
        if kfp is not None:
            yield kfp
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
    get: Get = requests.get,
    where: Locations | None = None,
) -> list[Finding]:
    """Every check, in the order a person would fix them."""
    findings: list[Finding] = []
    kfp, kfp_server = None, KfpServer()
    endpoint = project.settings.cluster.kfp_endpoint
    if endpoint and project.settings.orchestrator in ("kfp", "both"):
        kfp, kfp_server = kfp_healthz(endpoint, get)  # its mode is one of the cluster's checks
    try:
        api = connect()
    except HandoffError as exc:
        findings.append(Finding("api server", "fail", str(exc)))
    else:
        findings.extend(check_cluster(project, api, where, kfp_server))
    findings.append(check_image(project.settings.image, get))
    mlflow = check_mlflow(project, get)
    findings.append(mlflow)
    if mlflow.outcome == "pass":  # the server answers: ask it where it keeps artifacts
        findings.append(check_mlflow_artifacts(project, get))
    findings.extend(check_pipeline_servers(project, get, kfp))
    return findings
