"""Lift the pod specs inside custom resources into plain Pods, for tools that only read Pods.

Pod-level scanners (checkov, kubernetes-validate) skip custom resources: a ServingRuntime, an
InferenceService or an Argo WorkflowTemplate is invisible to them, although each one becomes pods
on the cluster. This writes, for each such object, the Pod(s) it turns into, as far as the object
itself decides them (the controllers' own additions, such as KServe's storage initializer or
Knative's queue-proxy, are theirs to secure):

- ServingRuntime / ClusterServingRuntime: one Pod of the runtime's containers, volumes and
  scheduling fields, run as ``--service-account`` (the account the InferenceServices name);
- InferenceService: one Pod per component (predictor, transformer, explainer), merged with its
  ServingRuntime when that is among the input objects, as KServe merges them;
- Workflow / WorkflowTemplate: one Pod per container or script template, with the workflow's
  pod-level settings;
- TrainJob (Kubeflow Trainer v2): one Pod per replicated job its ``runtimePatches`` shape, with
  ``trainer`` (image, command, args, env, resources per node) in the ``node`` container, as
  Trainer fills it in (the runtime's own fields, such as its pull policy, are the runtime's);
- PyTorchJob (training-operator v1): one Pod per replica type (Master, Worker).

A ServiceAccount among the input objects lends its ``automountServiceAccountToken`` to the Pods
that run as it, as the API server does. Usage::

    kubectl kustomize manifests/overlays/prod | python scripts/lift_pods.py --service-account handoff-serving
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

RUNTIME_KINDS = {"ServingRuntime", "ClusterServingRuntime"}
WORKFLOW_KINDS = {"Workflow", "WorkflowTemplate", "ClusterWorkflowTemplate"}
# ServingRuntimePodSpec fields that are PodSpec fields of the same name and meaning.
RUNTIME_POD_FIELDS = (
    "containers",
    "volumes",
    "nodeSelector",
    "tolerations",
    "affinity",
    "imagePullSecrets",
    "hostIPC",
    "schedulerName",
    "resourceClaims",
)
# InferenceService component fields that are not PodSpec fields.
ISVC_COMPONENT_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "scaleMetricType",
    "autoScaling",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
    "workerSpec",
    "storageUris",
}
# Argo workflow-spec fields that are PodSpec fields of the same name.
WORKFLOW_POD_FIELDS = (
    "serviceAccountName",
    "automountServiceAccountToken",
    "securityContext",
    "nodeSelector",
    "tolerations",
    "affinity",
    "imagePullSecrets",
    "hostNetwork",
    "dnsPolicy",
    "priorityClassName",
    "schedulerName",
)
# Argo template fields that are PodSpec fields and override the workflow's.
TEMPLATE_POD_FIELDS = (
    "securityContext",
    "nodeSelector",
    "tolerations",
    "affinity",
    "serviceAccountName",
    "automountServiceAccountToken",
    "priorityClassName",
    "schedulerName",
    "volumes",
    "initContainers",
)
# Argo ScriptTemplate = Container + `source`.
SCRIPT_ONLY_FIELDS = {"source"}
# Kubeflow Trainer: the container of a TrainJob's nodes that `spec.trainer` fills in (the
# torch-distributed runtimes name both the replicated job and its container "node").
TRAINER_CONTAINER = "node"
# TrainJob `spec.trainer` fields that are Container fields (resourcesPerNode becomes resources).
TRAINER_CONTAINER_FIELDS = ("image", "command", "args", "env")


def _pod(name: str, namespace: str | None, labels: dict[str, str], spec: Obj, origin: str) -> Obj:
    metadata: Obj = {"name": name, "annotations": {"lift-pods/from": origin}}
    if namespace:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _origin(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj['kind']} {where}{meta.get('name', '?')}"


def _runtime_pods(obj: Obj, service_account: str | None) -> Iterator[Obj]:
    spec, meta = obj["spec"], obj["metadata"]
    pod_spec = {key: copy.deepcopy(spec[key]) for key in RUNTIME_POD_FIELDS if key in spec}
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    labels = {**meta.get("labels", {}), **spec.get("labels", {})}
    pod = _pod(meta["name"], meta.get("namespace"), labels, pod_spec, _origin(obj))
    if spec.get("annotations"):
        pod["metadata"]["annotations"].update(spec["annotations"])
    yield pod


# Lists whose items KServe's strategic merge matches by a key rather than replacing whole.
MERGE_KEYS = {"containers": "name", "env": "name", "volumeMounts": "mountPath", "volumes": "name"}
ISVC_CONTAINER = "kserve-container"  # the runtime container an InferenceService's model completes
FRAMEWORK_ONLY_FIELDS = {"modelFormat", "runtime", "storageUri", "protocolVersion", "runtimeVersion"}
_POD_DICT_FIELDS = {"securityContext", "nodeSelector", "affinity", "dnsConfig", "overhead", "os"}


def merge(base: Any, override: Any, key: str | None = None) -> Any:
    """``override`` over ``base`` the way KServe merges a runtime with an InferenceService.

    Objects merge field by field; the lists named in MERGE_KEYS merge item by item on their key;
    other lists and plain values are replaced. A close approximation of Kubernetes' strategic
    merge for the fields a ServingRuntime and an InferenceService set.
    """
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for field, value in override.items():
            merged[field] = merge(base[field], value, field) if field in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key in MERGE_KEYS:
        on = MERGE_KEYS[key]
        merged_items = [copy.deepcopy(item) for item in base]
        positions = {item.get(on): i for i, item in enumerate(merged_items)}
        for item in override:
            if item.get(on) in positions:
                i = positions[item[on]]
                merged_items[i] = merge(merged_items[i], item, None)
            else:
                merged_items.append(copy.deepcopy(item))
        return merged_items
    return copy.deepcopy(override)


def _isvc_pods(obj: Obj, runtimes: dict[str, Obj]) -> Iterator[Obj]:
    meta = obj["metadata"]
    for component in ("predictor", "transformer", "explainer"):
        part = obj["spec"].get(component)
        if not part:
            continue
        pod_spec = {k: copy.deepcopy(v) for k, v in part.items() if k not in ISVC_COMPONENT_FIELDS}
        containers = list(pod_spec.get("containers", []))
        runtime: Obj | None = None
        # The framework shorthand (predictor.model, predictor.onnx, ...) is the kserve-container of
        # its ServingRuntime, completed by the InferenceService's own fields.
        for key in [k for k in pod_spec if isinstance(pod_spec[k], dict) and k not in _POD_DICT_FIELDS]:
            framework = pod_spec.pop(key)
            runtime = runtimes.get(framework.get("runtime", ""))
            container = {k: v for k, v in framework.items() if k not in FRAMEWORK_ONLY_FIELDS}
            containers.insert(0, {"name": ISVC_CONTAINER, **container})
        if containers:
            pod_spec["containers"] = containers
        if runtime is not None:
            runtime_spec = runtime["spec"]
            base = {k: copy.deepcopy(runtime_spec[k]) for k in RUNTIME_POD_FIELDS if k in runtime_spec}
            pod_spec = merge(base, pod_spec)
        name = f"{meta['name']}-{component}"
        labels = {**meta.get("labels", {}), "serving.kserve.io/inferenceservice": meta["name"]}
        yield _pod(name, meta.get("namespace"), labels, pod_spec, f"{_origin(obj)} {component}")


def _workflow_pods(obj: Obj) -> Iterator[Obj]:
    spec, meta = obj["spec"], obj["metadata"]
    base = {key: copy.deepcopy(spec[key]) for key in WORKFLOW_POD_FIELDS if key in spec}
    pod_meta = spec.get("podMetadata", {})
    for template in spec.get("templates", []):
        kind = next((k for k in ("container", "script") if k in template), None)
        if kind is None:
            continue  # dag, steps, suspend, resource, http: no pod of their own
        container = {k: v for k, v in template[kind].items() if k not in SCRIPT_ONLY_FIELDS}
        container.setdefault("name", "main")
        pod_spec = {**base, **{k: copy.deepcopy(template[k]) for k in TEMPLATE_POD_FIELDS if k in template}}
        pod_spec["containers"] = [container, *copy.deepcopy(template.get("sidecars", []))]
        volumes = [*copy.deepcopy(spec.get("volumes", [])), *pod_spec.get("volumes", [])]
        if volumes:
            pod_spec["volumes"] = volumes
        labels = {**pod_meta.get("labels", {}), **template.get("metadata", {}).get("labels", {})}
        name = f"{meta.get('name', meta.get('generateName', 'workflow').rstrip('-'))}-{template['name']}"
        yield _pod(
            name, meta.get("namespace"), labels, pod_spec, f"{_origin(obj)} template {template['name']}"
        )


def _trainjob_pods(obj: Obj) -> Iterator[Obj]:
    meta, spec = obj["metadata"], obj["spec"]
    trainer = spec.get("trainer", {})
    node = {k: copy.deepcopy(trainer[k]) for k in TRAINER_CONTAINER_FIELDS if k in trainer}
    if "resourcesPerNode" in trainer:
        node["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    for patch in spec.get("runtimePatches", []):
        template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        for job in (template.get("spec") or {}).get("replicatedJobs", []):
            pod_template = ((job.get("template") or {}).get("spec") or {}).get("template") or {}
            pod_spec = copy.deepcopy(pod_template.get("spec") or {})
            if job["name"] == TRAINER_CONTAINER:
                pod_spec["containers"] = merge(
                    [{"name": TRAINER_CONTAINER, **node}], pod_spec.get("containers", []), "containers"
                )
            labels = {**meta.get("labels", {}), **(pod_template.get("metadata") or {}).get("labels", {})}
            origin = f"{_origin(obj)} replicatedJob {job['name']}"
            yield _pod(f"{meta['name']}-{job['name']}", meta.get("namespace"), labels, pod_spec, origin)


def _pytorchjob_pods(obj: Obj) -> Iterator[Obj]:
    meta = obj["metadata"]
    for replica, replica_spec in obj["spec"].get("pytorchReplicaSpecs", {}).items():
        template = replica_spec.get("template", {})
        labels = {**meta.get("labels", {}), **template.get("metadata", {}).get("labels", {})}
        name = f"{meta['name']}-{replica.lower()}"
        pod_spec = copy.deepcopy(template.get("spec", {}))
        yield _pod(name, meta.get("namespace"), labels, pod_spec, f"{_origin(obj)} replica {replica}")


def lift(objects: Iterable[Obj], service_account: str | None = None) -> list[Obj]:
    """The Pods the pod-bearing objects among ``objects`` become (other objects are ignored)."""
    objects = [o for o in objects if o]
    automount = {
        (o["metadata"].get("namespace"), o["metadata"]["name"]): o["automountServiceAccountToken"]
        for o in objects
        if o.get("kind") == "ServiceAccount" and "automountServiceAccountToken" in o
    }
    pods: list[Obj] = []
    runtimes = {o["metadata"]["name"]: o for o in objects if o.get("kind") in RUNTIME_KINDS}
    for obj in objects:
        kind = obj.get("kind")
        if kind in RUNTIME_KINDS:
            pods += _runtime_pods(obj, service_account)
        elif kind == "InferenceService":
            pods += _isvc_pods(obj, runtimes)
        elif kind in WORKFLOW_KINDS:
            pods += _workflow_pods(obj)
        elif kind == "TrainJob":
            pods += _trainjob_pods(obj)
        elif kind == "PyTorchJob":
            pods += _pytorchjob_pods(obj)
    for pod in pods:
        spec = pod["spec"]
        key = (pod["metadata"].get("namespace"), spec.get("serviceAccountName", "default"))
        if "automountServiceAccountToken" not in spec and key in automount:
            spec["automountServiceAccountToken"] = automount[key]
    return pods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="YAML files (default: standard input)")
    parser.add_argument("--service-account", help="the account serving runtimes run as")
    args = parser.parse_args(argv)
    texts = [Path(path).read_text() for path in args.files] if args.files else [sys.stdin.read()]
    objects = [doc for text in texts for doc in yaml.safe_load_all(text)]
    pods = lift(objects, service_account=args.service_account)
    yaml.safe_dump_all(pods, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
