"""`handoff doctor`: each thing that would fail a cluster run is found, and says what to do.

The Kubernetes API is the fake API server (namespaces, discovery, nodes, ConfigMaps and
Deployments as the real one answers them, through the official client), which authorizes every
request and answers access reviews as the API server's RBAC authorizer does (tests/fake_rbac.py),
from the RBAC objects applied to it: the real manifests/ rendered by kustomize. MLflow is the real
tracking server's app; the image registry speaks the registry API's manifest and bearer-token
endpoints; KFP's healthz answers as KFP 2.17's API server does; Argo is the same fake `handoff
submit` is tested against. Argo's controller settings are ConfigMaps in the shapes Argo v4.1 reads
(one key per setting, or the one `config` key argo-helm writes), its controller a Deployment as
KFP 2.17's manifests make it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from mlflow.tracking import MlflowClient

from handoff.doctor import Finding, check_cluster, check_image, run_doctor
from handoff.doctor_access import needed_rules
from handoff.doctor_engines import ARGO_POD_CONTEXT, KfpServer, Locations, kfp_healthz
from handoff.errors import HandoffError
from handoff.project import Project

from .conftest import TEMPLATE, build, edit_yaml, handoff
from .fake_kube import FakeKube, fake_kube
from .fake_pipeline_apis import fake_argo
from .fake_rbac import CLUSTER_ADMIN, RBAC_GROUP, User, service_account

pytestmark = pytest.mark.unit

GPU_POOL = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
DIGEST = "sha256:" + "ab" * 32
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
PROFILE = {"pipelines.kubeflow.org/enabled": "true"}  # what Kubeflow's Profile controller sets
ACCOUNT = "system:serviceaccount:ml-models:handoff-pipeline"
ROLE = "the Role in manifests/base/rbac-pipeline.yaml (`kubectl apply -k manifests/overlays/<env>`)"
# The executor setting KFP 2.17 ships for its own Argo (manifests/kustomize/third-party/argo/base/
# workflow-controller-configmap-patch.yaml): admitted by Pod Security restricted.
RESTRICTED_EXECUTOR = """\
imagePullPolicy: IfNotPresent
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  allowPrivilegeEscalation: false
  capabilities:
    drop:
      - ALL
  seccompProfile:
    type: RuntimeDefault
"""
HELM_CONFIG_MAP = "argo-workflows-workflow-controller-configmap"  # argo-helm, release "argo-workflows"
S3_REPOSITORY = """\
archiveLogs: true
s3:
  bucket: ml-artifacts
  endpoint: seaweedfs.storage.svc:8333
  accessKeySecret: {name: argo-s3, key: accesskey}
  secretKeySecret: {name: argo-s3, key: secretkey}
"""


# --- the cluster's objects ----------------------------------------------------------------------


@functools.cache
def _rendered(files: tuple[str, ...], namespace: str) -> tuple[dict[str, Any], ...]:
    """manifests/ files as an overlay for ``namespace`` renders them (kustomize's namespace fills
    the RoleBindings' ServiceAccount subjects too)."""
    with tempfile.TemporaryDirectory() as folder:
        names = []
        for file in files:
            shutil.copy(TEMPLATE / file, Path(folder) / Path(file).name)
            names.append(Path(file).name)
        (Path(folder) / "kustomization.yaml").write_text(
            yaml.safe_dump({"namespace": namespace, "resources": names})
        )
        return tuple(build(Path(folder)))


def rendered(files: tuple[str, ...], namespace: str) -> list[dict[str, Any]]:
    """A fresh copy of what ``_rendered`` built once, safe to edit."""
    return copy.deepcopy(list(_rendered(files, namespace)))


def pipeline_rbac(project: Project, *, kfp: bool = True) -> list[dict[str, Any]]:
    """The pipeline account's Role and RoleBinding from manifests/, for the project's namespace."""
    files = ("manifests/base/rbac-pipeline.yaml",)
    if kfp:
        files += ("manifests/components/kfp/rbac-kfp-launcher.yaml",)
    objects = rendered(files, project.settings.namespace)
    accounts = {s["name"] for o in objects if o["kind"] == "RoleBinding" for s in o["subjects"]}
    assert accounts == {project.settings.cluster.service_account}
    return objects


def config_map(
    namespace: str, name: str, data: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def controller_settings(namespace: str, **settings: str) -> dict[str, Any]:
    """Argo's workflow-controller-configmap, one key per setting (Argo's documented form)."""
    return config_map(namespace, "workflow-controller-configmap", settings)


def helm_config(namespace: str, **settings: str) -> dict[str, Any]:
    """The controller's ConfigMap as argo-helm's charts/argo-workflows writes it: one `config` key
    (named after the release: `<release>-workflow-controller-configmap`)."""
    config = "".join(
        f"{key}:\n" + "".join(f"  {line}\n" for line in value.splitlines()) for key, value in settings.items()
    )
    return config_map(namespace, HELM_CONFIG_MAP, {"config": config or "{}\n"})


def artifact_repositories(namespace: str, key: str = "default-v1", **data: str) -> dict[str, Any]:
    annotations = {"workflows.argoproj.io/default-artifact-repository": key}
    return config_map(namespace, "artifact-repositories", data or {key: S3_REPOSITORY}, annotations)


def cluster_role_binding(name: str, role: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "User", "name": user}],
    }


def namespace_reader(namespace: str, user: str) -> list[dict[str, Any]]:
    """A developer who may read and write in ``namespace`` only (no cluster-wide rights)."""
    role = {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "Role",
        "metadata": {"name": "developer", "namespace": namespace},
        "rules": [
            {"apiGroups": [""], "resources": ["namespaces", "configmaps", "pods"], "verbs": ["get", "list"]},
            {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["*"]},
        ],
    }
    binding = {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "developer", "namespace": namespace},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role", "name": "developer"},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "User", "name": user}],
    }
    return [role, binding]


