"""Run a compiled Argo WorkflowTemplate with real containers, the way Argo's controller runs it.

A test fixture that proves the pods ``handoff compile`` writes work as written: every step runs as
a container with its pod spec's image, command, arguments, environment, security context,
emptyDirs and limits; artifacts travel through an S3 bucket as Argo's executor stores them; the
DAG, ``when``, retries and the exit handler follow the controller's rules. On a cluster Argo stays
the engine. Semantics were read in argoproj/argo-workflows (``workflow/controller/operator.go``:
processNodeRetries, inferFailedReason, the exit handler and ``workflow.duration``;
``workflow/controller/dag.go`` and ``workflow/common/ancestry.go``: ``dependencies``;
``workflow/controller/steps.go``: shouldExecute; ``util/template/expression_template.go`` and
``util/expr/env/env.go``: ``{{=jsonpath(...)}}``; ``workflow/executor/executor.go`` and
``postmain.go``: outputs, ``result`` and the artifact archive; ``workflow/util/pod_name.go``).

Only what ``handoff_pipelines.argo`` emits is implemented; ``check_supported`` refuses any other
field, and unknown variables or expression forms raise, so a change to the template cannot pass
here unexercised. Steps run one at a time (Argo would start independent tasks together).
``activeDeadlineSeconds`` (workflow and template) bound each pod as ``workflowpod.go`` does;
``podGC`` and ``ttlStrategy`` are accepted and change nothing here (every container is removed
when it ends, and no workflow object outlives the run); an ``nvidia.com/gpu`` request is accepted
but the container gets no GPU (the images hold CPU torch: what is checked is what the step runs).

    runner = ArgoRunner(Podman(...).run, S3Bucket(boto3_client, "artifacts"), workdir)
    result = runner.run(workflow_template_dict(project))  # -> WorkflowRun
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import math
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from .containers import ContainerSpec, Finished, Mount

RunContainer = Callable[[ContainerSpec, float], Finished]
Secrets = Mapping[str, Mapping[str, str]]  # secret name -> key -> value, as in the namespace

FAILED = ("Failed", "Error")
TERMINATION_LOG = "/dev/termination-log"
MAX_RESULT_BYTES = 256 * 1024  # the executor keeps the last 256 kB of stdout as outputs.result
MAX_TERMINATION_BYTES = 4096  # the kubelet truncates a termination message to 4096 bytes
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class UnsupportedTemplate(Exception):
    """The template uses a field or form this runner does not implement (the message names it)."""


class TemplateError(Exception):
    """The template is wrong where Argo's validation would reject it (unknown variable, template...)."""


class _NodeError(Exception):
    """Something Argo's controller marks as a node Error (a bad expression, an unsupplied input)."""


# What may appear where, one kind of object a line: its keys, and "key:kind" where the value is
# an object ("[]kind": a list of them) that is checked in turn. Anything else is refused.
_SCHEMA_TEXT = """
workflow: apiVersion kind metadata:metadata spec:spec
metadata: name generateName namespace labels annotations
spec: arguments:workflowArguments entrypoint onExit podMetadata:podMetadata serviceAccountName
  securityContext:podSecurityContext templates:[]template volumes:[]volume activeDeadlineSeconds
  podGC:podGC ttlStrategy:ttlStrategy
podGC: strategy
ttlStrategy: secondsAfterCompletion secondsAfterSuccess secondsAfterFailure
workflowArguments: parameters:[]parameter
podMetadata: labels annotations
podSecurityContext: runAsUser runAsGroup runAsNonRoot fsGroup seccompProfile:seccompProfile
seccompProfile: type
volume: name emptyDir:emptyDir
emptyDir: medium sizeLimit
template: name container:container dag:dag steps:[][]step inputs:inputs outputs:outputs
  retryStrategy:retryStrategy activeDeadlineSeconds
container: image command args env:[]env resources:resources securityContext:securityContext
  volumeMounts:[]volumeMount workingDir imagePullPolicy
env: name value valueFrom:envSource
envSource: secretKeyRef:secretKeyRef
secretKeyRef: name key optional
resources: limits:resourceList requests:resourceList
resourceList: cpu memory nvidia.com/gpu
securityContext: allowPrivilegeEscalation readOnlyRootFilesystem capabilities:capabilities runAsUser
  runAsGroup runAsNonRoot seccompProfile:seccompProfile
capabilities: drop
volumeMount: name mountPath
inputs: parameters:[]inputParameter artifacts:[]pathArtifact
inputParameter: name
pathArtifact: name path
outputs: parameters:[]outputParameter artifacts:[]pathArtifact
outputParameter: name valueFrom:valueFrom
valueFrom: path
retryStrategy: limit retryPolicy backoff:backoff
backoff: duration factor maxDuration
dag: tasks:[]task
task: name template dependencies arguments:arguments
step: name template arguments:arguments when
arguments: parameters:[]parameter artifacts:[]fromArtifact
parameter: name value
fromArtifact: name from
"""
_SCHEMA: dict[str, dict[str, str]] = {
    kind: dict((*key.split(":"), "")[:2] for key in keys.split())
    for kind, keys in re.findall(r"^(\w+):((?:.|\n  )*)$", _SCHEMA_TEXT, re.MULTILINE)
}
_VALUES: dict[tuple[str, str], tuple[Any, ...]] = {
    ("workflow", "kind"): ("WorkflowTemplate", "Workflow"),
    ("seccompProfile", "type"): ("RuntimeDefault", "Unconfined"),
    ("emptyDir", "medium"): ("", "Memory"),
    ("retryStrategy", "retryPolicy"): ("Always", "OnFailure", "OnError"),
    ("secretKeyRef", "optional"): (False,),
    # Images are built here and never pulled (podman --pull=never): there is no registry to ask,
    # so every policy runs the image podman has (what Always would find the tag pointing at).
    ("container", "imagePullPolicy"): ("IfNotPresent", "Never", "Always"),
}


