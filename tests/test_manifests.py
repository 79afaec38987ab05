"""The platform manifests (manifests/): what a cluster admin applies with `kubectl apply -k`.

Every overlay is built with the real kustomize (kubectl's) from the files git would ship, every
object is validated (kubernetes-validate --strict for Kubernetes kinds, the vendored KServe schema
for the ServingRuntime), the RBAC is checked rule by rule, the ServingRuntime's pod is held to Pod
Security "restricted", checkov scans everything (with the Pods lifted out of what the steps emit,
training jobs included), and the runtime's own command starts the real model server.

The controllers' own containers are built here as their sources build them (Argo's init and wait
from the executor setting in manifests/platform; KFP's driver and launcher), since no fake API
server runs Argo or KFP: each such function names the file and version it mirrors.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from handoff import __version__
from handoff.kube.pod_security import violations

from .conftest import TEMPLATE, build, edit_yaml, handoff, kubectl

Obj = dict[str, Any]

MANIFESTS = TEMPLATE / "manifests"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.31"  # the newest schemas kubernetes-validate ships; the PSA pin matches it
OVERLAYS = {"dev": "ml-models-dev", "prod": "ml-models-prod"}
RUNTIME_SCHEMA = TEMPLATE / "tests/schemas/kserve-servingruntime-v1alpha1.schema.json"
PLATFORM_IMAGE = "registry.example.com/platform/ml-handoff"
COMMON_LABELS = {"app.kubernetes.io/part-of": "ml-template", "app.kubernetes.io/managed-by": "kustomize"}
# Exactly the calls the pods make (kube/inference_service.py, kube/train_job.py, Argo's executor,
# KFP's driver and launcher reading their own pod): handoff.doctor_access.needed_rules, which
# tests/test_doctor.py holds equal to the rendered Role.
PIPELINE_RULES = {
    ("serving.kserve.io", "inferenceservices"): {"get", "create", "patch"},
    ("serving.kserve.io", "inferencegraphs"): {"get"},
    ("", "pods"): {"get", "list"},
    ("apps", "deployments"): {"get"},
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "delete"},
    ("kubeflow.org", "pytorchjobs"): {"create", "get", "delete"},
    ("argoproj.io", "workflowtaskresults"): {"create", "patch"},
}

pytestmark = pytest.mark.unit


def checkov() -> str:
    configured = os.environ.get("CHECKOV")
    path = Path(configured) if configured else TEMPLATE / ".venv-checkov/bin/checkov"
    if not path.exists():
        pytest.fail(
            f"checkov not found at {path}: run `make checkov` (requirements/checkov.txt in its own venv, "
            ".venv-checkov), or set CHECKOV to a checkov executable"
        )
    return str(path)


def lift_pods_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lift_pods", TEMPLATE / "scripts/lift_pods.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lift_pods = lift_pods_module()


def fresh_checkout(dest: Path) -> Path:
    """manifests/ as a fresh clone has it: tracked files plus new ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "manifests"],
        cwd=TEMPLATE,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, dict.fromkeys(listed.split("\0"))):
        if (TEMPLATE / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TEMPLATE / name, dest / name)
    return dest / "manifests"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_checkout(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def built(checkout: Path) -> dict[str, list[Obj]]:
    """Every overlay (and the base), built once from the fresh checkout; and the dev overlay with
    the opt-in monitoring component added (``dev+monitoring``), as an environment adds it."""
    monitored = checkout / "overlays" / "dev-monitoring"
    monitored.mkdir()
    dev = yaml.safe_load((checkout / "overlays/dev/kustomization.yaml").read_text())
    (monitored / "kustomization.yaml").write_text(yaml.safe_dump({**dev, "components": ["../../monitoring"]}))
    return (
        {"base": build(checkout / "base")}
        | {name: build(checkout / "overlays" / name) for name in OVERLAYS}
        | {"dev+monitoring": build(monitored)}
    )


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def runtime_pod(objects: list[Obj]) -> Obj:
    pods = lift_pods.lift(objects, service_account="handoff-serving")
    assert len(pods) == 1, pods
    return pods[0]


def strict_errors(obj: Obj) -> str | None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"{obj['kind']} {obj['metadata'].get('name')}: {where}: {exc.message}"
    return None


def restricted_violations(pod: Obj) -> list[str]:
    """What Pod Security admission at "restricted" says of the pod (handoff.kube.pod_security:
    pod-security-admission's checks and messages)."""
    return violations(pod, "restricted")


# --- building --------------------------------------------------------------------------------


def test_every_overlay_builds_from_a_fresh_checkout(built: dict[str, list[Obj]]) -> None:
    kinds = {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ServingRuntime",
        "NetworkPolicy",
        "ResourceQuota",
        "LimitRange",
    }
    for name, objects in built.items():
        assert kinds <= {o["kind"] for o in objects}, name
    assert {o["kind"] for o in built["prod"]} - {o["kind"] for o in built["dev"]} == {"PodDisruptionBudget"}


def test_every_object_lives_in_its_overlays_namespace_with_the_common_labels(
    built: dict[str, list[Obj]],
) -> None:
    for overlay, namespace in OVERLAYS.items():
        objects = built[overlay]
        assert one(objects, "Namespace")["metadata"]["name"] == namespace
        for obj in objects:
            meta = obj["metadata"]
            if obj["kind"] != "Namespace":
                assert meta.get("namespace") == namespace, f"{overlay}: {obj['kind']} {meta['name']}"
            assert COMMON_LABELS.items() <= meta.get("labels", {}).items(), f"{obj['kind']} {meta['name']}"
        # The binding's subject follows the overlay too (a written namespace would not).
        for binding in of_kind(objects, "RoleBinding"):
            assert {s["namespace"] for s in binding["subjects"]} == {namespace}, binding["metadata"]["name"]


def test_the_runtime_runs_the_platform_image_of_this_template_version(built: dict[str, list[Obj]]) -> None:
    for overlay in OVERLAYS:
        runtime = one(built[overlay], "ServingRuntime", "handoff-onnx")
        assert runtime["spec"]["containers"][0]["image"] == f"{PLATFORM_IMAGE}:{__version__}"


# --- validation --------------------------------------------------------------------------------


def test_every_kubernetes_object_validates_strictly(built: dict[str, list[Obj]]) -> None:
    errors, unchecked = [], set()
    for overlay, objects in built.items():
        for obj in objects:
            if obj["kind"] == "ServingRuntime":
                continue  # its own schema, below
            try:
                error = strict_errors(obj)
            except kubernetes_validate.SchemaNotFoundError:
                unchecked.add(f"{obj['apiVersion']} {obj['kind']}")
                continue
            if error:
                errors.append(f"{overlay}: {error}")
    assert errors == []
    assert unchecked == set(), "kinds with no schema to validate against"


def test_the_serving_runtime_matches_kserves_schema_and_its_pod_validates(
    built: dict[str, list[Obj]],
) -> None:
    validator = jsonschema.Draft202012Validator(json.loads(RUNTIME_SCHEMA.read_text()))
    for overlay in OVERLAYS:
        runtime = one(built[overlay], "ServingRuntime", "handoff-onnx")
        assert [e.message for e in validator.iter_errors(runtime)] == []
        # The containers and volumes are core types: validated exactly as the Pod KServe makes.
        assert strict_errors(runtime_pod(built[overlay])) is None
    spec = one(built["prod"], "ServingRuntime")["spec"]
    assert spec["supportedModelFormats"] == [{"name": "onnx", "version": "1", "autoSelect": False}]
    assert spec["protocolVersions"] == ["v2"]


def test_the_runtime_schema_rejects_a_typo() -> None:
    """The vendored schema is strict where the CRD would silently prune (so a typo cannot pass)."""
    validator = jsonschema.Draft202012Validator(json.loads(RUNTIME_SCHEMA.read_text()))
    runtime = yaml.safe_load((MANIFESTS / "base/serving-runtime.yaml").read_text())
    typo = copy.deepcopy(runtime)
    typo["spec"]["protocolVersion"] = typo["spec"].pop("protocolVersions")
    assert any("protocolVersion" in e.message for e in validator.iter_errors(typo))
    bad_format = copy.deepcopy(runtime)
    bad_format["spec"]["supportedModelFormats"][0]["autoselect"] = True
    assert list(validator.iter_errors(bad_format))


def test_lift_pods_reads_kustomize_output_on_the_command_line(checkout: Path) -> None:
    """The README's pipe: `kubectl kustomize ... | python scripts/lift_pods.py --service-account ...`."""
    rendered = subprocess.run(
        [kubectl(), "kustomize", str(checkout / "overlays/prod")], capture_output=True, text=True, check=True
    ).stdout
    done = subprocess.run(
        [sys.executable, str(TEMPLATE / "scripts/lift_pods.py"), "--service-account", "handoff-serving"],
        input=rendered,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (pod,) = yaml.safe_load_all(done.stdout)
    assert (pod["kind"], pod["metadata"]["namespace"]) == ("Pod", "ml-models-prod")
    assert pod["spec"]["serviceAccountName"] == "handoff-serving"


@pytest.mark.parametrize("runtime", ["kserve", "triton"])
def test_the_deploy_steps_inference_service_lifts_to_a_valid_restricted_pod(
    built: dict[str, list[Obj]], project: Path, runtime: str
) -> None:
    """The predictor pod of the InferenceService `handoff deploy` creates in this namespace.

    On handoff-onnx the pod is the runtime merged with the service; Triton's runtime is KServe's
    (cluster-scoped, not here), so only what the service sets is checked for it.
    """
    from handoff.kube.inference_service import Release, manifest
    from handoff.settings import load_settings

    def configure(settings: dict[str, Any]) -> None:
        settings["namespace"] = "ml-models-prod"
        settings["serving"]["kserve"].update(runtime=runtime, service_account="handoff-serving")

    edit_yaml(project / "handoff.yaml", configure)
    release = Release("digits-classifier", "3", "0" * 64, "s3://models/digits-classifier/3/triton")
    isvc = manifest(load_settings(project), release)
    pods = lift_pods.lift([isvc, *built["prod"]])
    (pod,) = [
        p for p in pods if p["metadata"]["annotations"]["lift-pods/from"].startswith("InferenceService")
    ]
    assert pod["metadata"]["labels"]["serving.kserve.io/inferenceservice"] == isvc["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    assert pod["spec"]["automountServiceAccountToken"] is False  # handoff-serving's own setting
    if runtime == "kserve":  # merged with handoff-onnx, as KServe does: the runtime's image and /tmp
        assert container["image"] == f"{PLATFORM_IMAGE}:{__version__}"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert strict_errors(pod) is None
    assert restricted_violations(pod) == []


@pytest.mark.parametrize("runtime", ["kserve", "triton"])
def test_a_raw_deployment_pod_drains_before_it_stops_and_gets_the_serving_settings(
    built: dict[str, list[Obj]], project: Path, runtime: str
) -> None:
    """Raw deployment mode: a preStop sleep (the Service's endpoints drop the pod before SIGTERM)
    and a grace period that covers it and serving.shutdown_grace_s; handoff-onnx also gets
    handoff.yaml's serving settings, over the runtime's default, as KServe merges env by name."""
    from handoff.kube.inference_service import EXIT_MARGIN_S, PRE_STOP_S, Release, manifest
    from handoff.serving.spec import SETTINGS_ENV
    from handoff.settings import load_settings

    def configure(settings: dict[str, Any]) -> None:
        settings["namespace"] = "ml-models-prod"
        settings["serving"].update(shutdown_grace_s=12.5, max_concurrency=9)
        settings["serving"]["kserve"].update(runtime=runtime, service_account="handoff-serving")

    edit_yaml(project / "handoff.yaml", configure)
    release = Release("digits-classifier", "3", "0" * 64, "s3://models/digits-classifier/3/triton")
    isvc = manifest(load_settings(project), release, raw=True)
    assert "{{" not in json.dumps(isvc)  # KServe renders the merged container as a Go template
    (pod,) = [
        p
        for p in lift_pods.lift([isvc, *built["prod"]])
        if p["metadata"]["annotations"]["lift-pods/from"].startswith("InferenceService")
    ]
    assert strict_errors(pod) is None
    assert restricted_violations(pod) == []
    container = pod["spec"]["containers"][0]
    assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": PRE_STOP_S}}}
    assert pod["spec"]["terminationGracePeriodSeconds"] == PRE_STOP_S + 13 + EXIT_MARGIN_S
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    if runtime == "kserve":
        settings = json.loads(env[SETTINGS_ENV])
        assert (settings["model_version"], settings["max_concurrency"]) == ("3", 9)
        assert settings["shutdown_grace_s"] == 12.5
    else:
        assert SETTINGS_ENV not in env  # Triton has its own settings (config.pbtxt)


# --- Pod Security ------------------------------------------------------------------------------


def test_every_namespace_enforces_pod_security_restricted(built: dict[str, list[Obj]]) -> None:
    for overlay, objects in built.items():
        labels = one(objects, "Namespace")["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", (overlay, mode)
        assert labels["pod-security.kubernetes.io/enforce-version"] == f"v{KUBERNETES_VERSION}"


def test_the_runtime_pod_passes_pod_security_restricted(built: dict[str, list[Obj]]) -> None:
    for overlay in OVERLAYS:
        pod = runtime_pod(built[overlay])
        assert restricted_violations(pod) == [], overlay
        container = pod["spec"]["containers"][0]
        ctx = container["securityContext"]
        assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["readOnlyRootFilesystem"]) == (10001, 10001, True)
        # A read-only root needs a writable /tmp (HOME and the server spec live there).
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert pod["spec"]["automountServiceAccountToken"] is False  # from handoff-serving


def test_the_restricted_check_catches_what_admission_would_reject(built: dict[str, list[Obj]]) -> None:
    """Each check, worded and ordered as the API server refuses the pod (pod-security-admission
    v0.36.2): host namespaces, ports and volumes too, and a pod-level setting the container
    overrides is refused all the same (every check looks at the pod's own context)."""
    pod = runtime_pod(built["prod"])
    container = pod["spec"]["containers"][0]
    ctx = container["securityContext"]
    ctx.pop("runAsNonRoot"), ctx.pop("seccompProfile")
    ctx["allowPrivilegeEscalation"] = True
    ctx["capabilities"] = {"add": ["NET_ADMIN"]}
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["spec"]["hostNetwork"] = True
    container["ports"] = [{"containerPort": 8080, "hostPort": 8080}]
    assert restricted_violations(pod) == [
        "host namespaces (hostNetwork=true)",
        'hostPort (container "kserve-container" uses hostPort 8080)',
        'allowPrivilegeEscalation != false (container "kserve-container" must set '
        "securityContext.allowPrivilegeEscalation=false)",
        'unrestricted capabilities (container "kserve-container" must set securityContext.capabilities.drop='
        '["ALL"]; container "kserve-container" must not include "NET_ADMIN" in '
        "securityContext.capabilities.add)",
        'restricted volume types (volume "host" uses restricted volume type "hostPath")',
        'runAsNonRoot != true (pod or container "kserve-container" must set '
        "securityContext.runAsNonRoot=true)",
        'seccompProfile (pod or container "kserve-container" must set securityContext.seccompProfile.type to '
        '"RuntimeDefault" or "Localhost")',
    ]
    # The container's own settings do not cover for the pod's.
    fixed = runtime_pod(built["prod"])
    fixed["spec"]["securityContext"] = {
        "runAsNonRoot": False,
        "runAsUser": 0,
        "seccompProfile": {"type": "Unconfined"},
    }
    assert restricted_violations(fixed) == [
        "runAsNonRoot != true (pod must not set securityContext.runAsNonRoot=false)",
        "runAsUser=0 (pod must not set runAsUser=0)",
        'seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")',
    ]


# --- the controllers' own containers: manifests/platform ------------------------------------------
#
# Argo adds an init and a wait container to every workflow pod (KFP's driver and step pods are
# Argo pods too) and builds them from its own ConfigMap, not from the workflow. What follows
# builds them as the controller does, from the `executor` setting of each kustomization in
# manifests/platform, and holds the pods to "restricted" and to what the kubelet starts.

PLATFORM = {"argo": "argo", "kubeflow": "kubeflow"}  # folder under manifests/platform: namespace
# argo-workflows v4.0.5 (the Argo KFP 2.17.0 pins): the controller's default executor image when
# neither `--executor-image` nor the executor setting names one (workflow/controller/config.go,
# executorImage). Its Dockerfile's `argoexec` stage sets no USER, so it runs as root; the
# `argoexec-nonroot` stage runs as 8737. KFP's launcher and driver images run as 65532
# (kubeflow/pipelines 2.17.0 backend/Dockerfile.launcher, Dockerfile.driver); the project image
# as 10001 (components/Dockerfile).
ARGOEXEC_IMAGE = "quay.io/argoproj/argoexec:v4.0.5"
IMAGE_USERS = {
    ARGOEXEC_IMAGE: 0,
    f"{ARGOEXEC_IMAGE}-nonroot": 8737,
    "kfp-launcher": 65532,
    "kfp-driver": 65532,
    PLATFORM_IMAGE: 10001,
}
# kubeflow/pipelines 2.17.0 (also 2.16.0) manifests/kustomize/third-party/argo/base/
# workflow-controller-configmap-patch.yaml: the executor setting KFP installs for its Argo.
KFP_SHIPPED_EXECUTOR = {
    "imagePullPolicy": "IfNotPresent",
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
}


@pytest.fixture(scope="module")
def platform(checkout: Path) -> dict[str, list[Obj]]:
    """Each kustomization a platform admin applies in a controller's namespace, built once."""
    return {name: build(checkout / "platform" / name) for name in [*PLATFORM, "kubeflow-single-user"]}


def executor_setting(objects: list[Obj]) -> Obj:
    """The workflow-controller-configmap's `executor` value, parsed as Argo parses it (a
    YAML document holding a Container: argo-workflows v4.0.5 config/config.go, `Executor`)."""
    config = one(objects, "ConfigMap", "workflow-controller-configmap")
    return yaml.safe_load(config.get("data", {}).get("executor") or "{}") or {}


def argo_executor_container(name: str, executor: Obj) -> Obj:
    """An init or wait container as Argo builds it.

    argo-workflows v4.0.5 workflow/controller/workflowpod.go: newExecContainer takes the image
    (config.go executorImage), pull policy, resources, args and the security context verbatim
    from the executor setting; standardInitContainer and newWaitContainer only add the command.
    (Its one exception, common.MinimalCtrSC for resource templates, does not apply: handoff's
    templates are containers and scripts.)
    """
    container: Obj = {
        "name": name,
        "image": executor.get("image") or ARGOEXEC_IMAGE,
        "command": ["argoexec", name],
    }
    for field in ("imagePullPolicy", "resources", "securityContext", "args"):
        if executor.get(field):
            container[field] = copy.deepcopy(executor[field])
    # createWorkflowPod: every container mounts var-run-argo; executor-image containers among
    # the pod's containers (wait) also get a /tmp of their own on the tmp-dir-argo emptyDir.
    container["volumeMounts"] = [{"name": "var-run-argo", "mountPath": "/var/run/argo"}]
    if name == "wait":
        container["volumeMounts"].append({"name": "tmp-dir-argo", "mountPath": "/tmp", "subPath": "0"})
    return container


def argo_workflow_pod(lifted: Obj, executor: Obj) -> Obj:
    """A lifted workflow template's pod with what Argo's controller adds (createWorkflowPod):
    the init container first, the wait container before main, and their two emptyDirs. The pod's
    security context stays the template's or the workflow's (addSchedulingConstraints)."""
    pod = copy.deepcopy(lifted)
    spec = pod["spec"]
    spec["initContainers"] = [argo_executor_container("init", executor), *spec.get("initContainers", [])]
    spec["containers"] = [argo_executor_container("wait", executor), *spec["containers"]]
    spec["volumes"] = [
        {"name": "var-run-argo", "emptyDir": {}},
        {"name": "tmp-dir-argo", "emptyDir": {}},
        *spec.get("volumes", []),
    ]
    return pod


def run_as(container: Obj, pod: Obj) -> int | None:
    """The uid the container's process gets: its own runAsUser, the pod's, else its image's USER."""
    ctx, pod_ctx = container.get("securityContext", {}), pod["spec"].get("securityContext", {})
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    if uid is None:
        uid = IMAGE_USERS.get(container["image"].split("@")[0])
    return None if uid is None else int(uid)


def kubelet_refusals(pod: Obj) -> list[str]:
    """Containers the kubelet would not start: runAsNonRoot with an image that runs as root
    ("container has runAsNonRoot and image will run as root")."""
    found = []
    pod_ctx = pod["spec"].get("securityContext", {})
    for container in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
        non_root = container.get("securityContext", {}).get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        if non_root and not run_as(container, pod):
            found.append(f"{container['name']}: runAsNonRoot, and {container['image']} runs as root")
    return found


def argo_pods(project: Path, executor: Obj) -> list[Obj]:
    """Every step pod of the project's compiled WorkflowTemplate, as Argo's controller makes it."""
    compiled = handoff("compile", "--target", "argo", cwd=project)
    assert compiled.returncode == 0, compiled.stderr
    template = yaml.safe_load((project / "compiled/workflow-template.argo.yaml").read_text())
    return [argo_workflow_pod(pod, executor) for pod in lift_pods.lift([template])]


def test_the_platform_kustomizations_build_and_stay_in_the_controllers_namespaces(
    platform: dict[str, list[Obj]],
) -> None:
    """They configure Argo and KFP where those run, never a project's namespace."""
    for name, namespace in PLATFORM.items():
        (config,) = platform[name]  # the executor key and nothing else: server-side apply owns only it
        assert (config["kind"], config["metadata"]) == (
            "ConfigMap",
            {"name": "workflow-controller-configmap", "namespace": namespace},
        )
        assert list(config["data"]) == ["executor"]
        assert strict_errors(config) is None
    for obj in platform["kubeflow-single-user"]:
        assert obj["metadata"]["namespace"] == "kubeflow"
        assert strict_errors(obj) is None
    # KFP 2.16.0 and later install this very value; the component is for installs without it.
    assert executor_setting(platform["kubeflow"]) == KFP_SHIPPED_EXECUTOR


def test_argos_own_containers_in_the_steps_pods_pass_restricted_with_the_argo_config(
    platform: dict[str, list[Obj]], project: Path
) -> None:
    """Argo's init and wait in every step pod pass "restricted", start, and run as the step's
    user: the init container unpacks input artifacts with their archived modes (argo-workflows
    v4.0.5 workflow/executor/executor.go, untar) and the steps write their files 0600."""
    pods = argo_pods(project, executor_setting(platform["argo"]))
    assert {p["metadata"]["name"].rsplit("-", 1)[-1] for p in pods} >= {"train", "deploy", "outcome"}
    for pod in pods:
        name = pod["metadata"]["name"]
        assert restricted_violations(pod) == [], name
        assert kubelet_refusals(pod) == [], name
        assert strict_errors(pod) is None, name
        init, wait, main = pod["spec"]["initContainers"][0], *pod["spec"]["containers"][:2]
        assert (init["name"], wait["name"], main["name"]) == ("init", "wait", "main")
        assert run_as(init, pod) == run_as(wait, pod) == run_as(main, pod) == 10001, name


def test_argos_default_executor_is_refused_by_restricted(project: Path) -> None:
    """Why the platform config exists: with Argo's default (no executor setting) the init and
    wait containers of every step pod carry no security context and admission refuses the pod."""
    for pod in argo_pods(project, {}):
        # Only init and wait are named: the steps' own containers pass.
        assert restricted_violations(pod) == [
            'allowPrivilegeEscalation != false (containers "init", "wait" must set '
            "securityContext.allowPrivilegeEscalation=false)",
            'unrestricted capabilities (containers "init", "wait" must set securityContext.capabilities.drop='
            '["ALL"])',
        ]


def kfp_pods(k8s_config: Obj, executor: Obj, *, backend: tuple[int, int]) -> dict[str, Obj]:
    """One step's pods on Kubeflow Pipelines: its driver pod and its executor pod, security only.

    From 2.16.0 (kubeflow/pipelines 2.17.0 backend/src/v2/compiler/argocompiler/
    security_context.go): the driver template gets the full default (pod: runAsNonRoot and
    RuntimeDefault seccomp; container: no privilege escalation, ALL dropped, seccomp,
    runAsNonRoot); the executor template gets the pod's seccomp only, its step container no
    privilege escalation, ALL dropped and seccomp, its kfp-launcher init container the full
    default; then the driver patches the step container with the task's kfp-kubernetes
    securityContext (driver/k8s.go). Before 2.16.0 (2.15.0 argocompiler/container.go) none of it:
    no security context anywhere, and the driver drops the task's. Argo adds init and wait to
    both pods from its executor setting.
    """
    hardened = backend >= (2, 16)
    full = {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    step: Obj = {"name": "main", "image": PLATFORM_IMAGE, "securityContext": {}}
    launcher: Obj = {"name": "kfp-launcher", "image": "kfp-launcher", "securityContext": {}}
    driver: Obj = {"name": "main", "image": "kfp-driver", "securityContext": {}}
    driver_pod: Obj = {"spec": {"containers": [driver]}}
    executor_pod: Obj = {"spec": {"initContainers": [launcher], "containers": [step]}}
    if hardened:
        driver_pod["spec"]["securityContext"] = {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        driver["securityContext"] = dict(full)
        executor_pod["spec"]["securityContext"] = {"seccompProfile": {"type": "RuntimeDefault"}}
        step["securityContext"] = {k: v for k, v in full.items() if k != "runAsNonRoot"}
        launcher["securityContext"] = dict(full)
        task = k8s_config.get("securityContext", {})
        for field in ("runAsUser", "runAsGroup"):
            if field in task:
                step["securityContext"][field] = int(task[field])
        if "runAsNonRoot" in task:
            step["securityContext"]["runAsNonRoot"] = task["runAsNonRoot"]
    pods = {"driver": driver_pod, "executor": executor_pod}
    for name, pod in pods.items():
        pod.update(apiVersion="v1", kind="Pod", metadata={"name": name})
        pod["spec"]["initContainers"] = [
            argo_executor_container("init", executor),
            *pod["spec"].get("initContainers", []),
        ]
        pod["spec"]["containers"] = [argo_executor_container("wait", executor), *pod["spec"]["containers"]]
        pod["spec"]["volumes"] = [
            {"name": "var-run-argo", "emptyDir": {}},
            {"name": "tmp-dir-argo", "emptyDir": {}},
        ]
    return pods


def kfp_task_configs(project: Path) -> dict[str, Obj]:
    """The kfp-kubernetes settings of each step, from the project's compiled KFP pipeline."""
    compiled = handoff("compile", "--target", "kfp", cwd=project)
    assert compiled.returncode == 0, compiled.stderr
    _, platform_spec = yaml.safe_load_all((project / "compiled/pipeline.kfp.yaml").read_text())
    return platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_kfp_pods_pass_restricted_from_backend_2_16_with_the_kfp_config(
    platform: dict[str, list[Obj]], project: Path
) -> None:
    executors = kfp_task_configs(project)
    assert {"exec-train", "exec-deploy"} <= set(executors)
    kfp_config = executor_setting(platform["kubeflow"])
    for name, task in executors.items():
        # The step's own user reaches its container only through kfp-kubernetes, honoured from 2.16.0.
        assert task["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}
        pods = kfp_pods(task, kfp_config, backend=(2, 17))
        for which, pod in pods.items():
            assert restricted_violations(pod) == [], (name, which)
            assert kubelet_refusals(pod) == [], (name, which)
        wait, step = pods["executor"]["spec"]["containers"]
        assert (run_as(step, pods["executor"]), run_as(wait, pods["executor"])) == (10001, 65532)
        # Before 2.16 KFP's own driver and launcher carry no security context: no executor
        # setting can fix those (README: KFP 2.16.0 or later for a "restricted" namespace).
        old = kfp_pods(task, kfp_config, backend=(2, 15))
        assert (
            'allowPrivilegeEscalation != false (container "main" must set '
            "securityContext.allowPrivilegeEscalation=false)"
        ) in restricted_violations(old["driver"])
        assert (
            'unrestricted capabilities (containers "kfp-launcher", "main" must set '
            'securityContext.capabilities.drop=["ALL"])'
        ) in restricted_violations(old["executor"])


def test_kfp_pods_need_the_executor_to_name_its_user(platform: dict[str, list[Obj]], project: Path) -> None:
    """KFP's step pods set no pod-level user, so Argo's init and wait would take argoexec's root
    user: the Argo config (made for handoff's own WorkflowTemplates, whose pods name the user)
    passes admission there but the kubelet refuses to start init. Hence two settings."""
    task = kfp_task_configs(project)["exec-train"]
    pod = kfp_pods(task, executor_setting(platform["argo"]), backend=(2, 17))["executor"]
    assert restricted_violations(pod) == []
    assert kubelet_refusals(pod) == [
        f"init: runAsNonRoot, and {ARGOEXEC_IMAGE} runs as root",
        f"wait: runAsNonRoot, and {ARGOEXEC_IMAGE} runs as root",
    ]


# --- RBAC --------------------------------------------------------------------------------------


def rule_map(role: Obj) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                found.setdefault((group, resource), set()).update(rule["verbs"])
    return found


def test_the_pipeline_account_gets_exactly_what_the_steps_use(built: dict[str, list[Obj]]) -> None:
    for overlay, objects in built.items():
        assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding"), overlay
        role = one(objects, "Role", "handoff-pipeline")
        assert rule_map(role) == PIPELINE_RULES, overlay
        binding = one(objects, "RoleBinding", "handoff-pipeline")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "handoff-pipeline",
        }
        assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [
            ("ServiceAccount", "handoff-pipeline")
        ]


def test_no_role_has_wildcards_secrets_or_exec(built: dict[str, list[Obj]]) -> None:
    forbidden = {
        "secrets",
        "pods/exec",
        "pods/attach",
        "pods/portforward",
        "pods/proxy",
        "serviceaccounts/token",
    }
    escalating = {"escalate", "bind", "impersonate"}
    for overlay, objects in built.items():
        for role in of_kind(objects, "Role"):
            for rule in role["rules"]:
                values = [
                    *rule["apiGroups"],
                    *rule["resources"],
                    *rule["verbs"],
                    *rule.get("resourceNames", []),
                ]
                assert not any("*" in v for v in values), (overlay, rule)
                assert not forbidden & set(rule["resources"]), (overlay, rule)
                assert not escalating & set(rule["verbs"]), (overlay, rule)


def test_only_the_pipeline_account_is_bound_and_the_others_carry_no_token(
    built: dict[str, list[Obj]],
) -> None:
    for name, objects in built.items():
        bound = {s["name"] for b in of_kind(objects, "RoleBinding") for s in b["subjects"]}
        assert bound == {"handoff-pipeline"}
        accounts = {a["metadata"]["name"]: a for a in of_kind(objects, "ServiceAccount")}
        # The monitoring component's collector has an account of its own, without a token either.
        collector = {"handoff-payload-collector"} if name == "dev+monitoring" else set()
        assert set(accounts) == {"handoff-pipeline", "handoff-serving", "default", *collector}
        for account in ("handoff-serving", "default", *collector):
            assert accounts[account]["automountServiceAccountToken"] is False


def test_the_kfp_component_reads_two_named_objects_and_nothing_else(checkout: Path) -> None:
    overlay = checkout / "overlays/kfp-check"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "namespace: ml-models-kfp\nresources: [../dev]\ncomponents: [../../components/kfp]\n"
    )
    objects = build(overlay)
    role = one(objects, "Role", "handoff-pipeline-kfp-launcher")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"], "verbs": ["get"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["mlpipeline-minio-artifact"],
            "verbs": ["get"],
        },
    ]
    binding = one(objects, "RoleBinding", "handoff-pipeline-kfp-launcher")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "handoff-pipeline", "namespace": "ml-models-kfp"}
    ]
    assert all(strict_errors(o) is None for o in (role, binding))