def workflow_controller(namespace: str, *args: str) -> dict[str, Any]:
    """Argo's controller Deployment as KFP 2.17.0's manifests patch it (manifests/kustomize/
    third-party/argo/base/workflow-controller-deployment-patch.yaml), with ``args`` after
    ``--configmap``."""
    container = {
        "name": "workflow-controller",
        "image": "quay.io/argoproj/workflow-controller:v4.0.5",
        "command": ["workflow-controller"],
        "args": ["--configmap", "workflow-controller-configmap", *args],
    }
    labels = {"app": "workflow-controller"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "workflow-controller", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def kfp_deployment(namespace: str, config: str) -> dict[str, Any]:
    """KFP's API server as the multi-user install patches it: MULTIUSER from an envFrom ConfigMap."""
    container = {
        "name": "ml-pipeline-api-server",
        "image": "ghcr.io/kubeflow/kfp-api-server:2.17.0",
        "envFrom": [{"configMapRef": {"name": config}}],
        "env": [{"name": "KUBEFLOW_USERID_HEADER", "value": "kubeflow-userid"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "ml-pipeline", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "ml-pipeline"}},
            "template": {"metadata": {"labels": {"app": "ml-pipeline"}}, "spec": {"containers": [container]}},
        },
    }


def healthy_cluster(fake: FakeKube, project: Project) -> None:
    fake.namespaces["ml-models"] = RESTRICTED | PROFILE
    fake.served["argoproj.io/v1alpha1"] = {"workflows", "workflowtemplates"}
    fake.add_node("gpu-a", labels=GPU_POOL, gpus=1)
    fake.add_node("cpu-a", labels={}, gpus=0)
    fake.apply(
        *pipeline_rbac(project),
        controller_settings("argo", executor=RESTRICTED_EXECUTOR),
        artifact_repositories("ml-models"),
        controller_settings("kubeflow", executor=RESTRICTED_EXECUTOR, artifactRepository=S3_REPOSITORY),
        config_map("ml-models", "kfp-launcher", {"defaultPipelineRoot": "s3://ml-artifacts/kfp"}),
    )


