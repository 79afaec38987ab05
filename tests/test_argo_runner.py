"""The rehearsal's Argo runner (``tests/rehearsal/argo_runner.py``) against Argo's own rules.

Unit tests drive it with hand-written WorkflowTemplates and with the default project's compiled
one, through a fake ``run_container`` that plays each step; expectations that come from Argo's
source name the file. One slow test runs a tiny WorkflowTemplate with real podman containers.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from handoff.project import Project
from handoff_pipelines.argo import workflow_template_dict

from .rehearsal.argo_runner import (
    ArgoRunner,
    TemplateError,
    UnsupportedTemplate,
    WorkflowRun,
    check_supported,
    evaluate_when,
    go_json,
    jsonpath,
    parse_duration,
    parse_quantity,
    pod_name,
    retry_decision,
    substitute,
)
from .rehearsal.containers import ContainerSpec, Finished
from .rehearsal.fixtures import RehearsalImages
from .rehearsal.podman import Podman


class FolderStore:
    """The runner's artifact store protocol over a local folder (a bucket stand-in)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def upload_file(self, path: Path, key: str) -> None:
        (self.root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.root / key)

    def download_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self.root / key, path)  # FileNotFoundError, as boto3 raises for a missing key


Play = Callable[[ContainerSpec, "Pod"], Finished]


class Pod:
    """What a faked container sees: its output folder, inputs and termination log on the host."""

    def __init__(self, spec: ContainerSpec) -> None:
        self.spec = spec
        self.mounts = {m.target: m for m in spec.mounts}

    def out(self, name: str) -> Path:
        return self.mounts["/tmp/outputs"].source / name

    def read(self, path: str) -> Path:
        assert self.mounts[path].read_only
        return self.mounts[path].source

    def terminate(self, message: str) -> None:
        self.mounts["/dev/termination-log"].source.write_text(message)


class FakeContainers:
    """``run_container`` playing each step by the template it belongs to (the pod name's middle)."""

    def __init__(self, workflow: str, plays: dict[str, Play]) -> None:
        self.workflow, self.plays = workflow, plays
        self.specs: dict[str, list[ContainerSpec]] = {}

    def __call__(self, spec: ContainerSpec, timeout_s: float) -> Finished:
        assert spec.name is not None
        step = spec.name.removeprefix(f"{self.workflow}-").rsplit("-", 1)[0]
        self.specs.setdefault(step, []).append(spec)
        return self.plays[step](spec, Pod(spec))


def ok(stdout: str = "") -> Play:
    return lambda spec, pod: Finished(0, stdout, "")


def fail(code: int = 1, message: str = "") -> Play:
    def play(spec: ContainerSpec, pod: Pod) -> Finished:
        if message:
            pod.terminate(message)
        return Finished(code, "", "boom")

    return play


def run(
    template: dict[str, Any], plays: dict[str, Play], tmp_path: Path, **options: Any
) -> tuple[WorkflowRun, dict[str, list[ContainerSpec]]]:
    """Run ``template`` as the workflow "wf" with faked containers: the result and each step's specs."""
    options.setdefault("sleep", lambda s: None)
    containers = FakeContainers("wf", plays)
    runner = ArgoRunner(containers, FolderStore(tmp_path / "bucket"), tmp_path / "pods", **options)
    result = runner.run(template, name="wf")
    return result, containers.specs


def container(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "container": {
            "image": "img",
            "command": ["run", name],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        },
        **extra,
    }


def workflow(tasks: list[dict[str, Any]], *templates: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "WorkflowTemplate",
        "metadata": {"name": "wf"},
        "spec": {
            "entrypoint": "main",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001},
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "templates": [{"name": "main", "dag": {"tasks": tasks}}, *templates],
            **spec,
        },
    }


# --- Pure parts ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_substitution_resolves_known_variables_and_refuses_unknown_ones() -> None:
    scope = {"workflow.parameters.project-dir": "/app", "inputs.parameters.run-id": "r1"}
    assert substitute(
        "--project={{workflow.parameters.project-dir}} {{ inputs.parameters.run-id }}", scope
    ) == ("--project=/app r1")
    with pytest.raises(TemplateError, match=r"failed to resolve \{\{tasks.train.status\}\}"):
        substitute("{{tasks.train.status}}", scope)