# --- KFP's modes: single-user (pods in `kubeflow`) and multi-user (a Profile's namespace) ---------

# kubeflow/dashboard v2.0.0 components/profile-controller/manifests/kustomize/base/crd/
# kubeflow.org_profiles.yaml, version v1 (scope: Cluster), made strict (unknown fields rejected)
# where the CRD lists its fields; resourceQuotaSpec and plugins are left open here.
PROFILE_SCHEMA: Obj = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "Profile"},
        "metadata": {"type": "object", "required": ["name"], "not": {"required": ["namespace"]}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["owner"],
            "properties": {
                "owner": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["kind", "name"],
                    "properties": {
                        "apiGroup": {"type": "string"},
                        "kind": {"enum": ["User", "Group", "ServiceAccount"]},
                        "name": {"type": "string", "minLength": 1},
                        "namespace": {"type": "string"},
                    },
                },
                "plugins": {"type": "array", "items": {"type": "object"}},
                "resourceQuotaSpec": {"type": "object"},
            },
        },
    },
}
# What KFP's profile controller puts in every Profile namespace (kubeflow/pipelines 2.17.0
# manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py): the
# manifests must not create any of them, or the two would fight over them.
KFP_PROFILE_OBJECTS = {
    ("ConfigMap", "kfp-launcher"),
    ("ConfigMap", "metadata-grpc-configmap"),
    ("ConfigMap", "artifact-repositories"),
    ("Secret", "mlpipeline-minio-artifact"),
    ("Deployment", "ml-pipeline-ui-artifact"),
    ("Service", "ml-pipeline-ui-artifact"),
}