# --- the servers around it ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real MLflow tracking server's app, served on loopback (doctor asks its /health, and where
    it keeps the experiment's artifacts: s3://, as `mlflow server --default-artifact-root` sets)."""
    from mlflow.server import ARTIFACT_ROOT_ENV_VAR, BACKEND_STORE_URI_ENV_VAR, app
    from werkzeug.serving import make_server

    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    saved = {key: os.environ.get(key) for key in (BACKEND_STORE_URI_ENV_VAR, ARTIFACT_ROOT_ENV_VAR)}
    os.environ.update(
        {BACKEND_STORE_URI_ENV_VAR: f"sqlite:///{store}", ARTIFACT_ROOT_ENV_VAR: "s3://mlflow/"}
    )
    server = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def fake_kfp(*, multi_user: bool, tag: str = "2.17.0") -> Iterator[str]:
    """KFP's API server's healthz, as backend/src/apiserver/main.go (2.17.0) writes it."""
    body = json.dumps(
        {"commit_sha": "7b70c7b9", "tag_name": tag, "multi_user": multi_user, "pipeline_store": "database"}
    ).encode()

    class Kfp(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            ok = self.path == "/apis/v2beta1/healthz"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

    with serving(Kfp) as address:
        yield f"http://{address}"


@contextmanager
def fake_registry(images: dict[str, str], *, anonymous: bool = True) -> Iterator[str]:
    """A registry holding ``images`` (repository:tag -> digest), behind the bearer-token dance."""
    token = "anonymous-pull-token"

    class Registry(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/token":
                scope = parse_qs(parts.query).get("scope", [""])[0]
                ok = anonymous and scope.startswith("repository:") and scope.endswith(":pull")
                self.answer(200 if ok else 401, b'{"token": "%s"}' % token.encode() if ok else b"{}")
                return
            if self.headers.get("Authorization") != f"Bearer {token}":
                host = self.headers["Host"]
                challenge = f'Bearer realm="http://{host}/token",service="fake",scope="repository:x:pull"'
                self.answer(401, b"{}", {"WWW-Authenticate": challenge})
                return
            repository, _, ref = parts.path.removeprefix("/v2/").partition("/manifests/")
            digest = images.get(f"{repository}:{ref}")
            if digest is None or "manifest" not in self.headers.get("Accept", ""):
                self.answer(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}')
                return
            self.answer(200, b"{}", {"Docker-Content-Digest": digest})

        def answer(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(Registry) as address:
        yield f"localhost:{address.rsplit(':', 1)[1]}"


def configure(project: Path, *, registry: str, mlflow: str, kfp: str, argo: str) -> None:
    def change(settings: dict[str, Any]) -> None:
        settings["image"] = f"{registry}/ml/digits-classifier:1.4.2"
        settings["orchestrator"] = "both"
        settings["training"].update(gpus=1, node_selector=GPU_POOL)
        settings["cluster"].update(mlflow_tracking_uri=mlflow, kfp_endpoint=kfp, argo_server=argo)

    edit_yaml(project / "handoff.yaml", change)


def orchestrated_by(project: Path, orchestrator: str) -> Project:
    edit_yaml(project / "handoff.yaml", lambda s: s.update(orchestrator=orchestrator))
    return Project.load(project)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def cluster_checks(project: Project, fake: FakeKube, server: KfpServer | None = None) -> dict[str, Finding]:
    return by_check(list(check_cluster(project, fake.api_client(), Locations(), server)))


# --- the whole run ------------------------------------------------------------------------------


def test_a_ready_cluster_passes_every_check(project: Path, mlflow_url: str) -> None:
    with (
        fake_kube() as fake,
        fake_registry({"ml/digits-classifier:1.4.2": DIGEST}) as registry,
        fake_kfp(multi_user=True) as kfp,
        fake_argo(token=None) as argo,
    ):
        configure(project, registry=registry, mlflow=mlflow_url, kfp=kfp, argo=argo.url)
        loaded = Project.load(project)
        healthy_cluster(fake, loaded)
        MlflowClient(tracking_uri=mlflow_url).create_experiment("digits-classifier")
        findings = run_doctor(loaded, connect=fake.api_client)
    found = by_check(findings)
    assert [f for f in findings if f.outcome != "pass"] == []
    assert [f.check for f in findings] == [
        "api server",
        "namespace",
        "api inferenceservices.serving.kserve.io",
        "api workflows.argoproj.io",
        "api workflowtemplates.argoproj.io",
        "access",
        "gpus",
        "argo executor",
        "argo artifacts",
        "kfp mode",
        "kfp executor",
        "kfp artifacts",
        "image",
        "mlflow",
        "mlflow artifacts",
        "kfp",
        "argo",
    ]
    assert found["access"].detail == f"{ACCOUNT} may make the pipeline's 10 API calls in ml-models"
    assert found["argo executor"].detail == (
        "executor.securityContext in argo/workflow-controller-configmap passes Pod Security restricted in "
        "ml-models"
    )
    assert found["argo artifacts"].detail == (
        "s3://ml-artifacts at seaweedfs.storage.svc:8333 (ml-models/artifact-repositories, key 'default-v1')"
    )
    assert found["kfp mode"].detail == (
        "multi-user KFP (KFP's healthz) runs the pipelines in ml-models, a Profile's namespace"
    )
    assert found["kfp artifacts"].detail == "pipeline root s3://ml-artifacts/kfp (kfp-launcher in ml-models)"
    assert found["kfp"].detail.endswith("answered HTTP 200 (KFP 2.17.0)")
    assert found["mlflow artifacts"].detail.startswith(
        "experiment 'digits-classifier' keeps its artifacts at s3://mlflow/"
    )
    assert "Pod Security enforce: restricted" in found["namespace"].detail
    assert found["gpus"].detail.endswith("gpu-a")
    assert DIGEST in found["image"].detail


def test_each_problem_is_named_with_what_to_do(project: Path) -> None:
    with fake_kube() as fake, fake_registry({}) as registry:
        fake.add_node("gpu-a", labels=GPU_POOL, gpus=1, unschedulable=True)
        configure(project, registry=registry, mlflow="sqlite:///mlflow.db", kfp="", argo="")
        edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update(mlflow_tracking_uri=None))
        loaded = Project.load(project)
        role, binding, *kfp_rbac = pipeline_rbac(loaded)
        role["rules"][0]["verbs"].remove("patch")  # a Role edited by hand, one verb short
        fake.apply(role, binding, *kfp_rbac)
        found = by_check(run_doctor(loaded, connect=fake.api_client))
    assert found["namespace"].outcome == "fail"
    assert "'ml-models' (handoff.yaml namespace) does not exist" in found["namespace"].detail
    assert found["api workflows.argoproj.io"].outcome == "fail"
    assert "install its operator" in found["api workflows.argoproj.io"].detail
    assert found["api inferenceservices.serving.kserve.io"].outcome == "pass"
    assert found["access"] == Finding(
        "access",
        "fail",
        f"{ACCOUNT} may not, in ml-models: patch inferenceservices.serving.kserve.io (grant: {ROLE})",
    )
    assert found["gpus"].outcome == "fail"  # the only GPU node is cordoned
    assert "1 node(s) with 1 allocatable nvidia.com/gpu each; 0 of 1 nodes matching" in found["gpus"].detail
    assert found["image"].outcome == "fail" and "build and push it" in found["image"].detail
    assert found["mlflow"].outcome == "fail"
    assert "set cluster.mlflow_tracking_uri" in found["mlflow"].detail
    assert (found["kfp"].outcome, found["argo"].outcome) == ("skip", "skip")


def test_no_cluster_credentials_still_checks_the_rest(project: Path, mlflow_url: str) -> None:
    def no_credentials() -> Any:
        raise HandoffError("no Kubernetes credentials: set KUBECONFIG")

    edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update(mlflow_tracking_uri=mlflow_url))
    found = by_check(run_doctor(Project.load(project), connect=no_credentials))
    assert found["api server"] == Finding("api server", "fail", "no Kubernetes credentials: set KUBECONFIG")
    assert "namespace" not in found
    assert found["mlflow"].outcome == "pass"


# --- access: the pipeline's account, not the caller ----------------------------------------------


def test_a_cluster_admin_without_the_role_applied_still_fails_access(project: Path) -> None:
    """The finding: a review of the caller's own access passes for an admin; the pods' account has none."""
    loaded = orchestrated_by(project, "both")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED
        fake.apply(cluster_role_binding("platform-admins", "cluster-admin", "admin@example.com"))
        fake.caller = User("admin@example.com")
        found = cluster_checks(loaded, fake)["access"]
    assert found.outcome == "fail"
    assert found.detail == (
        f"{ACCOUNT} may not, in ml-models: get inferenceservices.serving.kserve.io, create "
        "inferenceservices.serving.kserve.io, patch inferenceservices.serving.kserve.io, get "
        "inferencegraphs.serving.kserve.io, list pods, get "
        "deployments.apps, create workflowtaskresults.argoproj.io, patch workflowtaskresults.argoproj.io, "
        f"get pods (grant: {ROLE}); {ACCOUNT} may not, in ml-models: get configmaps 'kfp-launcher', get "
        "secrets 'mlpipeline-minio-artifact' (grant: manifests/components/kfp (add it to the overlay's "
        "components))"
    )


def test_the_rendered_role_grants_every_call_the_pods_make(project: Path) -> None:
    orchestrated_by(project, "both")
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(nodes=2))
    edit_yaml(project / "handoff.yaml", lambda s: s["training"]["job"].update(workspace_claim="ws"))
    loaded = Project.load(project)
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED
        fake.apply(*pipeline_rbac(loaded))
        assert cluster_checks(loaded, fake)["access"] == Finding(
            "access", "pass", f"{ACCOUNT} may make the pipeline's 14 API calls in ml-models"
        )
        # The binding naming another namespace's account (as one copied from another overlay
        # would) grants this one nothing.
        binding = next(o for o in pipeline_rbac(loaded) if o["kind"] == "RoleBinding")
        binding["subjects"][0]["namespace"] = "ml-dev"
        fake.apply(binding)
        found = cluster_checks(loaded, fake)["access"]
    assert found.outcome == "fail" and "create trainjobs.trainer.kubeflow.org" in found.detail