def check_supported(template: Mapping[str, Any]) -> None:
    """Raise ``UnsupportedTemplate`` naming the first field this runner does not implement."""
    _check(template, "workflow", "")
    for tmpl in template["spec"]["templates"]:
        kinds = [k for k in ("container", "dag", "steps") if k in tmpl]
        if len(kinds) != 1:
            raise UnsupportedTemplate(
                f"spec.templates[{tmpl.get('name')}]: one of container/dag/steps expected"
            )
        for step in (step for group in tmpl.get("steps", []) for step in group):
            if "{{=" in step.get("when", ""):  # Argo evaluates `when` with govaluate, not expr
                raise UnsupportedTemplate(f"spec.templates[{tmpl['name']}].steps[{step['name']}].when: {{{{=")
        if "retryStrategy" in tmpl and "limit" not in tmpl["retryStrategy"]:
            raise UnsupportedTemplate(
                f"spec.templates[{tmpl['name']}].retryStrategy: a limit is required here"
            )


def _check(value: Any, kind: str, path: str) -> None:
    if kind.startswith("[]"):
        for i, item in enumerate(value):
            label = item.get("name", i) if isinstance(item, dict) else i
            _check(item, kind[2:], f"{path}[{label}]")
        return
    allowed = _SCHEMA[kind]
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in allowed:
            raise UnsupportedTemplate(f"{where}: not implemented by the rehearsal's Argo runner")
        if (kind, key) in _VALUES and item not in _VALUES[kind, key]:
            raise UnsupportedTemplate(f"{where}: {item!r} not implemented (only {_VALUES[kind, key]})")
        if allowed[key]:
            _check(item, allowed[key], where)