def test_the_multi_user_overlay_leaves_the_namespace_to_a_profile(checkout: Path) -> None:
    objects = build(checkout / "overlays/prod-multi-user")
    assert of_kind(objects, "Namespace") == []  # the Profile's controller creates it
    profile = one(objects, "Profile")
    namespace = OVERLAYS["prod"]
    assert profile["metadata"]["name"] == namespace  # a Profile's name is its namespace's
    assert [e.message for e in jsonschema.Draft202012Validator(PROFILE_SCHEMA).iter_errors(profile)] == []
    namespaced = [o for o in objects if o["kind"] != "Profile"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {namespace}
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} & KFP_PROFILE_OBJECTS == set()
    # Everything else of production, and what KFP's launcher reads as handoff-pipeline.
    prod = {(o["kind"], o["metadata"]["name"]) for o in build(checkout / "overlays/prod")}
    assert {(o["kind"], o["metadata"]["name"]) for o in namespaced} == prod - {("Namespace", namespace)} | {
        ("Role", "handoff-pipeline-kfp-launcher"),
        ("RoleBinding", "handoff-pipeline-kfp-launcher"),
    }
    for obj in namespaced:
        assert COMMON_LABELS.items() <= obj["metadata"].get("labels", {}).items(), obj["metadata"]["name"]
        if obj["kind"] != "ServingRuntime":
            assert strict_errors(obj) is None