def test_the_role_grants_exactly_the_calls_the_pods_make(project: Path) -> None:
    """manifests/base/rbac-pipeline.yaml grants what doctor_access.needed_rules lists, no verb more:
    every call in kube/ and steps/ (deploy and train poll with get and list: nothing watches, and
    nothing lists InferenceServices or jobs), Argo's executor's, and KFP's driver and launcher
    reading their own pod. The named objects KFP's launcher reads are components/kfp's."""
    role = next(
        o for o in rendered(("manifests/base/rbac-pipeline.yaml",), "ml-models") if o["kind"] == "Role"
    )
    assert not any(rule.get("resourceNames") for rule in role["rules"])
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = set()
    for job_api in ("trainjob", "pytorchjob"):

        def distributed(settings: dict[str, Any], job_api: str = job_api) -> None:
            settings.update(orchestrator="both")
            settings["training"].update(nodes=2)
            settings["training"]["job"].update(api=job_api, workspace_claim="ws")

        edit_yaml(project / "handoff.yaml", distributed)
        rules = needed_rules(Project.load(project), minio_secret=True)
        needed |= {(r.group, r.resource, r.verb) for r in rules if r.granted_by == ROLE}
    assert granted == needed


def test_kfps_minio_secret_is_reviewed_when_the_launcher_reads_it(project: Path) -> None:
    """KFP's launcher reads Secret mlpipeline-minio-artifact for a minio:// pipeline root (KFP's
    default, with no kfp-launcher ConfigMap); components/kfp grants it. An s3:// root needs no Secret."""
    loaded = orchestrated_by(project, "kfp")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED | PROFILE
        objects = pipeline_rbac(loaded)
        kfp_role = next(o for o in objects if o["metadata"]["name"] == "handoff-pipeline-kfp-launcher")
        kfp_role["rules"] = [r for r in kfp_role["rules"] if r["resources"] != ["secrets"]]
        fake.apply(*objects)
        default_root = cluster_checks(loaded, fake, KfpServer(multi_user=True))["access"]
        fake.apply(config_map("ml-models", "kfp-launcher", {"defaultPipelineRoot": "s3://ml-artifacts/kfp"}))
        s3_root = cluster_checks(loaded, fake, KfpServer(multi_user=True))["access"]
    assert default_root == Finding(
        "access",
        "fail",
        f"{ACCOUNT} may not, in ml-models: get secrets 'mlpipeline-minio-artifact' (grant: "
        "manifests/components/kfp (add it to the overlay's components))",
    )
    calls = "the pipeline's 10 API calls in ml-models"
    assert s3_root == Finding("access", "pass", f"{ACCOUNT} may make {calls}")


def test_a_caller_who_may_not_review_other_accounts_gets_a_skip_that_says_what_to_run(project: Path) -> None:
    loaded = orchestrated_by(project, "argo")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED
        fake.apply(*pipeline_rbac(loaded, kfp=False), *namespace_reader("ml-models", "dev@example.com"))
        fake.apply(controller_settings("argo", executor=RESTRICTED_EXECUTOR))
        fake.caller = User("dev@example.com")
        found = cluster_checks(loaded, fake)
        rejected = list(fake.rejected)
    assert found["namespace"].outcome == "pass"
    assert found["access"] == Finding(
        "access",
        "skip",
        "you may not review another account's access (HTTP 403: subjectaccessreviews.authorization.k8s.io "
        'is forbidden: User "dev@example.com" cannot create resource "subjectaccessreviews" in API group '
        f'"authorization.k8s.io" at the cluster scope), so {ACCOUNT}\'s was not checked: ask a cluster admin '
        f"to run `kubectl auth can-i --list -n ml-models --as={ACCOUNT}`",
    )
    assert found["argo executor"].outcome == "skip"
    assert found["argo executor"].detail.startswith(
        "you may not read ConfigMap argo/workflow-controller-configmap (HTTP 403: configmaps "
        '"workflow-controller-configmap" is forbidden: User "dev@example.com" cannot get resource '
        '"configmaps" in API group "" in the namespace "argo"): check that its executor.securityContext '
        "passes Pod Security restricted (manifests/platform/argo sets one)"
    )
    # None in the namespace (readable), and the controller's default cannot be read: no verdict.
    assert found["argo artifacts"].outcome == "skip"
    assert any("subjectaccessreviews" in r for r in rejected)


def test_the_fake_authorizes_as_the_rbac_authorizer_does(project: Path) -> None:
    """Bindings, ServiceAccount subjects, resourceNames, the reason and the 403 as the API server has them."""
    loaded = Project.load(project)
    with fake_kube() as fake:
        fake.apply(*pipeline_rbac(loaded))
        reviews = client.AuthorizationV1Api(fake.api_client())

        def review(verb: str, resource: str, name: str | None = None, user: str = ACCOUNT) -> Any:
            spec = client.V1SubjectAccessReviewSpec(
                user=user,
                groups=["system:serviceaccounts", "system:authenticated"],
                resource_attributes=client.V1ResourceAttributes(
                    namespace="ml-models", verb=verb, resource=resource, name=name
                ),
            )
            return reviews.create_subject_access_review(client.V1SubjectAccessReview(spec=spec)).status

        assert review("list", "pods").allowed
        assert review("get", "configmaps", "kfp-launcher").allowed
        assert not review("get", "configmaps", "other").allowed  # resourceNames narrow the rule
        assert not review("list", "configmaps").allowed
        assert not review("list", "pods", user="system:serviceaccount:ml-models:default").allowed
        fake.caller = service_account("ml-models", "handoff-pipeline")  # the step's own token
        core = client.CoreV1Api(fake.api_client())
        assert core.list_namespaced_pod("ml-models").items == []
        with pytest.raises(ApiException) as denied:
            core.read_namespaced_config_map("other", "ml-models")
        fake.caller = CLUSTER_ADMIN  # what is not there is not found, whatever its kind
        with pytest.raises(ApiException) as no_config_map:
            core.read_namespaced_config_map("kfp-launcher", "ml-models")
        with pytest.raises(ApiException) as no_deployment:
            client.AppsV1Api(fake.api_client()).read_namespaced_deployment("ml-pipeline", "kubeflow")
    assert denied.value.status == 403
    assert json.loads(denied.value.body)["message"] == (
        'configmaps "other" is forbidden: User "system:serviceaccount:ml-models:handoff-pipeline" cannot get '
        'resource "configmaps" in API group "" in the namespace "ml-models"'
    )
    assert [
        (e.value.status, json.loads(e.value.body)["message"]) for e in (no_config_map, no_deployment)
    ] == [
        (404, 'configmaps "kfp-launcher" not found'),
        (404, 'deployments.apps "ml-pipeline" not found'),
    ]