# --- Values: Go durations, Kubernetes quantities, Go's JSON -------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"([0-9.]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|)")
_SUFFIX = {"": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_SUFFIX |= {"E": 1e18, **{s: 1024.0 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}


def parse_duration(text: str | int) -> float:
    """Seconds in Argo's ``ParseStringToDuration``: a bare integer is seconds, else Go's syntax."""
    text = str(text)
    if re.fullmatch(r"[+-]?\d+", text):
        return float(int(text))
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    parts = _DURATION_PART.findall(body)
    if body == "0":
        return 0.0
    if not parts or "".join(n + u for n, u in parts) != body:
        raise TemplateError(f"unable to parse {text!r} as a duration")
    return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)


def parse_quantity(text: str | int) -> float:
    """A Kubernetes quantity ("500m", "2", "8Gi") as a number."""
    match = _QUANTITY.fullmatch(str(text))
    if not match:
        raise UnsupportedTemplate(f"quantity {text!r} not implemented")
    return float(match[1]) * _SUFFIX[match[2]]


def go_json(value: Any) -> str:
    """``value`` as Go's ``json.Marshal`` writes it after ``json.Unmarshal`` into ``any``: sorted keys,
    no spaces, every number a float64 (``3``, ``0.5``, ``1e-7``), ``<>&`` escaped."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return _go_float(float(value))
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
            text = text.replace(char, escape)
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    if isinstance(value, list):
        return "[" + ",".join(go_json(item) for item in value) + "]"
    return "{" + ",".join(f"{go_json(k)}:{go_json(value[k])}" for k in sorted(value)) + "}"


def _go_float(number: float) -> str:
    if not math.isfinite(number):
        raise _NodeError(f"json: unsupported value: {number}")
    magnitude = abs(number)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):  # Go switches to exponent form
        return re.sub(r"e-0(\d)$", r"e-\1", repr(number))
    return str(int(number)) if number.is_integer() else format(Decimal(repr(number)), "f")


# --- Variables, expressions and ``when`` ---------------------------------------------------------

_TAG = re.compile(r"\{\{(=?)(.*?)\}\}", re.DOTALL)
_IDENT_PATH = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"  # expr's member access: no "-" (that is minus)
_JSONPATH_CALL = re.compile(rf"jsonpath\(\s*({_IDENT_PATH})\s*,\s*'([^']*)'\s*\)")
_JSONPATH_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\['([^']*)'\]")


def substitute(text: str, scope: Mapping[str, str]) -> str:
    """Replace Argo's ``{{name}}`` tags and ``{{=expression}}`` tags in ``text`` from ``scope``."""

    def one(match: re.Match[str]) -> str:
        body = match[2].strip()
        if match[1]:
            return evaluate_expression(body, scope)
        if body not in scope:
            raise TemplateError(f"failed to resolve {{{{{body}}}}}")
        return scope[body]

    return _TAG.sub(one, text)


def _substitute_all(value: Any, scope: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return substitute(value, scope)
    if isinstance(value, list):
        return [_substitute_all(item, scope) for item in value]
    if isinstance(value, dict):
        return {key: _substitute_all(item, scope) for key, item in value.items()}
    return value


def evaluate_expression(expression: str, scope: Mapping[str, str]) -> str:
    """An expression tag's text: ``jsonpath(<variable>, '<path>')`` or a bare variable, formatted as
    Argo's expressionReplaceCore does (a string as is, anything else as Go's JSON)."""
    call = _JSONPATH_CALL.fullmatch(expression)
    name = call[1] if call else expression
    if not call and not re.fullmatch(_IDENT_PATH, expression):
        raise UnsupportedTemplate(
            f"expression {{{{={expression}}}}}: only jsonpath(<variable>, '<$.path>') or a variable "
            "is implemented"
        )
    if name not in scope:
        raise TemplateError(f"failed to evaluate expression: {name} is missing")
    value: Any = jsonpath(scope[name], call[2]) if call else scope[name]
    if value is None:
        raise _NodeError(f"failed to evaluate expression {expression!r}")
    return value if isinstance(value, str) else go_json(value)


def jsonpath(document: str, path: str) -> Any:
    """The value at a simple JSONPath (``$``, ``.key``, ``[0]``, ``['key']``) in a JSON document."""
    steps, rest = [], path.removeprefix("$")
    while rest and path.startswith("$") and (step := _JSONPATH_STEP.match(rest)):
        steps.append(step)
        rest = rest[step.end() :]
    if rest or not path.startswith("$"):
        raise UnsupportedTemplate(f"jsonpath {path!r}: only $, .key, [index] and ['key'] are implemented")
    try:
        value = json.loads(document)
    except json.JSONDecodeError as exc:
        raise _NodeError(
            f"failed to evaluate expression: jsonpath: not JSON ({exc}): {document[:200]!r}"
        ) from None
    for step in steps:
        key, index = step[1] or step[3], step[2]
        if index:
            if not isinstance(value, list) or int(index) >= len(value):
                raise _NodeError(
                    f"failed to evaluate expression: jsonpath {path}: index {index} out of range"
                )
            value = value[int(index)]
        elif not isinstance(value, dict) or key not in value:
            raise _NodeError(f"failed to evaluate expression: jsonpath {path}: key {key!r} not found")
        else:
            value = value[key]
    return value


_WHEN_TOKEN = re.compile(
    r"\s*(?:(?P<op>==|!=)|(?P<str>'[^']*'|\"[^\"]*\")|(?P<num>-?\d+(?:\.\d+)?)(?![\w.])|(?P<word>[A-Za-z_][\w.]*)|(?P<other>\S+))"
)


def evaluate_when(when: str) -> bool:
    """A substituted ``when`` as Argo's shouldExecute (govaluate) decides it, for ``a == b`` and
    ``a != b`` over booleans, numbers, quoted strings and bare words (bare words are strings)."""
    if not when.strip():
        return True
    tokens = [(m.lastgroup, m.group(m.lastgroup)) for m in _WHEN_TOKEN.finditer(when) if m.lastgroup]
    if any(kind == "other" for kind, _ in tokens):
        raise UnsupportedTemplate(f"when {when!r}: only <value> == <value> and != are implemented")
    values: list[Any] = []
    for kind, text in tokens:
        if kind == "num":
            values.append(float(text))
        elif kind == "str":
            values.append(text[1:-1])
        elif kind == "word":
            values.append({"true": True, "false": False}.get(text, text))
        else:
            values.append(text)
    shapes = [kind == "op" for kind, _ in tokens]
    if shapes == [False] and isinstance(values[0], bool):
        return values[0]
    if shapes != [False, True, False]:
        raise _NodeError(f"Invalid 'when' expression '{when}'")
    left, op, right = values
    equal = type(left) is type(right) and left == right  # govaluate compares with reflect.DeepEqual
    return equal if op == "==" else not equal


# --- Retries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryDecision:
    """What processNodeRetries decides after an attempt failed: retry or stop (with the retry node's
    message), and how long Argo waits first (it waits the backoff before it looks at the policy)."""

    retry: bool
    backoff_s: float = 0.0
    message: str = ""


def _int_or_string(value: Any, where: str) -> int:
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", str(value)):
        raise UnsupportedTemplate(f"{where}: {value!r} is not an integer")
    return int(value)


def retry_decision(
    strategy: Mapping[str, Any],
    *,
    attempts: int,
    last_phase: str,
    last_message: str,
    first_started: float,
    last_finished: float,
    now: float,
) -> RetryDecision:
    """Argo's ``processNodeRetries`` (operator.go) for ``limit``, ``retryPolicy`` and ``backoff``."""
    limit = _int_or_string(strategy["limit"], "retryStrategy.limit")
    waited = 0.0
    backoff = strategy.get("backoff")
    if backoff:
        deadline = None
        if backoff.get("maxDuration"):
            deadline = first_started + parse_duration(backoff["maxDuration"])
            if now > deadline:
                return RetryDecision(False, 0.0, "Max duration limit exceeded")
        if not backoff.get("duration"):
            raise TemplateError("no base duration specified for retryStrategy")
        wait = parse_duration(backoff["duration"])
        factor = _int_or_string(backoff.get("factor", 0), "retryStrategy.backoff.factor")
        if factor > 0:
            wait *= factor ** (attempts - 1)  # the first retry waits `duration`
        if deadline is not None and last_finished + wait > deadline:
            return RetryDecision(False, 0.0, "Backoff would exceed max duration limit")
        if now < last_finished + wait and attempts <= limit:
            waited = last_finished + wait - now
    on_failed, on_error = {"Always": (True, True), "OnFailure": (True, False), "OnError": (False, True)}[
        strategy.get("retryPolicy") or "OnFailure"
    ]
    if (last_phase == "Failed" and not on_failed) or (last_phase == "Error" and not on_error):
        return RetryDecision(False, waited, last_message)
    if attempts > limit:
        return RetryDecision(False, waited, "No more retries left")
    return RetryDecision(True, waited)


# --- Pod spec -> ContainerSpec ------------------------------------------------------------------


class _PodConfigError(Exception):
    """What the kubelet reports as CreateContainerConfigError: the pod stays Pending."""


def container_spec(
    template: Mapping[str, Any],
    *,
    pod_security: Mapping[str, Any],
    volumes: Mapping[str, Mapping[str, Any]],
    secrets: Secrets = _EMPTY,
    image_user: Callable[[str], str] | None = None,
    name: str | None = None,
) -> ContainerSpec:
    """The container a (substituted) container template's pod runs, in ``ContainerSpec`` terms.

    Raises ``_PodConfigError`` where the kubelet would refuse to create the container (a missing
    secret or key, runAsNonRoot with a root image user)."""
    container = template["container"]
    # Pod-level settings apply unless the container sets its own (Kubernetes' rule).
    security = {**pod_security, **container.get("securityContext", {})}
    user, group = security.get("runAsUser"), security.get("runAsGroup")
    fs_group = pod_security.get("fsGroup")
    if fs_group is not None and fs_group != group:
        raise UnsupportedTemplate(
            f"securityContext.fsGroup {fs_group} != runAsGroup {group}: no extra groups"
        )
    if security.get("runAsNonRoot"):
        _verify_non_root(container["image"], user, image_user)
    tmpfs = {}
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            raise TemplateError(f"volume {mount['name']!r} not found in spec.volumes")
        tmpfs[mount["mountPath"]] = str(volumes[mount["name"]].get("emptyDir", {}).get("sizeLimit", ""))
    limits = container.get("resources", {}).get("limits", {})
    texts = [*container.get("command", []), *container.get("args", [])]
    texts += [str(e.get("value", "")) for e in container.get("env", [])]
    if any("$(" in text for text in texts):
        raise UnsupportedTemplate(
            f"template {template['name']}: Kubernetes' $(VAR) expansion not implemented"
        )
    return ContainerSpec(
        image=container["image"],
        command=list(container.get("command", [])),
        args=list(container.get("args", [])),
        env=_environment(container.get("env", []), secrets),
        user=user,
        group=group,
        read_only=bool(security.get("readOnlyRootFilesystem", False)),
        cap_drop=tuple(security.get("capabilities", {}).get("drop", ())),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
        # Kubernetes runs a pod Unconfined unless it asks for a profile (kubelet SeccompDefault is off).
        seccomp=security.get("seccompProfile", {}).get("type", "Unconfined"),
        tmpfs=tmpfs,
        cpus=str(limits["cpu"]) if "cpu" in limits else None,
        memory=str(limits["memory"]) if "memory" in limits else None,
        workdir=container.get("workingDir"),
        name=name,
    )


def _verify_non_root(image: str, user: int | None, image_user: Callable[[str], str] | None) -> None:
    """The kubelet's verifyRunAsNonRoot."""
    if user is not None:
        if user == 0:
            raise _PodConfigError("container's runAsUser breaks non-root policy")
        return
    if image_user is None:
        raise UnsupportedTemplate(f"{image}: runAsNonRoot without runAsUser needs the runner's image_user")
    configured = image_user(image).split(":")[0]
    if configured in ("", "0"):
        raise _PodConfigError("container has runAsNonRoot and image will run as root")
    if not configured.isdigit():
        raise _PodConfigError(
            f"container has runAsNonRoot and image has non-numeric user ({configured}), "
            "cannot verify user is non-root"
        )


def _environment(env: Sequence[Mapping[str, Any]], secrets: Secrets) -> dict[str, str]:
    values = {}
    for item in env:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            values[item["name"]] = str(item.get("value", ""))
        elif ref["name"] not in secrets:
            raise _PodConfigError(f'secret "{ref["name"]}" not found')
        elif ref["key"] not in secrets[ref["name"]]:
            raise _PodConfigError(f"couldn't find key {ref['key']} in Secret {ref['name']}")
        else:
            values[item["name"]] = secrets[ref["name"]][ref["key"]]
    return values


# --- Results ------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """A node's outputs: parameters, ``result`` (the main container's stdout) and artifact keys."""

    parameters: dict[str, str] = field(default_factory=dict)
    result: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> key in the bucket


@dataclass
class Attempt:
    """One pod: how it ended, as ``kubectl describe`` and the Argo node would show it."""

    pod: str
    phase: str
    reason: str  # Completed, Error, DeadlineExceeded or CreateContainerConfigError
    message: str = ""
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    termination_message: str = ""
    spec: ContainerSpec | None = None
    outputs: Outputs = field(default_factory=Outputs)
    backoff_s: float = 0.0  # what Argo waits after this attempt before deciding on a retry


@dataclass
class Node:
    """A workflow node, named as Argo names it without the workflow's name ("train",
    "deploy[0].deploy", "onExit"); pod nodes hold their attempts (one unless retried)."""

    name: str
    type: str  # DAG, Steps, StepGroup, Pod, Skipped
    template: str = ""
    phase: str = "Running"
    message: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    outputs: Outputs = field(default_factory=Outputs)

    @property
    def exit_code(self) -> int | None:
        return self.attempts[-1].exit_code if self.attempts else None

    @property
    def backoffs_s(self) -> list[float]:
        """Argo's waits between attempts (unscaled), for assertions."""
        return [a.backoff_s for a in self.attempts if a.backoff_s]


@dataclass
class WorkflowRun:
    """How a workflow ended: its phase and message (as ``argo get`` shows them) and every node."""

    name: str
    phase: str
    message: str
    nodes: dict[str, Node]
    duration_s: float
    service_account: str | None = None

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


# --- The artifact repository --------------------------------------------------------------------


class ArtifactStore(Protocol):
    """Argo's artifact repository: one bucket. ``download_file`` raises if the key is missing."""

    def upload_file(self, path: Path, key: str) -> None: ...

    def download_file(self, key: str, path: Path) -> None: ...


@dataclass(frozen=True)
class S3Bucket:
    """An ``ArtifactStore`` over a boto3 S3 client (any endpoint: SeaweedFS, MinIO, AWS)."""

    client: Any
    bucket: str

    def upload_file(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, key)

    def download_file(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, key, str(path))


# --- The runner ---------------------------------------------------------------------------------


def pod_name(workflow: str, node: str, template: str) -> str:
    """Argo's v2 pod name: ``<workflow>-<template>-<fnv32a(node name)>``."""
    digest = 0x811C9DC5
    for byte in node.encode():
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{f'{workflow}-{template}'[:242]}-{digest}"


@dataclass(frozen=True)
class ArgoRunner:
    """Runs WorkflowTemplates as Argo's controller would, each pod as one container.

    ``run_container`` runs a container to completion (``Podman.run``); past ``timeout_s`` it raises
    ``TimeoutError``, ``subprocess.TimeoutExpired`` or an error raised from one (as Podman.run
    does). ``store`` is the artifact bucket; ``workdir`` holds each pod's host folders (outputs,
    inputs, termination log). ``secrets`` are the namespace's Secrets. Argo's retry backoffs are
    slept times ``backoff_scale`` and recorded unscaled. ``image_user`` gives an image's USER, for
    runAsNonRoot without runAsUser. ``extra_env``/``extra_mounts`` are what the kubelet adds to
    every container on a cluster (``KUBERNETES_SERVICE_HOST``, a service account token), for
    steps that need them.
    """

    run_container: RunContainer
    store: ArtifactStore
    workdir: Path
    secrets: Secrets = field(default_factory=dict)
    backoff_scale: float = 1.0
    step_timeout_s: float = 3600.0
    image_user: Callable[[str], str] | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    extra_mounts: Sequence[Mount] = ()
    sleep: Callable[[float], None] = time.sleep

    def run(
        self, template: Mapping[str, Any], *, parameters: Mapping[str, str] = _EMPTY, name: str | None = None
    ) -> WorkflowRun:
        """Submit ``template`` (``argo submit --from workflowtemplate/<name>``) and run it to the end."""
        check_supported(template)
        name = name or f"{template['metadata']['name']}-{uuid.uuid4().hex[:5]}"  # generateName
        return _Execution(self, template, name).run(parameters)


@dataclass
class _Execution:
    """One workflow's state while it runs (the controller's view of its nodes)."""

    runner: ArgoRunner
    template: Mapping[str, Any]
    name: str
    nodes: dict[str, Node] = field(default_factory=dict)
    status: str = "Running"
    skew: float = 0.0  # Argo's backoff time not actually slept: the clock runs as Argo's would
    started: float = field(default_factory=time.monotonic)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))  # metadata.uid, set by the API server

    def now(self) -> float:
        return time.monotonic() + self.skew

    def run(self, parameters: Mapping[str, str]) -> WorkflowRun:
        spec = self.template["spec"]
        self.templates = {t["name"]: t for t in spec["templates"]}
        self.volumes = {v["name"]: v for v in spec.get("volumes", [])}
        declared = {p["name"]: p.get("value") for p in spec.get("arguments", {}).get("parameters", [])}
        unknown = set(parameters) - set(declared)
        if unknown:
            raise TemplateError(f"parameters not declared in spec.arguments: {sorted(unknown)}")
        self.parameters = {**declared, **parameters}
        missing = [k for k, v in self.parameters.items() if v is None]
        if missing:
            raise TemplateError(f"spec.arguments.parameters.{missing[0]}.value is required")
        entry = self.execute(self.name, spec["entrypoint"], dict(self.parameters), {})
        # operator.go: the exit handler sees the entry node's phase as workflow.status.
        self.status = {"Succeeded": "Succeeded", "Skipped": "Succeeded", "Omitted": "Succeeded"}.get(
            entry.phase, entry.phase
        )
        phase, message = self.status, entry.message
        if "onExit" in spec:
            exit_node = self.execute(f"{self.name}.onExit", spec["onExit"], dict(self.parameters), {})
            if phase == "Succeeded" and exit_node.phase in FAILED:
                phase, message = exit_node.phase, exit_node.message
        return WorkflowRun(
            self.name, phase, message, self.nodes, self.now() - self.started, spec.get("serviceAccountName")
        )

    def scope(self, inputs: Mapping[str, str] = _EMPTY) -> dict[str, str]:
        scope = {
            "workflow.name": self.name,
            "workflow.uid": self.uid,
            "workflow.namespace": self.template["metadata"].get("namespace", "default"),
            "workflow.status": self.status,
            "workflow.duration": f"{self.now() - self.started:f}",  # Go's %f of the seconds
        }
        scope |= {f"workflow.parameters.{k}": v for k, v in self.parameters.items()}
        return scope | {f"inputs.parameters.{k}": v for k, v in inputs.items()}

    def record(self, node: Node) -> Node:
        self.nodes[node.name] = node
        return node

    def short(self, node_name: str) -> str:
        return node_name.removeprefix(f"{self.name}.")

    def execute(
        self, node_name: str, template_name: str, parameters: dict[str, str], artifacts: dict[str, str]
    ) -> Node:
        """Run one template as the node ``node_name`` with its arguments bound to its inputs."""
        if template_name not in self.templates:
            raise TemplateError(f"template {template_name!r} not found")
        tmpl = self.templates[template_name]
        inputs = {}
        for declared in tmpl.get("inputs", {}).get("parameters", []):
            if declared["name"] not in parameters:
                message = f"inputs.parameters.{declared['name']} was not supplied"
                return self.record(Node(self.short(node_name), "Pod", template_name, "Error", message))
            inputs[declared["name"]] = parameters[declared["name"]]
        if "dag" in tmpl:
            return self.dag(node_name, tmpl, inputs)
        if "steps" in tmpl:
            return self.steps(node_name, tmpl, inputs)
        return self.pod(node_name, tmpl, inputs, artifacts)

    def arguments(self, arguments: Mapping[str, Any], scope: Mapping[str, str]) -> tuple[dict, dict]:
        parameters = {}
        for parameter in arguments.get("parameters", []):
            if "value" not in parameter:
                raise TemplateError(f"arguments.parameters.{parameter['name']}: a value is required")
            parameters[parameter["name"]] = substitute(str(parameter["value"]), scope)
        artifacts = {}
        for artifact in arguments.get("artifacts", []):
            ref = re.fullmatch(r"\{\{\s*(tasks\.[\w-]+\.outputs\.artifacts\.[\w-]+)\s*\}\}", artifact["from"])
            if not ref:
                raise UnsupportedTemplate(
                    f"artifact from {artifact['from']!r}: only tasks.T.outputs.artifacts.A"
                )
            if ref[1] not in scope:
                raise TemplateError(f"failed to resolve {artifact['from']}")
            artifacts[artifact["name"]] = scope[ref[1]]
        return parameters, artifacts

    def dag(self, node_name: str, tmpl: Mapping[str, Any], inputs: dict[str, str]) -> Node:
        tasks = {task["name"]: task for task in tmpl["dag"]["tasks"]}
        graph = {name: task.get("dependencies", []) for name, task in tasks.items()}
        unknown = {d for deps in graph.values() for d in deps} - set(tasks)
        if unknown:
            raise TemplateError(f"template {tmpl['name']}: dependencies on unknown tasks {sorted(unknown)}")
        try:
            order = list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            raise TemplateError(f"template {tmpl['name']}: dependency cycle {exc.args[1]}") from None
        done: dict[str, Node] = {}
        results: dict[str, str] = {}  # tasks.T.outputs.*, once T has run
        for name in order:
            task, child = tasks[name], f"{node_name}.{name}"
            # `dependencies: [A]` means `depends: A.Succeeded || A.Skipped || A.Daemoned` (ancestry.go).
            if any(done[d].phase not in ("Succeeded", "Skipped") for d in graph[name]):
                message = "omitted: depends condition not met"
                done[name] = self.record(
                    Node(self.short(child), "Skipped", task["template"], "Omitted", message)
                )
                continue
            try:
                parameters, artifacts = self.arguments(
                    task.get("arguments", {}), self.scope(inputs) | results
                )
            except _NodeError as exc:  # a node that never ran, as Argo records it
                done[name] = self.record(
                    Node(self.short(child), "Skipped", task["template"], "Error", str(exc))
                )
                continue
            done[name] = node = self.execute(child, task["template"], parameters, artifacts)
            prefix = f"tasks.{name}.outputs"
            results[f"{prefix}.result"] = node.outputs.result or ""
            results |= {f"{prefix}.parameters.{k}": v for k, v in node.outputs.parameters.items()}
            results |= {f"{prefix}.artifacts.{k}": v for k, v in node.outputs.artifacts.items()}
        # assessDAGPhase: a failed task fails its branch, its omitted descendants inherit that.
        failed = [node.phase for node in done.values() if node.phase in FAILED]
        return self.record(
            Node(self.short(node_name), "DAG", tmpl["name"], failed[0] if failed else "Succeeded")
        )

    def steps(self, node_name: str, tmpl: Mapping[str, Any], inputs: dict[str, str]) -> Node:
        scope = self.scope(inputs)
        node = Node(self.short(node_name), "Steps", tmpl["name"], "Succeeded")
        for i, group in enumerate(tmpl["steps"]):
            group_name = f"{node_name}[{i}]"
            children = []
            for step in group:
                child = f"{group_name}.{step['name']}"
                when = substitute(step.get("when", ""), scope)
                try:
                    proceed = evaluate_when(when)
                except _NodeError as exc:
                    children.append(
                        self.record(Node(self.short(child), "Skipped", step["template"], "Error", str(exc)))
                    )
                    continue
                if not proceed:
                    message = f"when '{when}' evaluated false"
                    children.append(
                        self.record(Node(self.short(child), "Skipped", step["template"], "Skipped", message))
                    )
                    continue
                parameters, artifacts = self.arguments(step.get("arguments", {}), scope)
                children.append(self.execute(child, step["template"], parameters, artifacts))
            failed = [c for c in children if c.phase in FAILED]
            message = f"child '{failed[0].name}' failed" if failed else ""
            group_node = Node(
                self.short(group_name), "StepGroup", "", "Failed" if failed else "Succeeded", message
            )
            self.record(group_node)
            if failed:
                node.phase, node.message = "Failed", message
                break
        return self.record(node)

    def pod(self, node_name: str, tmpl: Mapping[str, Any], inputs: dict[str, str], artifacts: dict) -> Node:
        """A container template, retried as its retryStrategy says (child nodes ``name(0)``, ...)."""
        strategy = tmpl.get("retryStrategy")
        attempts: list[Attempt] = []
        message = None
        first_started = self.now()
        while True:
            retries = {"retries": str(len(attempts))} if strategy else {}
            child = f"{node_name}({len(attempts)})" if strategy else node_name
            timeout = self.runner.step_timeout_s
            max_duration = (strategy or {}).get("backoff", {}).get("maxDuration")
            if attempts and max_duration:  # a retried pod's activeDeadlineSeconds ends at maxDuration
                timeout = min(timeout, first_started + parse_duration(max_duration) - self.now())
            resolved = _substitute_all(tmpl, self.scope(inputs) | retries)
            timeout = min(timeout, self.pod_deadline_s(resolved, node_name))
            attempts.append(attempt := self.attempt(child, resolved, artifacts, timeout))
            if attempt.phase == "Succeeded" or not strategy or attempt.reason == "CreateContainerConfigError":
                break  # a pod the kubelet cannot configure stays Pending: Argo never retries it
            finished = self.now()  # the controller looks as soon as the pod ends
            decision = retry_decision(
                strategy,
                attempts=len(attempts),
                last_phase=attempt.phase,
                last_message=attempt.message,
                first_started=first_started,
                last_finished=finished,
                now=finished,
            )
            attempt.backoff_s = decision.backoff_s
            slept = decision.backoff_s * self.runner.backoff_scale
            self.runner.sleep(slept)
            self.skew += decision.backoff_s - slept
            if not decision.retry:
                message = decision.message
                break
        last = attempts[-1]
        node = Node(
            self.short(node_name), "Pod", tmpl["name"], last.phase, last.message, attempts, last.outputs
        )
        if message is not None:
            node.message = message
        return self.record(node)

    def pod_deadline_s(self, tmpl: Mapping[str, Any], node_name: str) -> float:
        """A pod's activeDeadlineSeconds as createWorkflowPod (workflowpod.go) sets it: the
        template's, or what is left of the workflow's when that is less, except in the exit
        handler (which runs even past the workflow's deadline)."""
        deadlines = [math.inf]
        if "activeDeadlineSeconds" in tmpl:
            where = f"templates[{tmpl['name']}].activeDeadlineSeconds"
            deadlines.append(float(_int_or_string(tmpl["activeDeadlineSeconds"], where)))
        workflow = self.template["spec"].get("activeDeadlineSeconds")
        if workflow is not None and not node_name.startswith(f"{self.name}.onExit"):
            where = "spec.activeDeadlineSeconds"
            deadlines.append(self.started + _int_or_string(workflow, where) - self.now())
        return min(deadlines)

    def attempt(self, node_name: str, tmpl: Mapping[str, Any], artifacts: dict, timeout_s: float) -> Attempt:
        """One pod: Argo's init container (inputs), the main container, the wait container (outputs)."""
        pod = pod_name(self.name, node_name, tmpl["name"])
        host = self.runner.workdir / pod
        shutil.rmtree(host, ignore_errors=True)
        host.mkdir(parents=True)
        fs_group = self.template["spec"].get("securityContext", {}).get("fsGroup")
        try:
            spec = container_spec(
                tmpl,
                pod_security=self.template["spec"].get("securityContext", {}),
                volumes=self.volumes,
                secrets=self.runner.secrets,
                image_user=self.runner.image_user,
                name=pod,
            )
        except _PodConfigError as exc:
            return Attempt(pod, "Error", "CreateContainerConfigError", f"CreateContainerConfigError: {exc}")
        outputs = _output_folders(tmpl, host / "outputs", fs_group)
        termination = host / "termination-log"
        termination.touch()
        termination.chmod(0o666)  # the kubelet's file: writable by any container user
        mounts = [Mount(source, target, read_only=False) for target, source in outputs.items()]
        mounts.append(Mount(termination, TERMINATION_LOG, read_only=False))
        try:
            mounts += self.load_inputs(tmpl, artifacts, host / "inputs")
        except Exception as exc:  # noqa: BLE001 - any store failure is the init container's error
            return Attempt(pod, "Error", "Error", f"init: Error (exit code 1): {exc}", spec=spec)
        spec = replace(
            spec,
            env={**self.runner.extra_env, **spec.env},
            mounts=(*spec.mounts, *mounts, *self.runner.extra_mounts),
        )
        try:
            finished = self.runner.run_container(spec, max(timeout_s, 0.0))
        except Exception as exc:
            # A timeout as TimeoutError, subprocess's TimeoutExpired, or an error it caused (Podman.run).
            timeouts = (TimeoutError, subprocess.TimeoutExpired)
            if not (isinstance(exc, timeouts) or isinstance(exc.__cause__, timeouts)):
                raise
            message = "Pod was active on the node longer than the specified deadline"
            return Attempt(pod, "Failed", "DeadlineExceeded", message, spec=spec)
        term = termination.read_bytes()[:MAX_TERMINATION_BYTES].decode(errors="replace")
        saved, errors = self.save_outputs(tmpl, pod, outputs, finished.stdout, host / "archives")
        attempt = Attempt(
            pod, "Succeeded", "Completed", "", finished.exit_code, finished.stdout, finished.stderr
        )
        attempt.termination_message, attempt.spec, attempt.outputs = term, spec, saved
        if finished.exit_code != 0:  # inferFailedReason: the main container's failure comes first
            attempt.phase, attempt.reason = "Failed", "Error"
            attempt.message = f"main: Error (exit code {finished.exit_code})" + (f": {term}" if term else "")
        elif errors:
            attempt.phase, attempt.message = "Error", f"wait: Error (exit code 1): {'; '.join(errors)}"
        return attempt

    def load_inputs(self, tmpl: Mapping[str, Any], artifacts: dict, host: Path) -> list[Mount]:
        """Fetch each input artifact's archive and unpack it, read-only at its path.

        Argo's init container unpacks as the pod's user (the pod-level securityContext applies to
        it too), so the files are that user's: here they are chowned to it after unpacking.
        """
        pod_security = self.template["spec"].get("securityContext", {})
        owner = (pod_security.get("runAsUser", -1), pod_security.get("runAsGroup", -1))
        mounts = []
        for artifact in tmpl.get("inputs", {}).get("artifacts", []):
            if artifact["name"] not in artifacts:
                raise _NodeError(f"required artifact '{artifact['name']}' not supplied")
            archive, unpacked = host / f"{artifact['name']}.tgz", host / artifact["name"]
            unpacked.mkdir(parents=True)
            self.runner.store.download_file(artifacts[artifact["name"]], archive)
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
            for path in [unpacked, *unpacked.rglob("*")]:
                os.chown(path, *owner, follow_symlinks=False)
            entries = list(unpacked.iterdir())  # untar: a single entry is the artifact itself
            mounts.append(
                Mount(entries[0] if len(entries) == 1 else unpacked, artifact["path"], read_only=True)
            )
        return mounts

    def save_outputs(
        self, tmpl: Mapping[str, Any], pod: str, folders: Mapping[str, Path], stdout: str, archives: Path
    ) -> tuple[Outputs, list[str]]:
        """What the wait container saves, whatever the exit code: result, parameters, artifacts."""
        data = stdout.removesuffix("\n").encode()[-MAX_RESULT_BYTES:]
        outputs, errors = Outputs(result=data.decode(errors="replace")), []
        declared = tmpl.get("outputs", {})
        for parameter in declared.get("parameters", []):
            path = _on_host(parameter["valueFrom"]["path"], folders)
            if path.is_file():
                outputs.parameters[parameter["name"]] = path.read_text().removesuffix("\n")
            else:
                errors.append(f"open {parameter['valueFrom']['path']}: no such file or directory")
        for artifact in declared.get("artifacts", []):
            path = _on_host(artifact["path"], folders)
            if not path.exists():
                errors.append(f"{artifact['path']}: no such file or directory")
                continue
            archives.mkdir(exist_ok=True)
            archive = archives / f"{artifact['name']}.tgz"
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(path, arcname=posixpath.basename(artifact["path"]))
            key = f"{self.name}/{pod}/{artifact['name']}.tgz"  # the default key format, then <name>.tgz
            self.runner.store.upload_file(archive, key)
            outputs.artifacts[artifact["name"]] = key
        return outputs, errors