@pytest.mark.unit
def test_expressions_format_values_as_argo_does() -> None:
    record = json.dumps({"gate": {"passed": True, "score": 0.5}, "version": 3, "run": "abc"})
    scope = {"tasks.t.outputs.result": record}

    def one(path: str) -> str:
        return substitute(f"{{{{=jsonpath(tasks.t.outputs.result, '{path}')}}}}", scope)

    # A bool and a number come out as Go's json.Marshal writes them; a string as it is.
    assert [one("$.gate.passed"), one("$.version"), one("$.gate.score"), one("$.run")] == [
        "true",
        "3",
        "0.5",
        "abc",
    ]
    # util/template/template_test.go (ExprSimpleObjectOutput, ExprObjectArrayOutput): sorted keys, no spaces.
    employees = (
        '{"employees": [{"name": "Baris", "age":43},{"name": "Mo", "age": 42}, {"name": "Jai", "age" :44}]}'
    )
    assert go_json(jsonpath(employees, "$.employees[0]")) == '{"age":43,"name":"Baris"}'
    assert go_json(jsonpath(employees, "$")) == (
        '{"employees":[{"age":43,"name":"Baris"},{"age":42,"name":"Mo"},{"age":44,"name":"Jai"}]}'
    )
    assert [go_json(x) for x in (1e-7, 0.00001, 1e21, "<&>")] == [
        "1e-7",
        "0.00001",
        "1e+21",
        '"\\u003c\\u0026\\u003e"',
    ]
    assert substitute("{{=tasks.t.outputs.result}}", scope) == record
    with pytest.raises(Exception, match="key 'missing' not found"):
        one("$.gate.missing")
    with pytest.raises(UnsupportedTemplate, match="jsonpath"):
        one("$.employees[*].name")
    with pytest.raises(UnsupportedTemplate, match="expression"):
        substitute("{{=sprig.trim(tasks.t.outputs.result)}}", scope)


@pytest.mark.unit
def test_when_is_decided_as_govaluate_does() -> None:
    assert evaluate_when("true == true") and not evaluate_when("false == true")
    assert not evaluate_when("True == true")  # a bare word is a string, never equal to a bool
    assert evaluate_when("1 == 1.0") and evaluate_when("foo != bar") and evaluate_when("'a b' == 'a b'")
    assert evaluate_when("") and evaluate_when("true")
    with pytest.raises(Exception, match="Invalid 'when' expression"):  # an empty parameter: a node Error
        evaluate_when(" == true")
    with pytest.raises(UnsupportedTemplate):
        evaluate_when("true == true && 1 < 2")


@pytest.mark.unit
def test_durations_and_quantities() -> None:
    assert [parse_duration(d) for d in ("30s", "86400s", "90", "1m30s", "1h", "500ms")] == [
        30,
        86400,
        90,
        90,
        3600,
        0.5,
    ]
    assert [parse_quantity(q) for q in ("100m", "2", "256Mi", "8Gi", "1k")] == [
        0.1,
        2,
        256 * 2**20,
        8 * 2**30,
        1000,
    ]
    # workflow/util/pod_name.go: <workflow>-<template>-<fnv32a(node name)> (FNV-1a test vectors).
    assert pod_name("wf", "a", "train") == "wf-train-3826002220"
    assert pod_name("wf", "foobar", "x") == "wf-x-3214735720"


def decide(strategy: dict[str, Any], attempts: int, phase: str = "Failed", elapsed: float = 0.0) -> Any:
    return retry_decision(
        strategy,
        attempts=attempts,
        last_phase=phase,
        last_message="main: Error (exit code 1)",
        first_started=0.0,
        last_finished=elapsed,
        now=elapsed,
    )