# --- Argo: the executor's security context and the artifact repository ----------------------------


# What "restricted" says of init and wait when the executor setting has no security context.
NOT_SET = (
    'allowPrivilegeEscalation != false (containers "init", "wait" must set '
    'securityContext.allowPrivilegeEscalation=false); unrestricted capabilities (containers "init", "wait" '
    'must set securityContext.capabilities.drop=["ALL"])'
)


@pytest.mark.parametrize(
    ("labels", "settings", "outcome", "said"),
    [
        (
            RESTRICTED,
            {"executor": RESTRICTED_EXECUTOR},
            "pass",
            "passes Pod Security restricted in ml-models",
        ),
        (
            RESTRICTED,
            {"artifactRepository": S3_REPOSITORY},
            "fail",
            "Pod Security restricted in ml-models (pod-security.kubernetes.io/enforce=restricted) refuses "
            "Argo's init and wait containers: executor.securityContext in "
            f"argo/workflow-controller-configmap is not set, and {NOT_SET}: apply manifests/platform/argo "
            "(`kubectl apply --server-side -k manifests/platform/argo`)",
        ),
        (
            RESTRICTED,
            {"executor": RESTRICTED_EXECUTOR.replace("65532", "0")},
            "fail",
            'is set, and runAsUser=0 (containers "init", "wait" must not set runAsUser=0): apply '
            "manifests/platform/argo",
        ),
        (
            RESTRICTED,
            {"config": "executor:\n" + "".join(f"  {line}\n" for line in RESTRICTED_EXECUTOR.splitlines())},
            "pass",
            "passes Pod Security restricted",
        ),
        ({"pod-security.kubernetes.io/enforce": "baseline"}, {}, "pass", "passes Pod Security baseline"),
        (
            {"pod-security.kubernetes.io/enforce": "baseline"},
            {"executor": "securityContext: {privileged: true}"},
            "fail",
            'privileged (containers "init", "wait" must not set securityContext.privileged=true)',
        ),
    ],
    ids=["restricted", "not-set", "root", "config-key", "baseline", "privileged"],
)
def test_argos_executor_context_is_held_to_the_namespaces_pod_security_level(
    project: Path, labels: dict[str, str], settings: dict[str, str], outcome: str, said: str
) -> None:
    loaded = orchestrated_by(project, "argo")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = labels
        fake.apply(controller_settings("argo", **settings))
        found = cluster_checks(loaded, fake)["argo executor"]
    assert (found.outcome, found.check) == (outcome, "argo executor")
    assert said in found.detail


def test_the_pod_context_argos_check_assumes_is_the_one_handoff_compiles() -> None:
    """Argo's init and wait inherit the WorkflowTemplate's pod context: the check holds the executor
    setting to admission inside the pods handoff_pipelines.argo makes."""
    from handoff_pipelines.argo import pod_security

    compiled = pod_security().model_dump(by_alias=True, exclude_none=True, mode="json")
    assert {k: compiled.get(k) for k in ARGO_POD_CONTEXT} == ARGO_POD_CONTEXT


def test_argos_controller_elsewhere_is_found_with_argo_config(project: Path) -> None:
    loaded = orchestrated_by(project, "argo")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED
        fake.apply(controller_settings("workflows", executor=RESTRICTED_EXECUTOR))
        assert cluster_checks(loaded, fake)["argo executor"] == Finding(
            "argo executor",
            "skip",
            "ConfigMap argo/workflow-controller-configmap does not exist: check that its "
            "executor.securityContext passes Pod Security restricted (manifests/platform/argo sets one), "
            "or pass --argo-config if the controller is elsewhere",
        )
        where = Locations(argo_config=("workflows", "workflow-controller-configmap"))
        found = by_check(list(check_cluster(loaded, fake.api_client(), where)))["argo executor"]
    assert found.outcome == "pass"


def test_the_executor_advice_fits_the_controllers_configmap(project: Path) -> None:
    """manifests/platform/argo writes an `executor` key to argo/workflow-controller-configmap. A
    Helm install keeps everything in one `config` key, and a second key next to it makes Argo
    refuse the whole ConfigMap (config/controller.go parseConfigMap); a controller elsewhere
    (--argo-config) is not the one the kustomization writes. The advice says what fits each."""
    loaded = orchestrated_by(project, "argo")

    def executor_line(where: tuple[str, str], *objects: dict[str, Any]) -> Finding:
        with fake_kube() as fake:
            fake.namespaces["ml-models"] = RESTRICTED
            fake.apply(*objects)
            return by_check(list(check_cluster(loaded, fake.api_client(), Locations(argo_config=where))))[
                "argo executor"
            ]

    helm = executor_line(("argo", HELM_CONFIG_MAP), helm_config("argo", artifactRepository=S3_REPOSITORY))
    assert helm.outcome == "fail"
    assert helm.detail.endswith(
        f"argo/{HELM_CONFIG_MAP} keeps its settings in one `config` key (as Argo's Helm chart writes it): "
        "put executor.securityContext as manifests/platform/components/argo-executor sets it inside that key "
        "(Helm value executor.securityContext); applying manifests/platform/argo would add an `executor` key "
        "next to `config`, which Argo refuses"
    )
    assert "kubectl apply" not in helm.detail
    elsewhere = executor_line(
        ("workflows", "controller-config"), config_map("workflows", "controller-config", {"parallelism": "4"})
    )
    assert elsewhere.outcome == "fail"
    assert elsewhere.detail.endswith(
        "set the `executor` key of workflows/controller-config as "
        "manifests/platform/components/argo-executor sets it (manifests/platform/argo writes "
        "argo/workflow-controller-configmap only)"
    )
    # What the kustomization would have made of the Helm ConfigMap: Argo refuses all of it.
    broken = helm_config("argo", artifactRepository=S3_REPOSITORY)
    broken["data"]["executor"] = RESTRICTED_EXECUTOR
    assert executor_line(("argo", HELM_CONFIG_MAP), broken) == Finding(
        "argo executor",
        "fail",
        f"argo/{HELM_CONFIG_MAP} has a `config` key and others (executor), and Argo's controller refuses "
        "such a ConfigMap (config/controller.go: `config` must be its only item): move the others' settings "
        "inside `config`, or split `config` into one key per setting",
    )
    fixed = helm_config("argo", artifactRepository=S3_REPOSITORY, executor=RESTRICTED_EXECUTOR)
    assert executor_line(("argo", HELM_CONFIG_MAP), fixed).outcome == "pass"