def test_the_profile_schema_rejects_what_the_crd_would(checkout: Path) -> None:
    validator = jsonschema.Draft202012Validator(PROFILE_SCHEMA)
    profile = yaml.safe_load((checkout / "overlays/prod-multi-user/profile.yaml").read_text())
    assert list(validator.iter_errors(profile)) == []
    misspelt = copy.deepcopy(profile)
    misspelt["spec"]["owners"] = misspelt["spec"].pop("owner")
    assert list(validator.iter_errors(misspelt))
    namespaced = copy.deepcopy(profile)
    namespaced["metadata"]["namespace"] = "ml-models-prod"  # cluster-scoped
    assert list(validator.iter_errors(namespaced))


def test_single_user_kfp_gets_the_pipeline_account_in_kubeflow(
    platform: dict[str, list[Obj]], checkout: Path
) -> None:
    """Single-user KFP runs every pod in `kubeflow`: the account is made there, with only what
    its pods do there, and the environment's Role is bound to it across namespaces."""
    objects = platform["kubeflow-single-user"]
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == {
        ("ServiceAccount", "handoff-pipeline"),
        ("Role", "handoff-pipeline"),
        ("RoleBinding", "handoff-pipeline"),
    }
    role = one(objects, "Role")
    assert rule_map(role) == {
        ("argoproj.io", "workflowtaskresults"): {"create", "patch"},
        ("", "configmaps"): {"get"},
        ("", "secrets"): {"get"},
        ("", "pods"): {"get"},
    }
    named = {tuple(r["resources"]): r.get("resourceNames") for r in role["rules"]}
    assert named[("configmaps",)] == ["kfp-launcher"] and named[("secrets",)] == ["mlpipeline-minio-artifact"]
    assert one(objects, "RoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "handoff-pipeline", "namespace": "kubeflow"}
    ]

    overlay = checkout / "overlays/kfp-single-user-check"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "namespace: ml-models-kfp\nresources: [../dev]\ncomponents: [../../components/kfp-single-user]\n"
    )
    env = build(overlay)
    binding = one(env, "RoleBinding", "handoff-pipeline-kfp-single-user")
    assert binding["roleRef"]["name"] == "handoff-pipeline"  # the environment's Role, nothing more
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "handoff-pipeline", "namespace": "kubeflow"}
    ]
    policy = one(env, "NetworkPolicy", "allow-ingress-to-predictors-from-kfp")["spec"]
    assert policy["ingress"] == [
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}}]}
    ]
    assert all(
        strict_errors(o) is None
        for o in (binding, one(env, "NetworkPolicy", "allow-ingress-to-predictors-from-kfp"))
    )