def _output_folders(tmpl: Mapping[str, Any], host: Path, fs_group: int | None) -> dict[str, Path]:
    """A host folder bind-mounted at each folder the outputs are written in (the emptyDir the wait
    container reads them from on a cluster), writable by the pod's user as an emptyDir is."""
    outputs = tmpl.get("outputs", {})
    paths = [p["valueFrom"]["path"] for p in outputs.get("parameters", [])]
    paths += [a["path"] for a in outputs.get("artifacts", [])]
    mounted = [m["mountPath"] for m in tmpl["container"].get("volumeMounts", [])]
    folders: dict[str, Path] = {}
    for folder in sorted({posixpath.dirname(p) for p in paths}, key=len):
        if not any(folder.startswith(m.rstrip("/") + "/") for m in mounted):
            raise UnsupportedTemplate(
                f"template {tmpl['name']}: outputs in {folder} must be in a folder below an emptyDir mount"
            )
        if any(folder.startswith(outer + "/") for outer in folders):
            continue
        folders[folder] = host / str(len(folders))
        folders[folder].mkdir(parents=True)
        folders[folder].chmod(0o2777 if fs_group is not None else 0o777)
        if fs_group is not None:
            with contextlib.suppress(PermissionError):  # as root, like the kubelet
                os.chown(folders[folder], -1, fs_group)
    return folders


def _on_host(path: str, folders: Mapping[str, Path]) -> Path:
    folder = next(f for f in folders if path.startswith(f + "/"))
    return folders[folder] / posixpath.relpath(path, folder)