@pytest.mark.parametrize(
    ("objects", "outcome", "said"),
    [
        ([artifact_repositories("ml-models")], "pass", "(ml-models/artifact-repositories, key 'default-v1')"),
        (
            [controller_settings("argo", artifactRepository="gcs:\n  bucket: team-artifacts\n")],
            "pass",
            "gs://team-artifacts (the controller's artifactRepository in argo/workflow-controller-configmap)",
        ),
        (  # the annotation names a key the ConfigMap lacks: Argo falls through to the controller's
            [
                artifact_repositories("ml-models", key="v2", **{"v1": S3_REPOSITORY}),
                controller_settings("argo", artifactRepository="gcs:\n  bucket: team-artifacts\n"),
            ],
            "pass",
            "gs://team-artifacts (the controller's artifactRepository",
        ),
        (
            [controller_settings("argo", executor=RESTRICTED_EXECUTOR)],
            "fail",
            "no artifact repository for ml-models, and the steps hand files on as Argo artifacts: add a "
            "`artifact-repositories` ConfigMap to ml-models (annotation "
            "workflows.argoproj.io/default-artifact-repository names its key) or artifactRepository in "
            "argo/workflow-controller-configmap",
        ),
        ([], "skip", "ConfigMap argo/workflow-controller-configmap does not exist"),
        (  # the key exists: Argo uses it as it is and never reaches the controller's
            [
                artifact_repositories("ml-models", key="v1", v1="archiveLogs: true\n"),
                controller_settings("argo", artifactRepository="gcs:\n  bucket: team-artifacts\n"),
            ],
            "fail",
            "ml-models/artifact-repositories key 'v1' names no storage (one of artifactory, azure, gcs, "
            "hdfs, oss, plugin, s3), and Argo uses that key without falling back to the controller's "
            "artifactRepository: set the storage there",
        ),
        (  # git is where an input artifact comes from, not a field of Argo's ArtifactRepository
            [artifact_repositories("ml-models", key="v1", v1="git:\n  repo: https://example.com/x.git\n")],
            "fail",
            "key 'v1' names no storage",
        ),
    ],
    ids=["namespace", "controller", "missing-key", "none", "unreadable", "no-storage", "git"],
)
def test_argos_artifact_repository_is_looked_up_where_argo_looks(
    project: Path, objects: list[dict[str, Any]], outcome: str, said: str
) -> None:
    loaded = orchestrated_by(project, "argo")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED
        fake.apply(*objects)
        found = cluster_checks(loaded, fake)["argo artifacts"]
    assert found.outcome == outcome
    assert said in found.detail


# --- KFP: its mode, the namespace it means, its pipeline root and version -----------------------


def test_kfp_mode_says_where_the_pipelines_run(project: Path) -> None:
    loaded = orchestrated_by(project, "kfp")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED
        single = cluster_checks(loaded, fake, KfpServer(multi_user=False))["kfp mode"]
        multi = cluster_checks(loaded, fake, KfpServer(multi_user=True))["kfp mode"]
        fake.namespaces["ml-models"] = RESTRICTED | PROFILE
        profile = cluster_checks(loaded, fake, KfpServer(multi_user=True))["kfp mode"]
    assert single == Finding(
        "kfp mode",
        "pass",
        "single-user KFP (KFP's healthz) runs the pipelines in its own namespace kubeflow, as "
        "system:serviceaccount:kubeflow:handoff-pipeline, which acts on ml-models (the access check "
        "reviews it)",
    )
    assert multi == Finding(
        "kfp mode",
        "fail",
        "multi-user KFP (KFP's healthz) runs pipelines only in a Profile's namespace, and ml-models lacks "
        "pipelines.kubeflow.org/enabled=true: create a Kubeflow Profile named ml-models and let its "
        "controller own the namespace (manifests/README.md)",
    )
    assert profile == Finding(
        "kfp mode",
        "pass",
        "multi-user KFP (KFP's healthz) runs the pipelines in ml-models, a Profile's namespace",
    )


def test_single_user_kfp_reviews_the_account_in_kfps_namespace(project: Path) -> None:
    """Single-user KFP runs the pods in `kubeflow`: the account there needs the Role of ml-models too."""
    loaded = orchestrated_by(project, "kfp")
    kubeflow_account = "system:serviceaccount:kubeflow:handoff-pipeline"
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED
        fake.apply(*pipeline_rbac(loaded))
        base_only = cluster_checks(loaded, fake, KfpServer(multi_user=False))["access"]
        fake.apply(
            *rendered(("manifests/platform/kubeflow-single-user/pipeline-account.yaml",), "kubeflow"),
            *rendered(("manifests/components/kfp-single-user/kfp-pipeline-access.yaml",), "ml-models"),
        )
        granted = cluster_checks(loaded, fake, KfpServer(multi_user=False))["access"]
    assert base_only.outcome == "fail"
    assert base_only.detail == (
        f"{kubeflow_account} may not, in ml-models: get inferenceservices.serving.kserve.io, create "
        "inferenceservices.serving.kserve.io, patch inferenceservices.serving.kserve.io, get "
        "inferencegraphs.serving.kserve.io, list pods, get "
        "deployments.apps (grant: manifests/components/kfp-single-user (add it to the overlay's "
        "components)); "
        f"{kubeflow_account} may not, in kubeflow: create workflowtaskresults.argoproj.io, patch "
        "workflowtaskresults.argoproj.io, get configmaps 'kfp-launcher', get pods, get secrets "
        "'mlpipeline-minio-artifact' (grant: manifests/platform/kubeflow-single-user (`kubectl apply -k` it "
        "once))"
    )
    assert granted == Finding(
        "access", "pass", f"{kubeflow_account} may make the pipeline's 11 API calls in kubeflow and ml-models"
    )