@pytest.mark.unit
def test_retry_decisions_follow_process_node_retries() -> None:
    backoff = {"duration": "30s", "factor": 2, "maxDuration": "3600s"}
    always = {"limit": 2, "retryPolicy": "Always", "backoff": backoff}
    # limit 2: three attempts in all; waits duration * factor^(attempt-1).
    assert [(d.retry, d.backoff_s) for d in (decide(always, 1), decide(always, 2))] == [
        (True, 30),
        (True, 60),
    ]
    assert decide(always, 3).message == "No more retries left" and not decide(always, 3).retry
    assert decide(always, 1, "Error").retry  # Always retries errors (an evicted pod) too
    on_failure = {**always, "retryPolicy": "OnFailure"}
    stop = decide(on_failure, 1, "Error")
    # Argo waits the backoff before it looks at the policy, then keeps the attempt's message.
    assert (stop.retry, stop.backoff_s, stop.message) == (False, 30, "main: Error (exit code 1)")
    assert not decide({**always, "retryPolicy": "OnError"}, 1, "Failed").retry
    assert decide({"limit": "1"}, 1).retry and not decide({"limit": 1}, 1, "Error").retry  # default OnFailure
    assert decide(always, 1, elapsed=3601).message == "Max duration limit exceeded"
    assert decide(always, 2, elapsed=3550).message == "Backoff would exceed max duration limit"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda t: t["spec"]["templates"][1].update(nodeSelector={"gpu": "a100"}),
            "templates[step].nodeSelector",
        ),
        (lambda t: t["spec"]["templates"][0]["dag"]["tasks"][0].update(depends="x"), "tasks[step].depends"),
        (
            lambda t: t["spec"]["templates"][1]["container"].update(resources={"limits": {"amd.com/gpu": 1}}),
            "amd.com/gpu",
        ),
        (
            lambda t: t["spec"]["templates"][1]["container"].update(
                securityContext={"capabilities": {"add": ["NET_ADMIN"]}}
            ),
            "capabilities.add",
        ),
        (
            lambda t: t["spec"]["templates"][1].update(retryStrategy={"limit": 1, "expression": "true"}),
            "retryStrategy.expression",
        ),
        (
            lambda t: t["spec"]["templates"][1].update(
                retryStrategy={"limit": 1, "retryPolicy": "OnTransientError"}
            ),
            "retryPolicy",
        ),
        (
            lambda t: t["spec"]["volumes"].append({"name": "data", "hostPath": {"path": "/data"}}),
            "volumes[data].hostPath",
        ),
        (lambda t: t["spec"].update(parallelism=2), "spec.parallelism"),
        (
            lambda t: t["spec"]["templates"][1].update(retryStrategy={"retryPolicy": "Always"}),
            "a limit is required",
        ),
    ],
)
def test_refuses_what_it_does_not_implement(change: Callable[[dict[str, Any]], None], field: str) -> None:
    template = workflow([{"name": "step", "template": "step"}], container("step"))
    check_supported(template)
    change(template)
    with pytest.raises(UnsupportedTemplate, match=re.escape(field)):
        check_supported(template)


@pytest.mark.unit
def test_refuses_expression_tags_in_when() -> None:
    """Argo evaluates ``when`` with govaluate after simple substitution; argo.py avoids ``{{=`` there."""
    gated = workflow(
        [{"name": "gate", "template": "gate"}],
        {
            "name": "gate",
            "steps": [[{"name": "s", "template": "s", "when": "{{=tasks.x.outputs.result}} == true"}]],
        },
        container("s"),
    )
    with pytest.raises(UnsupportedTemplate, match=r"steps\[s\]\.when"):
        check_supported(gated)


# --- The default project's compiled template ----------------------------------------------------


@pytest.fixture(scope="module")
def compiled(default_project: Path) -> dict[str, Any]:
    return workflow_template_dict(Project.load(default_project))


