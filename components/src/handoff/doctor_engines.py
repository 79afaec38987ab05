"""`handoff doctor`'s checks of the engines that run the pipeline: Argo Workflows and KFP.

What each reads, and from which source it was learned:

- **Argo's executor** (argoproj/argo-workflows v4.1.2, ``config/controller.go`` ``parseConfigMap``,
  ``workflow/controller/config.go`` ``executorImage``, ``workflow/controller/workflowpod.go``,
  ``Dockerfile``): the workflow controller reads its settings from one ConfigMap (``--configmap``,
  default ``workflow-controller-configmap``, in its own namespace), either one ``config`` key
  holding all of it (what Argo's Helm chart writes) or one key per setting; a ``config`` key next
  to others makes the controller refuse the whole ConfigMap. Its init and wait containers get
  ``executor.securityContext`` and nothing else from it; they inherit the pod's context, and Pod
  Security admission holds them to the namespace's level as any other container. Their image is
  the controller's ``--executor-image`` flag, else ``executor.image``, else
  ``quay.io/argoproj/argoexec`` at the controller's version, which runs as root (only the
  ``-nonroot`` tags run as 8737): in a pod that must run as non-root and names no user (KFP's)
  the kubelet refuses to start them. The controller's Deployment is the ConfigMap's name without
  ``-configmap`` (Argo's manifests: ``workflow-controller``; argoproj/argo-helm
  ``charts/argo-workflows``: ``<release>-workflow-controller``).
- **Argo's artifact repository** (``workflow/artifactrepositories/artifactrepositories.go``,
  ``pkg/apis/workflow/v1alpha1/artifact_repository_types.go``): for a workflow without
  ``artifactRepositoryRef``, the namespace's ``artifact-repositories`` ConfigMap, at the key its
  ``workflows.argoproj.io/default-artifact-repository`` annotation names; only a missing
  ConfigMap or key falls through to the controller's ``artifactRepository``. A key that exists is
  used as it is, storage or not.
- **KFP's mode** (kubeflow/pipelines 2.17.0, ``backend/src/apiserver/main.go`` healthz,
  ``common/config.go`` ``MULTIUSER``, ``resource/resource_manager.go``): ``/apis/v2beta1/healthz``
  answers ``multi_user`` and ``tag_name``; the ``ml-pipeline`` Deployment's API server reads
  ``MULTIUSER`` from its environment (an ``envFrom`` ConfigMap in the multi-user install). A
  single-user KFP replaces every run's namespace with its own (``ReplaceNamespace``); a multi-user
  one runs in the experiment's namespace, which its profile controller (``sync.py``) serves only
  when it carries ``pipelines.kubeflow.org/enabled: "true"``, the label Kubeflow's Profile
  controller sets on a Profile's namespace.
- **KFP's pods** (``backend/src/v2/compiler/argocompiler/security_context.go``): from 2.16.0 the
  driver pod gets ``runAsNonRoot`` and RuntimeDefault seccomp, the step's pod the seccomp profile
  only, and neither a user; Argo adds init and wait to both.
- **KFP's pipeline root** (``backend/src/v2/config/env.go``, ``minio.go``,
  ``objectstore/object_store.go``): the driver and launcher read the ``kfp-launcher`` ConfigMap in
  the run's namespace; without one (or without ``defaultPipelineRoot``) the root is
  ``minio://mlpipeline/v2/artifacts``, KFP's bundled store, whose keys the launcher reads from the
  ``mlpipeline-minio-artifact`` Secret unless ``providers`` configures MinIO otherwise.
- **KFP's version**: the kfp-kubernetes ``security_context`` the steps set (field 18 of
  ``KubernetesExecutorConfig``) is known to backends from 2.16.0 on; older ones drop it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from handoff.doctor_access import account
from handoff.doctor_findings import Finding, Get, fetch
from handoff.kube.client import reason
from handoff.kube.pod_security import ENFORCE_LABEL, LEVELS, violations
from handoff.project import Project

CONFIG_MAP = "workflow-controller-configmap"  # Argo's `--configmap` default (workflow/common/common.go)
CONTROLLER = "workflow-controller"  # the Deployment of Argo's own manifests and KFP's
ARGOEXEC = "quay.io/argoproj/argoexec"  # at the controller's version (workflow/controller/config.go)
ARTIFACT_REPOSITORIES = "artifact-repositories"
DEFAULT_REPOSITORY_ANNOTATION = "workflows.argoproj.io/default-artifact-repository"
# The storage fields of Argo's ArtifactRepository, in the order its Get() picks one.
REPOSITORY_KINDS = ("artifactory", "azure", "gcs", "hdfs", "oss", "plugin", "s3")
KFP_DEPLOYMENT, KFP_API_CONTAINER = "ml-pipeline", "ml-pipeline-api-server"
KFP_LAUNCHER = "kfp-launcher"
KFP_DEFAULT_ROOT = "minio://mlpipeline/v2/artifacts"
KFP_MINIO_SECRET = "mlpipeline-minio-artifact"
KFP_PIPELINES_LABEL = "pipelines.kubeflow.org/enabled"
KFP_MIN_VERSION = (2, 16, 0)
RUNTIME_DEFAULT = {"seccompProfile": {"type": "RuntimeDefault"}}
# The pod-level context executor containers inherit. handoff's WorkflowTemplate pods: what
# handoff_pipelines.argo sets (_pod_security). KFP's: the step's pod (the seccomp profile only)
# for admission, the driver's (runAsNonRoot too) for what the kubelet starts.
ARGO_POD_CONTEXT = {"runAsNonRoot": True, "runAsUser": 10001, **RUNTIME_DEFAULT}
KFP_POD_CONTEXT = RUNTIME_DEFAULT
KFP_DRIVER_POD_CONTEXT = {"runAsNonRoot": True, **RUNTIME_DEFAULT}


@dataclass(frozen=True)
class Platform:
    """What gives one controller a restricted executor context: a kustomization that writes the
    ``executor`` key of its ConfigMap where it usually is, and the component holding the value."""

    kustomization: str
    component: str
    config_map: tuple[str, str]  # (namespace, name) the kustomization writes


ARGO = Platform(
    "manifests/platform/argo", "manifests/platform/components/argo-executor", ("argo", CONFIG_MAP)
)
KFP = Platform(
    "manifests/platform/kubeflow", "manifests/platform/components/kfp-executor", ("kubeflow", CONFIG_MAP)
)


@dataclass(frozen=True)
class Locations:
    """Where the engines are installed: `handoff doctor --argo-config`, `--kfp-namespace`."""

    argo_config: tuple[str, str] = ARGO.config_map  # (namespace, ConfigMap) of Argo's controller
    kfp_namespace: str = "kubeflow"  # KFP's API server and its own Argo controller's ConfigMap

    @property
    def kfp_argo_config(self) -> tuple[str, str]:
        return (self.kfp_namespace, CONFIG_MAP)


@dataclass(frozen=True)
class ControllerConfig:
    """An Argo controller's settings as read from its ConfigMap, or why they could not be read."""

    namespace: str
    name: str
    settings: dict[str, Any] | None
    form: Literal["config", "keys", ""] = ""  # one `config` key, or one key per setting
    unreadable: str = ""  # why settings is None: skip
    invalid: str = ""  # why the controller itself would refuse it: fail

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name}"

    def setting(self, path: str) -> str:
        """Where a person sets ``path`` (``executor.securityContext``) in this ConfigMap's form."""
        if self.form == "config":
            return f"{path} inside the `config` key of {self.where}"
        return f"{path} in {self.where}"

    def executor(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The ``executor`` setting and its ``securityContext`` (None when not set)."""
        executor = (self.settings or {}).get("executor") or {}
        return executor, executor.get("securityContext") or None


def read_config_map(api: client.ApiClient, namespace: str, name: str) -> Any | None:
    """The ConfigMap, or None when it does not exist; other API errors are raised."""
    try:
        return client.CoreV1Api(api).read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def controller_config(api: client.ApiClient, namespace: str, name: str) -> ControllerConfig:
    """Argo's ``parseConfigMap``: one ``config`` key with everything, or one key per setting."""
    where = f"{namespace}/{name}"
    try:
        found = read_config_map(api, namespace, name)
    except ApiException as exc:
        if exc.status == 403:
            return ControllerConfig(
                namespace, name, None, unreadable=f"you may not read ConfigMap {where} ({reason(exc)})"
            )
        raise
    if found is None:
        return ControllerConfig(namespace, name, None, unreadable=f"ConfigMap {where} does not exist")
    data = dict(found.data or {})
    if "config" in data and len(data) != 1:
        others = ", ".join(sorted(k for k in data if k != "config"))
        return ControllerConfig(
            namespace,
            name,
            None,
            invalid=(
                f"{where} has a `config` key and others ({others}), and Argo's controller refuses such a "
                "ConfigMap (config/controller.go: `config` must be its only item): move the others' "
                "settings inside `config`, or split `config` into one key per setting"
            ),
        )
    form: Literal["config", "keys"] = "config" if "config" in data else "keys"
    try:
        if form == "config":
            settings = yaml.safe_load(data["config"]) or {}
        else:
            settings = {key: yaml.safe_load(value) for key, value in data.items()}
    except yaml.YAMLError as exc:
        return ControllerConfig(namespace, name, None, form, invalid=f"{where} is not valid YAML: {exc}")
    if not isinstance(settings, dict):
        return ControllerConfig(
            namespace, name, None, form, invalid=f"{where}: the settings are not a mapping"
        )
    executor = settings.get("executor")
    context = executor.get("securityContext") if isinstance(executor, dict) else None
    if (executor is not None and not isinstance(executor, dict)) or (
        context is not None and not isinstance(context, dict)
    ):
        return ControllerConfig(
            namespace,
            name,
            None,
            form,
            invalid=f"{where}: executor and executor.securityContext must be mappings, as Argo reads them",
        )
    return ControllerConfig(namespace, name, settings, form)


def namespace_labels(api: client.ApiClient, namespace: str) -> dict[str, str] | None:
    """A namespace's labels; None when it may not be read or does not exist."""
    try:
        return dict(client.CoreV1Api(api).read_namespace(namespace).metadata.labels or {})
    except ApiException as exc:
        if exc.status in (403, 404):
            return None
        raise


def enforced_level(labels: dict[str, str] | None, namespace: str) -> tuple[str, str]:
    """(level, how it was found) for the namespace's Pod Security ``enforce`` label."""
    if labels is None:
        return "restricted", f"assumed: namespace {namespace} could not be read"
    value = labels.get(ENFORCE_LABEL)
    if value is None:
        return "privileged", f"{ENFORCE_LABEL} is not set"
    # Pod Security admission reads a label value it does not know as the strictest level.
    return (
        (value, f"{ENFORCE_LABEL}={value}")
        if value in LEVELS
        else ("restricted", f"{ENFORCE_LABEL}={value!r}")
    )


def executor_fix(config: ControllerConfig, platform: Platform) -> str:
    """What to do to give the executor ``platform``'s security context, for this ConfigMap's form
    and place: a kustomization applied to a Helm-made ``config`` ConfigMap would break it."""
    if config.form == "config":
        return (
            f"{config.where} keeps its settings in one `config` key (as Argo's Helm chart writes it): put "
            f"executor.securityContext as {platform.component} sets it inside that key (Helm value "
            f"executor.securityContext); applying {platform.kustomization} would add an `executor` key "
            "next to `config`, which Argo refuses"
        )
    if (config.namespace, config.name) == platform.config_map:
        return f"apply {platform.kustomization} (`kubectl apply --server-side -k {platform.kustomization}`)"
    written = "/".join(platform.config_map)
    return (
        f"set the `executor` key of {config.where} as {platform.component} sets it ({platform.kustomization} "
        f"writes {written} only)"
    )


def check_argo_executor(project: Project, config: ControllerConfig, labels: dict[str, str] | None) -> Finding:
    """Argo's init and wait containers in handoff's WorkflowTemplate pods (project's namespace)."""
    namespace = project.settings.namespace
    return _check_executor(
        "argo executor", config, namespace, labels, ARGO_POD_CONTEXT, ARGO, "--argo-config"
    )


@dataclass(frozen=True)
class ExecutorImage:
    """The image Argo's init and wait run (None: unknown), and where that was read or why not."""

    image: str | None
    how: str


def runs_as_root(image: str) -> bool:
    """argoexec's images run as root but for the ``-nonroot`` tags (uid 8737), digest or not."""
    reference = image.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    return not last.partition(":")[2].endswith("-nonroot")


def _flag(arguments: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` (the last one counts, as with pflag)."""
    found = None
    for index, argument in enumerate(arguments):
        if argument == name and index + 1 < len(arguments):
            found = arguments[index + 1]
        elif argument.startswith(f"{name}="):
            found = argument.split("=", 1)[1]
    return found


def executor_image(api: client.ApiClient, config: ControllerConfig) -> ExecutorImage:
    """The controller's ``--executor-image``, else ``executor.image``, else Argo's default image."""
    deployment_name = (
        config.name.removesuffix("-configmap") if config.name.endswith("-configmap") else CONTROLLER
    )
    where = f"Deployment {config.namespace}/{deployment_name}"
    configured = (config.executor()[0].get("image") or "") if config.settings is not None else ""
    try:
        deployment = client.AppsV1Api(api).read_namespaced_deployment(deployment_name, config.namespace)
    except ApiException as exc:
        if exc.status not in (403, 404):
            raise
        why = f"you may not read {where} ({reason(exc)})" if exc.status == 403 else f"there is no {where}"
        if configured:
            return ExecutorImage(
                str(configured), f"executor.image; {why}, whose --executor-image would override it"
            )
        return ExecutorImage(None, f"{why}, whose --executor-image names it")
    flagged = None
    for container in deployment.spec.template.spec.containers or []:
        flagged = _flag([*(container.command or []), *(container.args or [])], "--executor-image") or flagged
    if flagged:
        return ExecutorImage(flagged, f"--executor-image of {where}")
    if configured:
        return ExecutorImage(str(configured), f"executor.image in {config.where}")
    return ExecutorImage(
        f"{ARGOEXEC}:<controller version>", f"Argo's default: {where} sets no --executor-image"
    )


def check_kfp_executor(
    api: client.ApiClient, config: ControllerConfig, runs_in: str, labels: dict[str, str] | None
) -> Finding:
    """Argo's init and wait containers in KFP's driver and step pods, in the namespace KFP runs
    them in. They name no user: the kubelet refuses a container that must run as non-root and
    would run as root (its image's user)."""
    check = "kfp executor"
    found = _check_executor(check, config, runs_in, labels, KFP_POD_CONTEXT, KFP, "--kfp-namespace")
    if found.outcome != "pass":
        return found
    context = config.executor()[1] or {}
    if not context.get("runAsNonRoot", KFP_DRIVER_POD_CONTEXT["runAsNonRoot"]) or "runAsUser" in context:
        return found
    set_user = f"set {config.setting('executor.securityContext.runAsUser')} ({KFP.kustomization} sets 65532)"
    image = executor_image(api, config)
    if image.image is None:
        return Finding(
            check,
            "skip",
            f"Argo's init and wait in KFP's pods must run as non-root and get no user from KFP, so they run "
            f"as their image's user, and {image.how}: check that it is a -nonroot argoexec image, or "
            f"{set_user}",
        )
    if runs_as_root(image.image):
        return Finding(
            check,
            "fail",
            f"the kubelet refuses to start Argo's init and wait containers in KFP's pods: they must run as "
            f"non-root, KFP's pods name no user (unless KFP's admin set a default), and {image.image} "
            f"({image.how}) runs as root: {set_user}",
        )
    return Finding(check, "pass", f"{found.detail}; they run as {image.image}'s non-root user ({image.how})")


def _check_executor(
    check: str,
    config: ControllerConfig,
    namespace: str,
    labels: dict[str, str] | None,
    pod_context: dict[str, Any],
    platform: Platform,
    option: str,
) -> Finding:
    """Would Pod Security admit Argo's init and wait containers in ``namespace``'s pods?"""
    level, how = enforced_level(labels, namespace)
    if config.invalid:
        return Finding(check, "fail", config.invalid)
    if config.settings is None:
        return Finding(
            check,
            "skip",
            f"{config.unreadable}: check that its executor.securityContext passes Pod Security {level} "
            f"({platform.kustomization} sets one), or pass {option} if the controller is elsewhere",
        )
    context = config.executor()[1]
    pod = {
        "spec": {
            "securityContext": pod_context,
            "initContainers": [{"name": "init", "securityContext": context}],
            "containers": [{"name": "wait", "securityContext": context}],
        }
    }
    problems = violations(pod, level)
    if problems:
        shown = "not set" if not context else "set"
        return Finding(
            check,
            "fail",
            f"Pod Security {level} in {namespace} ({how}) refuses Argo's init and wait containers: "
            f"executor.securityContext in {config.where} is {shown}, and {'; '.join(problems)}: "
            f"{executor_fix(config, platform)}",
        )
    return Finding(
        check,
        "pass",
        f"executor.securityContext in {config.where} passes Pod Security {level} in {namespace}",
    )


def describe_repository(repository: Any) -> str | None:
    """``s3://bucket (endpoint)`` and the like; None when it names no storage (Argo's Get())."""
    if not isinstance(repository, dict):
        return None
    for kind in REPOSITORY_KINDS:
        spec = repository.get(kind)
        if spec is None:
            continue
        spec = spec if isinstance(spec, dict) else {}
        if kind == "s3":
            endpoint = spec.get("endpoint")
            return f"s3://{spec.get('bucket', '')}" + (f" at {endpoint}" if endpoint else "")
        if kind == "gcs":
            return f"gs://{spec.get('bucket', '')}"
        if kind == "azure":
            return f"azure container {spec.get('container', '')} at {spec.get('endpoint', '')}"
        return kind
    return None


def check_argo_artifacts(project: Project, api: client.ApiClient, config: ControllerConfig) -> Finding:
    """The repository Argo resolves for the steps' artifacts, in Argo's order."""
    namespace, check = project.settings.namespace, "argo artifacts"
    unknown = []
    try:
        found = read_config_map(api, namespace, ARTIFACT_REPOSITORIES)
    except ApiException as exc:
        if exc.status != 403:
            raise
        unknown.append(f"you may not read ConfigMap {namespace}/{ARTIFACT_REPOSITORIES} ({reason(exc)})")
        found = None
    if found is not None:
        where = f"{namespace}/{ARTIFACT_REPOSITORIES}"
        key = (found.metadata.annotations or {}).get(DEFAULT_REPOSITORY_ANNOTATION, "")
        value = (found.data or {}).get(key)
        if value is not None:  # Argo uses this key, whatever it holds
            try:
                described = describe_repository(yaml.safe_load(value))
            except yaml.YAMLError as exc:
                return Finding(check, "fail", f"{where} key {key!r} is not YAML: {exc}")
            if described:
                return Finding(check, "pass", f"{described} ({where}, key {key!r})")
            return Finding(
                check,
                "fail",
                f"{where} key {key!r} names no storage (one of {', '.join(REPOSITORY_KINDS)}), and Argo "
                "uses that key without falling back to the controller's artifactRepository: set the "
                "storage there",
            )
    if config.settings is not None:
        described = describe_repository(config.settings.get("artifactRepository"))
        if described:
            return Finding(
                check, "pass", f"{described} (the controller's artifactRepository in {config.where})"
            )
    else:
        unknown.append(config.unreadable or config.invalid)
    if unknown:
        return Finding(
            check, "skip", f"{'; '.join(unknown)}: cannot tell where Argo keeps the steps' artifacts"
        )
    return Finding(
        check,
        "fail",
        f"no artifact repository for {namespace}, and the steps hand files on as Argo artifacts: add a "
        f"`{ARTIFACT_REPOSITORIES}` ConfigMap to {namespace} (annotation {DEFAULT_REPOSITORY_ANNOTATION} "
        f"names its key) or {config.setting('artifactRepository')}",
    )


@dataclass(frozen=True)
class KfpServer:
    """What KFP's healthz said (None when it was not asked or did not answer)."""

    multi_user: bool | None = None
    version: str = ""


def kfp_healthz(endpoint: str, get: Get) -> tuple[Finding, KfpServer]:
    """The `kfp` line (reachable, and a backend that keeps the steps' security context) and what it said."""
    url = f"{endpoint.rstrip('/')}/apis/v2beta1/healthz"
    answer = fetch("kfp", url, get)
    if isinstance(answer, Finding):
        return answer, KfpServer()
    try:
        body = answer.json()
    except ValueError:  # requests' JSONDecodeError is one
        body = {}
    body = body if isinstance(body, dict) else {}
    server = KfpServer(
        multi_user=body["multi_user"] if isinstance(body.get("multi_user"), bool) else None,
        version=str(body.get("tag_name") or ""),
    )
    parsed = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", server.version)
    if parsed and tuple(int(p) for p in parsed.groups()) < KFP_MIN_VERSION:
        need = ".".join(map(str, KFP_MIN_VERSION))
        return (
            Finding(
                "kfp",
                "fail",
                f"KFP {server.version} at {endpoint} drops the steps' securityContext (kfp-kubernetes "
                f"security_context needs a KFP backend ≥ {need}), so Pod Security restricted refuses "
                f"their pods: upgrade KFP to {need} or later",
            ),
            server,
        )
    version = (
        f"KFP {server.version}" if server.version and server.version != "unknown" else "version not given"
    )
    return Finding("kfp", "pass", f"{url} answered HTTP {answer.status_code} ({version})"), server


def _true(value: str) -> bool:
    """Go's strconv.ParseBool, as viper reads MULTIUSER."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def multi_user_from_deployment(api: client.ApiClient, namespace: str) -> tuple[bool | None, str]:
    """(multi-user?, where it was read or why not) from the ml-pipeline Deployment's environment:
    an ``env`` entry (a value, or a ConfigMap key), else the last ``envFrom`` ConfigMap that has it."""
    where = f"Deployment {namespace}/{KFP_DEPLOYMENT}"
    try:
        deployment = client.AppsV1Api(api).read_namespaced_deployment(KFP_DEPLOYMENT, namespace)
        containers = deployment.spec.template.spec.containers or []
        server = next((c for c in containers if c.name == KFP_API_CONTAINER), None)
        if server is None:
            return None, f"{where} has no {KFP_API_CONTAINER} container"
        for env in server.env or []:
            if env.name == "MULTIUSER" and env.value is not None:
                return _true(env.value), f"{where}: MULTIUSER={env.value}"
            ref = env.value_from.config_map_key_ref if env.name == "MULTIUSER" and env.value_from else None
            if ref is not None:
                value = _config_map_value(api, namespace, ref.name, ref.key)
                return _true(value or ""), f"{where}: MULTIUSER={value} (ConfigMap {ref.name})"
        found = None
        for source in server.env_from or []:
            if source.config_map_ref is not None:
                name = source.config_map_ref.name
                value = _config_map_value(api, namespace, name, "MULTIUSER")
                found = (value, name) if value is not None else found
    except ApiException as exc:
        if exc.status == 403:
            return None, f"you may not read what {where} runs with ({reason(exc)})"
        if exc.status == 404:
            return None, f"there is no {where} (is KFP elsewhere? pass --kfp-namespace)"
        raise
    if found is not None:
        return _true(found[0]), f"{where}: MULTIUSER={found[0]} (ConfigMap {found[1]})"
    return False, f"{where}: MULTIUSER is not set"


def _config_map_value(api: client.ApiClient, namespace: str, name: str, key: str) -> str | None:
    found = read_config_map(api, namespace, name)
    value = (found.data or {}).get(key) if found is not None else None
    return None if value is None else str(value)


@dataclass(frozen=True)
class KfpMode:
    """KFP's mode (None: unknown), how it was found, and where it runs the pods ("": the project's
    namespace, as a multi-user KFP does)."""

    multi_user: bool | None
    how: str
    pods_in: str = ""


def resolve_kfp_mode(api: client.ApiClient, where: Locations, server: KfpServer) -> KfpMode:
    """KFP's mode from its healthz when that answered, else from its API server's Deployment."""
    multi: bool | None = server.multi_user
    how = "KFP's healthz"
    if multi is None:
        multi, how = multi_user_from_deployment(api, where.kfp_namespace)
    return KfpMode(multi, how, where.kfp_namespace if multi is False else "")


def check_kfp_mode(project: Project, mode: KfpMode, labels: dict[str, str] | None) -> Finding:
    """What KFP's mode means for the project's namespace."""
    namespace, check, how = project.settings.namespace, "kfp mode", mode.how
    if mode.multi_user is None:
        return Finding(check, "skip", f"cannot tell KFP's mode: {how}")
    if not mode.multi_user:
        runs_in = mode.pods_in
        if namespace == runs_in:
            return Finding(check, "pass", f"single-user KFP ({how}) runs the pipelines in {runs_in}")
        user, _ = account(runs_in, project.settings.cluster.service_account)
        return Finding(
            check,
            "pass",
            f"single-user KFP ({how}) runs the pipelines in its own namespace {runs_in}, as {user}, "
            f"which acts on {namespace} (the access check reviews it)",
        )
    if labels is None:
        return Finding(check, "skip", f"multi-user KFP ({how}); namespace {namespace} could not be read")
    if labels.get(KFP_PIPELINES_LABEL) == "true":
        return Finding(
            check, "pass", f"multi-user KFP ({how}) runs the pipelines in {namespace}, a Profile's namespace"
        )
    return Finding(
        check,
        "fail",
        f"multi-user KFP ({how}) runs pipelines only in a Profile's namespace, and {namespace} lacks "
        f"{KFP_PIPELINES_LABEL}=true: create a Kubeflow Profile named {namespace} and let its "
        "controller own the namespace (manifests/README.md)",
    )


@dataclass(frozen=True)
class PipelineRoot:
    """The pipeline root KFP's driver and launcher use where the pods run (None: could not be
    read), where it came from (or why not), and whether the launcher reads KFP's MinIO Secret."""

    root: str | None
    source: str
    reads_minio_secret: bool


def kfp_pipeline_root(api: client.ApiClient, runs_in: str) -> PipelineRoot:
    """``kfp-launcher`` in ``runs_in`` as KFP's ``config.FromConfigMap`` reads it."""
    try:
        found = read_config_map(api, runs_in, KFP_LAUNCHER)
    except ApiException as exc:
        if exc.status != 403:
            raise
        return PipelineRoot(
            None, f"you may not read ConfigMap {runs_in}/{KFP_LAUNCHER} ({reason(exc)})", True
        )
    data = dict(found.data or {}) if found is not None else {}
    root = str(data.get("defaultPipelineRoot") or "")
    if root:
        source = f"{KFP_LAUNCHER} in {runs_in}"
    else:
        why = "sets no defaultPipelineRoot" if found is not None else "does not exist"
        source, root = f"KFP's default: {KFP_LAUNCHER} in {runs_in} {why}", KFP_DEFAULT_ROOT
    try:
        providers = yaml.safe_load(data.get("providers") or "") or {}
    except yaml.YAMLError:
        providers = {}
    minio = providers.get("minio") if isinstance(providers, dict) else None
    configured = isinstance(minio, dict) and (minio.get("default") or minio.get("Overrides"))
    # minio.go: a minio:// root without a query and without a providers entry for MinIO takes
    # KFP's default session, whose keys are in the mlpipeline-minio-artifact Secret.
    default_session = root.startswith("minio://") and "?" not in root and not configured
    return PipelineRoot(root, source, default_session)


def check_kfp_artifacts(root: PipelineRoot) -> Finding:
    """The pipeline root KFP's driver and launcher will use in the namespace the runs are in."""
    check = "kfp artifacts"
    if root.root is None:
        return Finding(check, "skip", root.source)
    if root.reads_minio_secret:
        return Finding(
            check,
            "pass",
            f"pipeline root {root.root} ({root.source}): KFP's bundled object store, whose keys the steps "
            f"read from Secret {KFP_MINIO_SECRET} (the access check reviews that they may)",
        )
    return Finding(check, "pass", f"pipeline root {root.root} ({root.source})")