def test_kfp_mode_without_an_endpoint_is_read_from_its_api_servers_deployment(project: Path) -> None:
    loaded = orchestrated_by(project, "kfp")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED | PROFILE
        missing = cluster_checks(loaded, fake)["kfp mode"]
        fake.apply(
            kfp_deployment("kubeflow", "pipeline-api-server-config-5f4b8"),
            config_map("kubeflow", "pipeline-api-server-config-5f4b8", {"MULTIUSER": "true"}),
        )
        multi = cluster_checks(loaded, fake)["kfp mode"]
        fake.apply(config_map("kubeflow", "pipeline-api-server-config-5f4b8", {"LOG_LEVEL": "info"}))
        single = cluster_checks(loaded, fake)["kfp mode"]
    assert missing == Finding(
        "kfp mode",
        "skip",
        "cannot tell KFP's mode: there is no Deployment kubeflow/ml-pipeline (is KFP elsewhere? pass "
        "--kfp-namespace)",
    )
    assert multi == Finding(
        "kfp mode",
        "pass",
        "multi-user KFP (Deployment kubeflow/ml-pipeline: MULTIUSER=true (ConfigMap "
        "pipeline-api-server-config-5f4b8)) runs the pipelines in ml-models, a Profile's namespace",
    )
    assert single.outcome == "pass"
    assert single.detail.startswith(
        "single-user KFP (Deployment kubeflow/ml-pipeline: MULTIUSER is not set) runs the pipelines in its "
        "own namespace kubeflow"
    )


KFP_ARGOEXEC = "quay.io/argoproj/argoexec:v4.0.5"  # what KFP 2.17.0's manifests pass as --executor-image
NO_USER = RESTRICTED_EXECUTOR.replace("  runAsUser: 65532\n", "")


@pytest.mark.parametrize(
    ("executor", "controller_args", "outcome", "said"),
    [
        (RESTRICTED_EXECUTOR, None, "pass", "passes Pod Security restricted in ml-models"),
        (
            None,
            None,
            "fail",
            "executor.securityContext in kubeflow/workflow-controller-configmap is not set, and "
            'allowPrivilegeEscalation != false (containers "init", "wait" must set '
            "securityContext.allowPrivilegeEscalation=false)",
        ),
        (  # KFP's step pods set no runAsNonRoot of their own: the executor's context must
            RESTRICTED_EXECUTOR.replace("  runAsNonRoot: true\n", ""),
            None,
            "fail",
            'runAsNonRoot != true (pod or containers "init", "wait" must set '
            "securityContext.runAsNonRoot=true)",
        ),
        (  # admitted, but KFP's pods name no user and the controller's argoexec runs as root
            NO_USER,
            ["--executor-image", KFP_ARGOEXEC],
            "fail",
            "the kubelet refuses to start Argo's init and wait containers in KFP's pods: they must run as "
            "non-root, KFP's pods name no user (unless KFP's admin set a default), and "
            f"{KFP_ARGOEXEC} (--executor-image of Deployment kubeflow/workflow-controller) runs as root: set "
            "executor.securityContext.runAsUser in kubeflow/workflow-controller-configmap "
            "(manifests/platform/kubeflow sets 65532)",
        ),
        (  # the flag wins over executor.image (workflow/controller/config.go executorImage)
            f"image: {KFP_ARGOEXEC}-nonroot\n" + NO_USER,
            ["--executor-image", KFP_ARGOEXEC],
            "fail",
            f"and {KFP_ARGOEXEC} (--executor-image of Deployment kubeflow/workflow-controller) runs as root",
        ),
        (  # a -nonroot tag pinned by digest
            NO_USER,
            [f"--executor-image={KFP_ARGOEXEC}-nonroot@{DIGEST}"],
            "pass",
            f"they run as {KFP_ARGOEXEC}-nonroot@{DIGEST}'s non-root user (--executor-image of Deployment "
            "kubeflow/workflow-controller)",
        ),
        (  # Argo's default image, at the controller's version: root
            NO_USER,
            [],
            "fail",
            "and quay.io/argoproj/argoexec:<controller version> (Argo's default: Deployment "
            "kubeflow/workflow-controller sets no --executor-image) runs as root",
        ),
        (
            NO_USER,
            None,
            "skip",
            "Argo's init and wait in KFP's pods must run as non-root and get no user from KFP, so they run "
            "as their image's user, and there is no Deployment kubeflow/workflow-controller, whose "
            "--executor-image names it: check that it is a -nonroot argoexec image, or set "
            "executor.securityContext.runAsUser in kubeflow/workflow-controller-configmap "
            "(manifests/platform/kubeflow sets 65532)",
        ),
        (
            f"image: {KFP_ARGOEXEC}-nonroot\n" + NO_USER,
            None,
            "pass",
            "(executor.image; there is no Deployment kubeflow/workflow-controller, whose --executor-image "
            "would override it)",
        ),
    ],
    ids=[
        "kfp-2.17",
        "not-set",
        "no-run-as-non-root",
        "root-image",
        "flag-over-setting",
        "nonroot-digest",
        "default-image",
        "image-unknown",
        "setting-only",
    ],
)
def test_kfps_own_argo_executor_is_checked_in_kfps_namespace(
    project: Path, executor: str | None, controller_args: list[str] | None, outcome: str, said: str
) -> None:
    loaded = orchestrated_by(project, "kfp")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED | PROFILE
        settings = {"artifactRepository": S3_REPOSITORY} | ({"executor": executor} if executor else {})
        fake.apply(controller_settings("kubeflow", **settings))
        if controller_args is not None:
            fake.apply(workflow_controller("kubeflow", *controller_args))
        found = cluster_checks(loaded, fake, KfpServer(multi_user=True))["kfp executor"]
    assert found.outcome == outcome, found
    assert said in found.detail