def play_handoff(promoted: bool = True, noise: str = "") -> dict[str, Play]:
    """The six steps and the exit handler as the compiled template wires them; register's record
    says whether it promoted the version (what the deploy gate reads). Register writes its record
    where ``--record`` says, as the CLI does, and prints it on stdout after ``noise`` (what a library
    could print there)."""

    def train(spec: ContainerSpec, pod: Pod) -> Finished:
        pod.out("checkpoint.pt").write_bytes(b"weights")
        pod.out("train.json").write_text(json.dumps({"mlflow_run_id": "run-1"}) + "\n")
        return Finished(0, "", "")

    def export(spec: ContainerSpec, pod: Pod) -> Finished:
        assert pod.read("/tmp/inputs/checkpoint.pt").read_bytes() == b"weights"
        (pod.out("onnx")).mkdir()
        (pod.out("onnx") / "model.onnx").write_bytes(b"onnx")
        return Finished(0, "", "")

    def optimize(spec: ContainerSpec, pod: Pod) -> Finished:
        assert (pod.read("/tmp/inputs/onnx") / "model.onnx").read_bytes() == b"onnx"
        (pod.out("optimized")).mkdir()
        (pod.out("optimized") / "model.onnx").write_bytes(b"int8")
        return Finished(0, "", "")

    def evaluate(spec: ContainerSpec, pod: Pod) -> Finished:
        # What optimize chose, not export's fp32 model.
        assert (pod.read("/tmp/inputs/optimized") / "model.onnx").read_bytes() == b"int8"
        assert spec.args[spec.args.index("--run-id") + 1] == "run-1"
        pod.out("evaluation.json").write_text(json.dumps({"gate": {"passed": promoted}}))
        pod.out("report").mkdir()
        (pod.out("report") / "index.md").write_text("report")
        return Finished(0, "", "")

    def register(spec: ContainerSpec, pod: Pod) -> Finished:
        assert (pod.read("/tmp/inputs/report") / "index.md").read_text() == "report"
        assert (pod.read("/tmp/inputs/optimized") / "model.onnx").read_bytes() == b"int8"  # the one evaluated
        assert json.loads(pod.read("/tmp/inputs/evaluation.json").read_text())["gate"]["passed"] is promoted
        record = json.dumps({"version": 3, "promoted": promoted, "run_id": "run-1"})
        if "--record" in spec.args:
            path = spec.args[spec.args.index("--record") + 1]
            pod.out(path.removeprefix("/tmp/outputs/")).write_text(record + "\n")
        return Finished(0, noise + record + "\n", "")

    def deploy(spec: ContainerSpec, pod: Pod) -> Finished:
        assert spec.args[spec.args.index("--version") + 1] == "3"
        return Finished(0, "", "")

    def outcome(spec: ContainerSpec, pod: Pod) -> Finished:
        name, status, seconds = spec.args
        pod.terminate(f"handoff: workflow {name} {status} after {float(seconds):.0f} s")
        return Finished(0, "", "")

    return {
        "train": train,
        "export": export,
        "optimize": optimize,
        "evaluate": evaluate,
        "register": register,
        "deploy": deploy,
        "outcome": outcome,
    }


@pytest.mark.unit
def test_the_compiled_template_runs_and_hands_on_artifacts_and_parameters(
    compiled: dict[str, Any], tmp_path: Path
) -> None:
    result, _ = run(compiled, play_handoff(), tmp_path)
    assert result.phase == "Succeeded", [(n.name, n.phase, n.message) for n in result.nodes.values()]
    phases = {name: node.phase for name, node in result.nodes.items()}
    assert phases == {
        **dict.fromkeys(
            [
                "train",
                "export",
                "optimize",
                "evaluate",
                "register",
                "deploy",
                "deploy[0]",
                "deploy[0].deploy",
            ],
            "Succeeded",
        ),
        "wf": "Succeeded",
        "onExit": "Succeeded",
    }
    assert result["train"].outputs.parameters == {"record": json.dumps({"mlflow_run_id": "run-1"})}
    assert result["register"].outputs.parameters == {
        "record": json.dumps({"version": 3, "promoted": True, "run_id": "run-1"})
    }
    key = result["export"].outputs.artifacts["onnx-model"]
    assert (
        key == f"wf/{result['export'].attempts[0].pod}/onnx-model.tgz"
    )  # {{workflow.name}}/{{pod.name}}/<name>.tgz
    with tarfile.open(tmp_path / "bucket" / key) as tar:
        assert sorted(tar.getnames()) == ["onnx", "onnx/model.onnx"]
    assert result["onExit"].attempts[0].termination_message.startswith("handoff: workflow wf Succeeded after")
    assert result.service_account == compiled["spec"]["serviceAccountName"]