# --- network policy --------------------------------------------------------------------------------


def test_network_policy_denies_by_default_and_opens_only_named_paths(built: dict[str, list[Obj]]) -> None:
    for overlay, objects in built.items():
        policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
        deny = policies["default-deny"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, overlay
        # Predictors: from the serving data plane's namespaces only (plus the namespace itself).
        predictors = policies["allow-ingress-to-predictors"]
        assert predictors["podSelector"] == {
            "matchExpressions": [{"key": "serving.kserve.io/inferenceservice", "operator": "Exists"}]
        }
        sources = [peer["namespaceSelector"]["matchLabels"] for peer in predictors["ingress"][0]["from"]]
        assert sources == [
            {"kubernetes.io/metadata.name": "istio-system"},
            {"kubernetes.io/metadata.name": "knative-serving"},
        ]
        for name, spec in policies.items():
            for rule in spec.get("ingress", []):
                for peer in rule["from"]:
                    assert "ipBlock" not in peer, (overlay, name)  # nothing from outside the cluster
            for rule in spec.get("egress", []):
                for peer in rule["to"]:
                    if "ipBlock" in peer:  # outside the cluster: by port, never the metadata endpoint
                        assert rule.get("ports"), (overlay, name)
                        assert "169.254.169.254/32" in peer["ipBlock"].get("except", []), (overlay, name)
        dns = policies["allow-egress-dns"]["egress"]
        assert dns == [
            {
                "to": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }
        ]
        https_ports = {p["port"] for p in policies["allow-egress-https"]["egress"][0]["ports"]}
        assert https_ports == {443, 6443}  # object storage and the API server


# --- quotas and the gpu component ----------------------------------------------------------------


def quota(objects: list[Obj]) -> dict[str, str]:
    return one(objects, "ResourceQuota", "compute")["spec"]["hard"]


def test_production_has_gpus_and_development_does_not(built: dict[str, list[Obj]]) -> None:
    dev, prod = built["dev"], built["prod"]
    assert quota(prod)["requests.nvidia.com/gpu"] == "8"
    assert not any("nvidia.com/gpu" in key for key in quota(dev))
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert one(prod, "ServingRuntime")["spec"]["tolerations"] == [toleration]
    assert "tolerations" not in one(dev, "ServingRuntime")["spec"]
    # Tolerate, never require: CPU predictors must not be pushed onto GPU nodes.
    assert "nodeSelector" not in one(prod, "ServingRuntime")["spec"]


def test_quotas_are_sized_per_environment(built: dict[str, list[Obj]]) -> None:
    dev, prod = quota(built["dev"]), quota(built["prod"])
    for key in ("requests.cpu", "limits.cpu", "pods"):
        assert int(dev[key]) < int(prod[key]), key
    for q in (dev, prod):
        assert (q["services.nodeports"], q["services.loadbalancers"]) == ("0", "0")
    # With a cpu/memory quota every container needs requests and limits: the LimitRange supplies them.
    for overlay in OVERLAYS:
        limits = one(built[overlay], "LimitRange")["spec"]["limits"][0]
        assert {"default", "defaultRequest", "max"} <= set(limits)
    assert one(built["prod"], "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# --- the WorkflowTemplate slot -------------------------------------------------------------------


def test_a_compiled_workflow_template_dropped_in_the_slot_lands_in_each_environment(
    checkout: Path, project: Path, tmp_path: Path
) -> None:
    """What `handoff compile --target argo` writes, kept with the manifests: it joins every overlay."""
    compiled = subprocess.run(
        [str(BIN / "handoff"), "compile", "--target", "argo"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compiled.returncode == 0, compiled.stderr
    template = yaml.safe_load((project / "compiled/workflow-template.argo.yaml").read_text())
    clone = Path(shutil.copytree(checkout, tmp_path / "manifests"))
    slot = clone / "workflow-templates"
    shutil.copy(project / "compiled/workflow-template.argo.yaml", slot / "digits-classifier.argo.yaml")
    kustomization = yaml.safe_load((slot / "kustomization.yaml").read_text())
    kustomization["resources"] = ["digits-classifier.argo.yaml"]
    (slot / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for overlay, namespace in OVERLAYS.items():
        placed = one(build(clone / "overlays" / overlay), "WorkflowTemplate")
        assert placed["metadata"]["namespace"] == namespace
        assert COMMON_LABELS.items() <= placed["metadata"]["labels"].items()
        assert placed["spec"] == template["spec"]  # the compiled spec is left as it was
        assert placed["spec"]["serviceAccountName"] == "handoff-pipeline"  # the account bound here
        pods = lift_pods.lift([placed])
        assert pods, "no container templates lifted"
        for pod in pods:
            assert strict_errors(pod) is None
            assert restricted_violations(pod) == [], pod["metadata"]["name"]


def test_the_slot_is_empty_by_default(built: dict[str, list[Obj]]) -> None:
    for objects in built.values():
        assert not of_kind(objects, "WorkflowTemplate")


# --- checkov -----------------------------------------------------------------------------------


PROJECT_IMAGE = "registry.example.com/ml/digits-classifier"
DIGEST_IMAGE = f"{PROJECT_IMAGE}@sha256:{'0' * 64}"
# The image checks: what changes between a compile against CI's digest and one without --image.
IMAGE_CHECKS = ("CKV_K8S_14", "CKV_K8S_15", "CKV_K8S_43")


def train_jobs(project: Path, out: Path, image: str | None, prefix: str) -> list[Obj]:
    """The TrainJob and the PyTorchJob a two-node train step creates, as `handoff compile` writes
    them (compiled/train-job.yaml), named ``<prefix>-<api>``."""
    from handoff_pipelines.compiled import TRAIN_JOB_FILE, compile_project

    jobs = []
    original = (project / "handoff.yaml").read_text()
    for api in ("trainjob", "pytorchjob"):

        def two_nodes(settings: dict[str, Any], api: str = api) -> None:
            settings["training"].update(nodes=2, gpus=1)
            settings["training"]["job"].update(api=api, workspace_claim="checkpoints")

        edit_yaml(project / "handoff.yaml", two_nodes)
        compile_project(project, out / f"{prefix}-{api}", image=image, targets=("kfp",))
        job = yaml.safe_load((out / f"{prefix}-{api}" / TRAIN_JOB_FILE).read_text())
        job["metadata"]["name"] = f"{prefix}-{api}"
        jobs.append(job)
    (project / "handoff.yaml").write_text(original)
    return jobs


def emitted_by_the_steps(project: Path, out: Path) -> tuple[list[Obj], list[Obj]]:
    """What the steps put on a cluster, as CI compiles it (against the digest it pushed): the
    WorkflowTemplate, both kinds of multi-node training job and both kinds of predictor; and,
    second, what a compile without --image puts there instead (handoff.yaml's tag), renamed
    (``digits-classifier-tag``, ``digits-tag-*``) so that its skips cannot cover CI's."""
    from handoff.kube.inference_service import Release, manifest
    from handoff.settings import load_settings

    def workflow_template(*image: str) -> Obj:
        compiled = handoff("compile", "--target", "argo", *image, cwd=project)
        assert compiled.returncode == 0, compiled.stderr
        return dict(yaml.safe_load((project / "compiled/workflow-template.argo.yaml").read_text()))

    pinned = [workflow_template("--image", DIGEST_IMAGE), *train_jobs(project, out, DIGEST_IMAGE, "digits")]
    release = Release("digits-classifier", "3", "0" * 64, "s3://models/digits-classifier/3/triton")
    for runtime in ("triton", "kserve"):
        edit_yaml(project / "handoff.yaml", lambda s, r=runtime: s["serving"]["kserve"].update(runtime=r))
        isvc = manifest(load_settings(project), release)
        isvc["metadata"]["name"] = f"digits-{runtime}"
        pinned.append(isvc)
    tagged = workflow_template()
    tagged["metadata"]["name"] = "digits-classifier-tag"
    return pinned, [tagged, *train_jobs(project, out, None, "digits-tag")]


def in_namespace(objects: list[Obj], namespace: str) -> list[Obj]:
    """Copies of ``objects`` in ``namespace`` (the project's handoff.yaml names the overlay's)."""
    moved = copy.deepcopy(objects)
    for obj in moved:
        obj["metadata"]["namespace"] = namespace
    return moved


def checkov_failures(folder: Path, checks: tuple[str, ...] = ()) -> set[tuple[str, str]]:
    """(check, object name) for each checkov finding in ``folder`` (a lifted Pod goes by its own
    name, the name of what it was lifted from plus its part)."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"}
    only = ["--check", ",".join(checks)] if checks else []
    done = subprocess.run(
        [
            checkov(),
            "-d",
            str(folder),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--quiet",
            "-o",
            "json",
            *only,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: findings, read below
    reports = json.loads(done.stdout)
    report = (
        reports if isinstance(reports, dict) else next(r for r in reports if r["check_type"] == "kubernetes")
    )
    summary = report["summary"]
    assert summary["parsing_errors"] == 0 and summary["passed"] > (100 if not checks else 10), summary
    return {(f["check_id"], f["resource"].rsplit(".", 1)[-1]) for f in report["results"]["failed_checks"]}


def test_checkov_finds_nothing_beyond_the_documented_skips(
    built: dict[str, list[Obj]], project: Path, tmp_path: Path
) -> None:
    """checkov over every overlay, and the Pods lifted out of the ServingRuntime, the compiled
    Argo WorkflowTemplate, the TrainJob's and the PyTorchJob's nodes and the InferenceServices
    the deploy step creates; then the image checks over a compile without --image."""
    pinned, tagged = emitted_by_the_steps(project, tmp_path / "compiled")
    scan, scan_tagged = tmp_path / "scan", tmp_path / "scan-tagged"
    scan.mkdir(), scan_tagged.mkdir()
    for overlay, namespace in OVERLAYS.items():
        objects = built[overlay]
        (scan / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
        # Lifted with the overlay's ServiceAccounts: a pod gets its account's token setting.
        pods = lift_pods.lift(objects + in_namespace(pinned, namespace), service_account="handoff-serving")
        (scan / f"{overlay}-lifted-pods.yaml").write_text(yaml.safe_dump_all(pods))
        lifted = [
            p
            for p in pods
            if p["metadata"]["annotations"]["lift-pods/from"].startswith(("TrainJob", "PyTorchJob"))
        ]
        assert {p["metadata"]["name"] for p in lifted} == {
            "digits-trainjob-node",
            "digits-pytorchjob-master",
            "digits-pytorchjob-worker",
        }
        for pod in lifted:
            assert strict_errors(pod) is None
            assert restricted_violations(pod) == []
        tagged_pods = lift_pods.lift(objects + in_namespace(tagged, namespace))
        (scan_tagged / f"{overlay}-lifted-pods.yaml").write_text(yaml.safe_dump_all(tagged_pods))
    # The training nodes never call the API server: a PyTorchJob's carry no token in any
    # namespace. (A TrainJob cannot say so; its nodes take the namespace's `default` account,
    # which mounts none here: lifted above with the overlay's ServiceAccounts.)
    (pytorchjob,) = [job for job in pinned if job["kind"] == "PyTorchJob"]
    assert [p["spec"]["automountServiceAccountToken"] for p in lift_pods.lift([pytorchjob])] == [False, False]
    # The monitoring component (no overlay adds it: each environment sets its bucket first).
    added = [o for o in built["dev+monitoring"] if o not in built["dev"]]
    (scan / "monitoring.yaml").write_text(yaml.safe_dump_all(added))
    failed = checkov_failures(scan) | checkov_failures(scan_tagged, IMAGE_CHECKS)
    skips = yaml.safe_load((MANIFESTS / "checkov-skips.yaml").read_text())
    assert all(s.get("reason", "").strip() for s in skips), "every skip needs its reason"
    allowed = {(s["check"], r) for s in skips for r in s.get("resources") or [s["resource"]]}
    assert failed - allowed == set(), (
        "new checkov findings: fix them or add them to manifests/checkov-skips.yaml: "
        f"{sorted(failed - allowed)}"
    )
    assert allowed - failed == set(), "skips that no longer match a finding: remove them"


# --- the runtime's command, run for real ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.local
def test_the_runtimes_command_serves_an_exported_model(
    built: dict[str, list[Obj]], default_project: Path, tmp_path: Path
) -> None:
    """The container command KServe runs starts handoff.serving on the folder the deploy step names.

    /mnt/models is the model's folder of the Triton repository that export writes (the
    InferenceService's storageUri); the paths, host and port are moved under tmp_path so the
    command runs here unchanged otherwise.
    """
    from handoff.contract_examples import example_arrays
    from handoff.onnx_export import export_onnx
    from handoff.project import Project
    from handoff.triton import write_layout

    container = one(built["prod"], "ServingRuntime")["spec"]["containers"][0]
    assert "{{" not in json.dumps(container)  # KServe renders the container as a Go template

    project = Project.load(default_project)
    cfg = project.config()
    onnx = tmp_path / "model.onnx"
    export_onnx(project.hooks.build_model(cfg).eval(), project.contract, example_arrays(project, cfg), onnx)
    (tmp_path / "export").mkdir()
    repository = write_layout(project.contract, default_project / "contract.yaml", onnx, tmp_path / "export")
    models = repository / project.contract.name  # what the storage initializer puts in /mnt/models

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    moved = {
        "/mnt/models": str(models),
        "/tmp/": f"{scratch}/",
        "0.0.0.0": "127.0.0.1",
        "8080": str(free_port()),
    }
    script = container["args"][0]
    assert all(old in script for old in moved), script
    script = re.sub("|".join(map(re.escape, moved)), lambda m: moved[m.group(0)], script)
    port = int(moved["8080"])
    # handoff.yaml's serving settings, as the InferenceService passes them (the fixed keys win).
    settings = {"model_version": "3", "header_timeout_s": 7.5, "shutdown_grace_s": 4, "port": 1}
    settings["batching"] = {"max_batch_size": 8, "max_wait_ms": 2}
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(scratch),
        "HANDOFF_SERVER_SETTINGS": json.dumps(settings),
    }
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*container["command"], script, *container["args"][1:]], env=env, stdout=log, stderr=log
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                if http_get(f"{base}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready in 60 s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.2)
        # Served under the contract's name, the name clients and the smoke test use.
        status, body = http_get(f"{base}/v2/models/{project.contract.name}")
        assert status == 200 and json.loads(body)["name"] == project.contract.name
        assert http_get(f"{base}/v2/health/live")[0] == 200  # the liveness probe's path
        # exec: the prologue became the server, so Kubernetes' SIGTERM reaches it directly.
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert b"handoff.serving" in cmdline, cmdline
        spec = json.loads((scratch / "server.json").read_text())
        assert {k: spec[k] for k in settings} == {**settings, "port": port}
        # Graceful: it finishes what it received and exits 0 (a pod's container that completed).
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        assert "Finished server process" in log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