def test_single_user_kfps_executor_is_held_to_kfps_own_namespace(project: Path) -> None:
    """Single-user KFP runs the pods in `kubeflow`: that namespace's Pod Security level is the one
    that admits them, whatever the project's namespace enforces."""
    loaded = orchestrated_by(project, "kfp")
    with fake_kube() as fake:
        fake.apply(
            controller_settings("kubeflow", artifactRepository=S3_REPOSITORY),  # no executor setting
            workflow_controller("kubeflow", "--executor-image", f"{KFP_ARGOEXEC}-nonroot"),
        )
        fake.namespaces["ml-models"] = RESTRICTED
        fake.namespaces["kubeflow"] = {"pod-security.kubernetes.io/enforce": "baseline"}
        lenient = cluster_checks(loaded, fake, KfpServer(multi_user=False))["kfp executor"]
        fake.namespaces["ml-models"] = {}
        fake.namespaces["kubeflow"] = RESTRICTED
        strict = cluster_checks(loaded, fake, KfpServer(multi_user=False))["kfp executor"]
        del fake.namespaces["kubeflow"]
        unknown = cluster_checks(loaded, fake, KfpServer(multi_user=False))["kfp executor"]
    assert lenient.outcome == "pass"
    assert lenient.detail.startswith(
        "executor.securityContext in kubeflow/workflow-controller-configmap passes Pod Security baseline in "
        "kubeflow; they run as"
    )
    assert strict.outcome == "fail"
    assert strict.detail.startswith(
        "Pod Security restricted in kubeflow (pod-security.kubernetes.io/enforce=restricted) refuses Argo's "
        "init and wait containers"
    )
    assert unknown.detail.startswith(
        "Pod Security restricted in kubeflow (assumed: namespace kubeflow could not be read) refuses"
    )


def test_kfp_pipeline_root_is_read_where_the_pods_run(project: Path) -> None:
    loaded = orchestrated_by(project, "kfp")
    with fake_kube() as fake:
        fake.namespaces["ml-models"] = RESTRICTED | PROFILE
        default = cluster_checks(loaded, fake, KfpServer(multi_user=True))["kfp artifacts"]
        fake.apply(config_map("kubeflow", "kfp-launcher", {"defaultPipelineRoot": "gs://shared/kfp"}))
        single = cluster_checks(loaded, fake, KfpServer(multi_user=False))["kfp artifacts"]
        fake.caller = User("dev@example.com")
        fake.apply(*namespace_reader("ml-models", "dev@example.com"))
        unreadable = cluster_checks(loaded, fake, KfpServer(multi_user=False))["kfp artifacts"]
    assert default == Finding(
        "kfp artifacts",
        "pass",
        "pipeline root minio://mlpipeline/v2/artifacts (KFP's default: kfp-launcher in ml-models does not "
        "exist): KFP's bundled object store, whose keys the steps read from Secret mlpipeline-minio-artifact "
        "(the access check reviews that they may)",
    )
    # Single-user KFP runs in its own namespace: its kfp-launcher is the one that counts.
    assert single == Finding(
        "kfp artifacts", "pass", "pipeline root gs://shared/kfp (kfp-launcher in kubeflow)"
    )
    assert unreadable.outcome == "skip"
    assert unreadable.detail.startswith("you may not read ConfigMap kubeflow/kfp-launcher (HTTP 403")


def test_kfp_healthz_gives_the_mode_and_refuses_a_backend_that_drops_the_security_context() -> None:
    import requests

    with fake_kfp(multi_user=True, tag="2.15.0") as old, fake_kfp(multi_user=False, tag="2.17.0") as new:
        too_old, old_server = kfp_healthz(old, requests.get)
        fine, new_server = kfp_healthz(new, requests.get)
    assert too_old == Finding(
        "kfp",
        "fail",
        f"KFP 2.15.0 at {old} drops the steps' securityContext (kfp-kubernetes security_context needs a KFP "
        "backend ≥ 2.16.0), so Pod Security restricted refuses their pods: upgrade KFP to 2.16.0 or later",
    )
    assert old_server == KfpServer(multi_user=True, version="2.15.0")
    assert fine == Finding("kfp", "pass", f"{new}/apis/v2beta1/healthz answered HTTP 200 (KFP 2.17.0)")
    assert new_server.multi_user is False


# --- image and CLI ------------------------------------------------------------------------------


def test_image_reference_forms_reach_the_right_registry_path() -> None:
    asked: list[str] = []

    def get(url: str, **_: Any) -> Any:
        asked.append(url)
        raise __import__("requests").ConnectionError("offline")

    for image in ("digits:1.0", "team/digits@" + DIGEST, "localhost:5000/ml/digits", "ghcr.io/org/digits:2"):
        assert check_image(image, get).outcome == "fail"
    assert asked == [
        "https://registry-1.docker.io/v2/digits/manifests/1.0",
        f"https://registry-1.docker.io/v2/team/digits/manifests/{DIGEST}",
        "http://localhost:5000/v2/ml/digits/manifests/latest",
        "https://ghcr.io/v2/org/digits/manifests/2",
    ]


def test_cli_prints_one_line_per_check_and_exits_1_on_a_failure(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    edit_yaml(project / "handoff.yaml", lambda s: s.update(image="localhost:1/ml/digits:1"))
    result = handoff("doctor", "--argo-config", "workflows/controller-config", cwd=project, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("FAIL  api server") for line in lines), lines
    assert any(
        line.startswith("FAIL  image") and "cannot reach registry localhost:1" in line for line in lines
    )
    bad = handoff("doctor", "--argo-config", "workflow-controller-configmap", cwd=project, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "error: --argo-config 'workflow-controller-configmap': expected NAMESPACE/NAME of a ConfigMap"
    )