@pytest.mark.unit
def test_every_compiled_pod_runs_as_its_pod_spec_says(compiled: dict[str, Any], tmp_path: Path) -> None:
    _, specs = run(compiled, play_handoff(), tmp_path)
    templates = {t["name"]: t for t in compiled["spec"]["templates"]}
    assert sorted(specs) == ["deploy", "evaluate", "export", "optimize", "outcome", "register", "train"]
    for step, (spec,) in specs.items():
        container = templates[step]["container"]
        assert spec.image == container["image"]
        assert spec.command == container["command"]
        assert "{{" not in " ".join(spec.args)
        assert (spec.user, spec.group, spec.read_only, spec.cap_drop) == (10001, 10001, True, ("ALL",))
        assert spec.no_new_privileges and spec.seccomp == "RuntimeDefault"
        assert spec.tmpfs == ({"/tmp": "", "/dev/shm": ""} if step == "train" else {"/tmp": ""})
        limits = container["resources"]["limits"]
        assert (spec.cpus, spec.memory) == (limits["cpu"], limits["memory"])
        assert spec.env == {e["name"]: e["value"] for e in container.get("env", [])}
        mounts = {m.target: m.read_only for m in spec.mounts}
        inputs = {a["path"]: True for a in templates[step].get("inputs", {}).get("artifacts", [])}
        outputs = {"/tmp/outputs": False} if templates[step].get("outputs") else {}
        assert mounts == {**inputs, **outputs, "/dev/termination-log": False}
    assert (specs["train"][0].cpus, specs["train"][0].memory) == ("2", "8Gi")
    assert specs["train"][0].args[:2] == ["--project", "/app"]
    assert specs["register"][0].env["HANDOFF_IMAGE"] == specs["register"][0].image
    assert specs["outcome"][0].args[:2] == ["wf", "Succeeded"]


@pytest.mark.unit
def test_what_register_prints_on_stdout_does_not_reach_deploy(
    compiled: dict[str, Any], tmp_path: Path
) -> None:
    """Deploy's version and gate come from register's record file, not its stdout (``outputs.result``):
    a line a library prints there leaves them as they were."""
    noise = "2024/01/01 12:00:00 INFO mlflow: Registered model 'digits' version 3\n"
    result, specs = run(compiled, play_handoff(noise=noise), tmp_path)
    assert result.phase == "Succeeded", [(n.name, n.phase, n.message) for n in result.nodes.values()]
    assert result["deploy[0].deploy"].phase == "Succeeded"
    (deploy,) = specs["deploy"]
    assert deploy.args[deploy.args.index("--version") + 1] == "3"


@pytest.mark.unit
def test_an_unpromoted_version_is_not_deployed_and_the_workflow_succeeds(
    compiled: dict[str, Any], tmp_path: Path
) -> None:
    result, specs = run(compiled, play_handoff(promoted=False), tmp_path)
    assert result.phase == "Succeeded"
    assert result["deploy[0].deploy"].phase == "Skipped"
    assert result["deploy[0].deploy"].message == "when 'false == true' evaluated false"
    assert "deploy" not in specs


@pytest.mark.unit
def test_a_failing_step_is_retried_with_backoff_and_the_rest_omitted(
    compiled: dict[str, Any], tmp_path: Path
) -> None:
    slept: list[float] = []
    plays = {**play_handoff(), "evaluate": fail(2, "evaluate: gate data missing")}
    result, specs = run(compiled, plays, tmp_path, backoff_scale=0.01, sleep=slept.append)
    evaluate = result["evaluate"]
    assert (result.phase, evaluate.phase, evaluate.message) == ("Failed", "Failed", "No more retries left")
    assert [a.exit_code for a in evaluate.attempts] == [2, 2, 2]  # retryStrategy.limit 2
    assert evaluate.backoffs_s == [30, 60] and slept == pytest.approx([0.3, 0.6, 0.0])
    assert evaluate.attempts[0].message == "main: Error (exit code 2): evaluate: gate data missing"
    assert len({a.pod for a in evaluate.attempts}) == 3  # evaluate(0), evaluate(1), evaluate(2)
    assert result["register"].phase == result["deploy"].phase == "Omitted"
    assert specs["outcome"][0].args[1] == "Failed"


@pytest.mark.unit
def test_outputs_missing_after_success_are_an_error_and_retried(
    compiled: dict[str, Any], tmp_path: Path
) -> None:
    result, _ = run(compiled, {**play_handoff(), "train": ok()}, tmp_path)
    train = result["train"]
    assert [a.phase for a in train.attempts] == ["Error"] * 3
    assert "/tmp/outputs/checkpoint.pt: no such file or directory" in train.attempts[0].message
    assert result.phase == "Error" and result["export"].phase == "Omitted"


@pytest.mark.unit
def test_a_bad_record_errors_the_task_that_reads_it(compiled: dict[str, Any], tmp_path: Path) -> None:
    def register(spec: ContainerSpec, pod: Pod) -> Finished:
        pod.out("register.json").write_text("registered version 3\n")  # not the record
        return Finished(0, "", "")

    result, _ = run(compiled, {**play_handoff(), "register": register}, tmp_path)
    assert result["deploy"].phase == "Error" and "not JSON" in result["deploy"].message
    assert result.phase == "Error"


@pytest.mark.unit
def test_a_failing_exit_handler_fails_a_successful_workflow(compiled: dict[str, Any], tmp_path: Path) -> None:
    result, _ = run(compiled, {**play_handoff(), "outcome": fail(1)}, tmp_path)
    assert result["register"].phase == "Succeeded"
    assert (result.phase, result.message) == ("Failed", "main: Error (exit code 1)")


# --- Pod settings -------------------------------------------------------------------------------


def secret_template() -> dict[str, Any]:
    step = container("step", retryStrategy={"limit": 2, "retryPolicy": "Always"})
    step["container"]["env"] = [
        {"name": "PLAIN", "value": "1"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": "token"}}},
    ]
    return workflow([{"name": "step", "template": "step"}], step)


@pytest.mark.unit
def test_secret_env_comes_from_the_namespace_secrets(tmp_path: Path) -> None:
    result, specs = run(secret_template(), {"step": ok()}, tmp_path, secrets={"mlflow": {"token": "s3cr3t"}})
    assert result.phase == "Succeeded"
    assert specs["step"][0].env == {"PLAIN": "1", "TOKEN": "s3cr3t"}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("secrets", "message"),
    [({}, 'secret "mlflow" not found'), ({"mlflow": {}}, "couldn't find key token in Secret mlflow")],
)
def test_a_missing_secret_is_a_container_config_error_never_retried(
    tmp_path: Path, secrets: dict[str, dict[str, str]], message: str
) -> None:
    result, specs = run(secret_template(), {"step": ok()}, tmp_path, secrets=secrets)
    step = result["step"]
    assert (step.phase, [a.reason for a in step.attempts]) == ("Error", ["CreateContainerConfigError"])
    assert step.message == f"CreateContainerConfigError: {message}"
    assert "step" not in specs


@pytest.mark.unit
def test_run_as_non_root_without_a_user_checks_the_image_user(tmp_path: Path) -> None:
    template = workflow([{"name": "step", "template": "step"}], container("step"))
    template["spec"]["securityContext"] = {"runAsNonRoot": True}
    refused, _ = run(copy.deepcopy(template), {"step": ok()}, tmp_path / "a", image_user=lambda image: "")
    assert refused["step"].message.endswith("container has runAsNonRoot and image will run as root")
    named, _ = run(copy.deepcopy(template), {"step": ok()}, tmp_path / "b", image_user=lambda image: "app")
    assert "non-numeric user (app)" in named["step"].message
    result, specs = run(template, {"step": ok()}, tmp_path / "c", image_user=lambda image: "10001:10001")
    assert result.phase == "Succeeded" and specs["step"][0].user is None
    with pytest.raises(
        UnsupportedTemplate, match="image_user"
    ):  # the runner cannot tell who the image runs as
        run(template, {"step": ok()}, tmp_path / "d")


@pytest.mark.unit
def test_pod_and_container_security_contexts_merge_container_first(tmp_path: Path) -> None:
    step = container("step")
    step["container"]["securityContext"] = {"runAsUser": 2000, "seccompProfile": {"type": "Unconfined"}}
    step["container"]["resources"] = {"limits": {"cpu": "500m", "memory": "1Gi"}}
    step["container"]["workingDir"] = "/work"
    template = workflow([{"name": "step", "template": "step"}], step)
    template["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}]
    spec = run(template, {"step": ok()}, tmp_path)[1]["step"][0]
    assert (spec.user, spec.group, spec.seccomp) == (2000, 10001, "Unconfined")
    assert (spec.read_only, spec.cap_drop, spec.no_new_privileges) == (
        False,
        (),
        False,
    )  # Kubernetes' defaults
    assert (spec.tmpfs, spec.cpus, spec.memory, spec.workdir) == (
        {"/tmp": "64Mi"},
        "500m",
        "1Gi",
        "/work",
    )
    default = workflow([{"name": "step", "template": "step"}], container("step"))
    assert run(default, {"step": ok()}, tmp_path / "d")[1]["step"][0].seccomp == "Unconfined"


@pytest.mark.unit
def test_a_pod_past_its_deadline_fails(tmp_path: Path) -> None:
    def hang(spec: ContainerSpec, pod: Pod) -> Finished:
        try:
            raise subprocess.TimeoutExpired(["podman"], 1)
        except subprocess.TimeoutExpired as expired:
            raise RuntimeError("did not finish") from expired  # as Podman.run reports it

    result, _ = run(
        workflow([{"name": "step", "template": "step"}], container("step")), {"step": hang}, tmp_path
    )
    assert (result["step"].phase, result["step"].attempts[0].reason) == ("Failed", "DeadlineExceeded")


# --- Real containers ----------------------------------------------------------------------------


PRODUCE = """\
import json, os, sys
os.makedirs('/tmp/outputs/folder')
open('/tmp/outputs/folder/greeting.txt', 'w').write(sys.argv[1])
json.dump({'gate': {'passed': False}, 'n': 3}, open('/tmp/outputs/record.json', 'w'))
print(json.dumps({'version': 7}))
"""
CONSUME = """\
import json, os, sys
assert (os.getuid(), os.getgid()) == (10001, 10001), os.getuid()
assert open('/tmp/inputs/folder/greeting.txt').read() == 'hello'
assert json.load(open('/tmp/inputs/record.json'))['n'] == 3
assert sys.argv[1:] == ['false', '7'], sys.argv
for path in ('/etc/x', '/tmp/inputs/record.json', '/var/tmp/x'):
    try:
        open(path, 'a')
    except OSError:
        continue
    sys.exit(f'{path} is writable')
open('/dev/shm/x', 'w').write('ok')
open('/dev/termination-log', 'w').write('consumed')
"""
FLAKY = """\
import sys
if sys.argv[1] == '0':
    open('/dev/termination-log', 'w').write('flaky')
    sys.exit(3)
"""
OUTCOME = "import sys; print(' '.join(sys.argv[1:])); open('/dev/termination-log', 'w').write(sys.argv[2])"


def tiny_template(image: str) -> dict[str, Any]:
    def python(name: str, program: str, args: list[str], **extra: Any) -> dict[str, Any]:
        template = container(name, **extra)
        template["container"].update(image=image, command=["python3", "-c", program], args=args)
        template["container"]["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        template["container"]["resources"] = {"limits": {"cpu": "500m", "memory": "256Mi"}}
        return template

    handed = {
        "artifacts": [
            {"name": "record", "path": "/tmp/outputs/record.json"},
            {"name": "folder", "path": "/tmp/outputs/folder"},
        ]
    }
    produce = python(
        "produce",
        PRODUCE,
        ["{{workflow.parameters.greeting}}"],
        outputs={
            **handed,
            "parameters": [{"name": "record", "valueFrom": {"path": "/tmp/outputs/record.json"}}],
        },
    )
    consume = python(
        "consume",
        CONSUME,
        ["{{inputs.parameters.passed}}", "{{inputs.parameters.version}}"],
        inputs={
            "parameters": [{"name": "passed"}, {"name": "version"}],
            "artifacts": [
                {"name": "record", "path": "/tmp/inputs/record.json"},
                {"name": "folder", "path": "/tmp/inputs/folder"},
            ],
        },
    )
    consume["container"]["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    backoff = {"duration": "10s", "factor": 2, "maxDuration": "1h"}
    flaky = python(
        "flaky",
        FLAKY,
        ["{{retries}}"],
        retryStrategy={"limit": 1, "retryPolicy": "OnFailure", "backoff": backoff},
    )
    never = python("never", "raise SystemExit(1)", [])
    gate = {
        "name": "gate",
        "inputs": {"parameters": [{"name": "passed"}]},
        "steps": [[{"name": "never", "template": "never", "when": "{{inputs.parameters.passed}} == true"}]],
    }
    passed = "{{=jsonpath(tasks.produce.outputs.parameters.record, '$.gate.passed')}}"
    tasks: list[dict[str, Any]] = [
        {"name": "produce", "template": "produce"},
        {
            "name": "consume",
            "template": "consume",
            "dependencies": ["produce"],
            "arguments": {
                "artifacts": [
                    {"name": a, "from": f"{{{{tasks.produce.outputs.artifacts.{a}}}}}"}
                    for a in ("record", "folder")
                ],
                "parameters": [
                    {"name": "passed", "value": passed},
                    {"name": "version", "value": "{{=jsonpath(tasks.produce.outputs.result, '$.version')}}"},
                ],
            },
        },
        {
            "name": "gate",
            "template": "gate",
            "dependencies": ["consume"],
            "arguments": {"parameters": [{"name": "passed", "value": passed}]},
        },
        {"name": "flaky", "template": "flaky", "dependencies": ["produce"]},
    ]
    outcome = python(
        "outcome", OUTCOME, ["{{workflow.name}}", "{{workflow.status}}", "{{workflow.duration}}"]
    )
    template = workflow(tasks, produce, consume, gate, never, flaky, outcome, onExit="outcome")
    template["spec"]["arguments"] = {"parameters": [{"name": "greeting", "value": "hello"}]}
    template["spec"]["securityContext"] |= {"fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
    template["spec"]["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    return template


@pytest.mark.rehearsal
@pytest.mark.slow
def test_a_tiny_workflow_runs_in_real_containers(
    tmp_path: Path, podman: Podman, rehearsal_images: RehearsalImages
) -> None:
    """In the rehearsal's base image (python3), through the rehearsal's podman."""
    runner = ArgoRunner(
        podman.run,
        FolderStore(tmp_path / "bucket"),
        tmp_path / "pods",
        backoff_scale=0.01,
        step_timeout_s=120,
    )
    result = runner.run(tiny_template(rehearsal_images.base.ref))
    report = {
        name: (n.phase, n.message, [a.stderr[-500:] for a in n.attempts]) for name, n in result.nodes.items()
    }
    assert result.phase == "Succeeded", report
    assert result["consume"].attempts[0].termination_message == "consumed"
    assert result["gate[0].never"].phase == "Skipped"
    flaky = result["flaky"]
    assert [a.exit_code for a in flaky.attempts] == [3, 0] and flaky.backoffs_s == [10]
    assert flaky.attempts[0].message == "main: Error (exit code 3): flaky"
    name, status, seconds = result["onExit"].attempts[0].stdout.split()
    assert (name, status, result["onExit"].attempts[0].termination_message) == (
        result.name,
        "Succeeded",
        "Succeeded",
    )
    assert float(seconds) >= 10  # Argo's clock: the backoff counts in full
    assert (
        result["produce"].outputs.artifacts["folder"]
        == f"{result.name}/{result['produce'].attempts[0].pod}/folder.tgz"
    )
