"""`handoff compile --target kfp|argo|all`: one graph, two engines, each checked against its own schema.

The KFP pipeline comes from the real KFP compiler, the Argo WorkflowTemplate from hera; both are
held to ``graph.cluster_plan``. The Argo output is validated against Argo's published JSON schema
(strict about unknown fields), round-tripped through hera's models, and each of its pods is
validated as a Kubernetes Pod with ``kubernetes-validate`` (strict). ``pipelines/goldens/`` holds
the default project's compiled output; regenerate it with
``pytest tests/test_compile_targets.py --regenerate-goldens``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml
from hera.workflows import models as hera_models

from handoff import __version__
from handoff.cli import app
from handoff.errors import HandoffError
from handoff.kube import train_job
from handoff.labels import labels
from handoff.project import Project
from handoff.settings import IMAGE_ENV
from handoff_pipelines import STEPS
from handoff_pipelines.argo import EXIT_HANDLER, GATE_TEMPLATE, OUTCOME_PROGRAM, PARAMETERS
from handoff_pipelines.compiled import ARGO_FILE, KFP_FILE, TRAIN_JOB_FILE, compile_project
from handoff_pipelines.graph import RUN_AS_USER, TRACKING_URI_ENV, build_pipeline, cluster_plan

from .conftest import TEMPLATE, check_golden, edit_yaml, generate, handoff
from .fake_kube import strict

pytestmark = pytest.mark.unit

GOLDENS = TEMPLATE / "pipelines" / "goldens"
ARGO_SCHEMA = Path(__file__).parent / "schemas" / "argo-workflows.schema.json"
K8S_VERSION = "1.31.0"
PINNED = "registry.example.com/ml/digits-classifier@sha256:" + "0123456789abcdef" * 4
# Goldens hold this instead of the template version: a release must leave the old version nowhere
# in the tree (tests/test_release.py), and goldens that carry none need no rewriting.
VERSION_PLACEHOLDER = "X.Y.Z"


def without_version(text: str) -> str:
    return re.sub(rf"(?<![0-9.]){re.escape(__version__)}(?![0-9])", VERSION_PLACEHOLDER, text)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A project's compiled output, read back."""

    folder: Path
    ir: dict[str, Any]
    platform: dict[str, Any]
    argo: dict[str, Any]

    @property
    def containers(self) -> dict[str, dict[str, Any]]:
        """KFP: the container of each step's executor (``exec-<step>``)."""
        return {
            n.removeprefix("exec-"): e["container"] for n, e in self.ir["deploymentSpec"]["executors"].items()
        }

    @property
    def pod_settings(self) -> dict[str, dict[str, Any]]:
        """KFP: each step's kfp-kubernetes settings (the platform spec)."""
        executors = self.platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        return {name.removeprefix("exec-"): settings for name, settings in executors.items()}

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """KFP: each step's task, wherever it sits (deploy is inside the gate's condition)."""
        found = {}
        for name, task in self.ir["root"]["dag"]["tasks"].items():
            inner = self.ir["components"][task["componentRef"]["name"]].get("dag")
            found.update(inner["tasks"] if inner else {name: task})
        return found

    @property
    def templates(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.argo["spec"]["templates"]}

    @property
    def dag_tasks(self) -> dict[str, dict[str, Any]]:
        (dag,) = [t["dag"] for t in self.argo["spec"]["templates"] if "dag" in t]
        return {task["name"]: task for task in dag["tasks"]}


def compile_both(project_dir: Path, out: Path, image: str | None = None) -> Compiled:
    compile_project(project_dir, out, image=image, targets=("kfp", "argo"))
    ir, platform = yaml.safe_load_all((out / KFP_FILE).read_text())
    return Compiled(out, ir, platform, yaml.safe_load((out / ARGO_FILE).read_text()))


@pytest.fixture(scope="module")
def default_compiled(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compile_both(default_project, tmp_path_factory.mktemp("compiled"))


@cache
def argo_validator(kind: str) -> jsonschema.Draft202012Validator:
    """Argo's JSON schema for ``kind``, strict about unknown fields (typos)."""
    definitions = strict(json.loads(ARGO_SCHEMA.read_text())["definitions"])
    # Kubernetes' IntOrString is an integer or a string; the generated schema narrows it to string,
    # which would refuse Argo's own examples (`limit: 3`).
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"type": ["integer", "string"]}
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{kind}", "definitions": definitions}
    )


def argo_errors(obj: dict[str, Any], kind: str = "WorkflowTemplate") -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in argo_validator(kind).iter_errors(obj)]


def pods(argo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each container template as the Pod Argo makes of it (its main container and what the
    workflow adds: pod security context, service account, volumes, placement)."""
    spec = argo["spec"]
    found = {}
    for template in spec["templates"]:
        if "container" not in template:
            continue
        mounted = {m["name"] for m in template["container"].get("volumeMounts", [])}
        pod_spec = {
            "serviceAccountName": spec["serviceAccountName"],
            "securityContext": spec["securityContext"],
            "volumes": [v for v in spec["volumes"] if v["name"] in mounted],
            "containers": [{"name": "main", **template["container"]}],
            **{k: template[k] for k in ("nodeSelector", "tolerations") if k in template},
        }
        found[template["name"]] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": template["name"], "labels": spec["podMetadata"]["labels"]},
            "spec": pod_spec,
        }
    return found


def pod_errors(pod: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


# --- goldens ----------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("name", [KFP_FILE, ARGO_FILE])
def test_compiled_output_of_the_default_project_matches_its_golden(
    default_compiled: Compiled, name: str, request: pytest.FixtureRequest
) -> None:
    golden = GOLDENS / name
    actual = without_version((default_compiled.folder / name).read_text())
    check_golden(
        golden,
        actual,
        request,
        "tests/test_compile_targets.py",
        "`handoff compile` writes for the default project",
    )


@pytest.mark.golden
def test_goldens_hold_no_version_and_nothing_from_this_machine() -> None:
    for name in (KFP_FILE, ARGO_FILE):
        text = (GOLDENS / name).read_text()
        assert without_version(text) == text and f"(ml-template {VERSION_PLACEHOLDER})" in text, name
        assert str(TEMPLATE) not in text and "/home/" not in text and "pytest" not in text, name


# --- one graph, both engines -------------------------------------------------------------------


def test_both_engines_run_the_same_graph_and_deploy_only_what_register_promoted(
    default_project: Path, default_compiled: Compiled
) -> None:
    plan = {s.name: set(s.after) for s in cluster_plan(Project.load(default_project).settings.training)}
    assert tuple(plan) == STEPS
    kfp = default_compiled.ir["root"]["dag"]["tasks"]
    kfp_edges = {name: set(task.get("dependentTasks", [])) for name, task in kfp.items() if name in STEPS}
    kfp_edges["deploy"] = set(kfp["condition-1"]["dependentTasks"])  # deploy sits in the gate's group
    assert kfp_edges == plan
    assert {n: set(t.get("dependencies", [])) for n, t in default_compiled.dag_tasks.items()} == plan
    # KFP: deploy runs only when register returned True: it promoted this run's version (a failed
    # gate, or a race lost to another run, leaves it unpromoted and undeployed).
    assert kfp["condition-1"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--register-Output'] == true"
    )
    # Argo: the deploy task runs a one-step template whose `when` tests register's promotion.
    deploy = default_compiled.dag_tasks["deploy"]
    assert deploy["template"] == GATE_TEMPLATE
    promoted = {p["name"]: p["value"] for p in deploy["arguments"]["parameters"]}["promoted"]
    assert promoted == "{{=jsonpath(tasks.register.outputs.parameters.record, '$.promoted')}}"
    ((step,),) = default_compiled.templates[GATE_TEMPLATE]["steps"]
    assert (step["template"], step["when"]) == ("deploy", "{{inputs.parameters.promoted}} == true")
    # Both refuse, at deploy time, a version that is no longer the champion.
    assert default_compiled.templates["deploy"]["container"]["args"][-1] == "--champion-only"
    for name in STEPS:  # each step's own command, in the project image, nothing installed
        container = default_compiled.templates[name]["container"]
        assert container["command"] == ["python", "-m", "handoff", name]
        assert container["image"] == Project.load(default_project).settings.image
    assert default_compiled.argo["spec"]["onExit"] == EXIT_HANDLER


def test_argo_steps_call_options_the_handoff_cli_has(default_compiled: Compiled, tmp_path: Path) -> None:
    """Parse each template's command line with the real CLI (nothing runs), inputs made to exist."""
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in STEPS:
        args = default_compiled.templates[name]["container"]["args"]
        args = [a.replace("/tmp/", f"{tmp_path}/") for a in args]
        for artifact in default_compiled.templates[name].get("inputs", {}).get("artifacts", []):
            path = Path(artifact["path"].replace("/tmp/", f"{tmp_path}/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix:
                path.touch()
            else:
                path.mkdir(exist_ok=True)
        commands[name].make_context(name, args)  # raises on an unknown option or a missing input


@pytest.mark.parametrize(
    ("expression", "module", "result", "path"),
    [
        ("train.outputs.parameters.record, '$.mlflow_run_id'", "train", "TrainResult", ["mlflow_run_id"]),
        ("register.outputs.parameters.record, '$.promoted'", "register", "RegisterResult", ["promoted"]),
        ("register.outputs.parameters.record, '$.version'", "register", "RegisterResult", ["version"]),
    ],
)
def test_argo_reads_fields_the_step_records_have(
    expression: str, module: str, result: str, path: list[str]
) -> None:
    assert any(expression in value for values in PARAMETERS.values() for value in values.values())
    import importlib
    import typing

    cls: Any = getattr(importlib.import_module(f"handoff.steps.{module}"), result)
    for field in path:
        assert dataclasses.is_dataclass(cls) and field in {f.name for f in dataclasses.fields(cls)}, field
        cls = typing.get_type_hints(cls)[field]


def test_steps_hand_values_on_in_files_never_through_stdout(default_compiled: Compiled) -> None:
    """Every value a step reads from another comes from a file the other wrote (an output parameter
    read with ``valueFrom.path``, or an artifact), never from what it printed (``outputs.result``)."""
    text = json.dumps(default_compiled.argo)
    assert ".outputs.result" not in text
    for name, path in (("train", "/tmp/outputs/train.json"), ("register", "/tmp/outputs/register.json")):
        template = default_compiled.templates[name]
        assert template["outputs"]["parameters"] == [{"name": "record", "valueFrom": {"path": path}}]
        args = template["container"]["args"]
        assert args[args.index("--record") + 1] == path


def test_the_exit_handler_prints_and_records_the_outcome() -> None:
    done = subprocess.run(
        [sys.executable, "-c", OUTCOME_PROGRAM, "digits-classifier-x7k2p", "Failed", "754.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "handoff: workflow digits-classifier-x7k2p Failed after 754 s\n"


# --- Argo: schema, hera, pods ------------------------------------------------------------------


def test_argo_template_passes_argos_schema_strictly_and_round_trips_through_hera(
    default_compiled: Compiled,
) -> None:
    assert argo_errors(default_compiled.argo) == []
    model = hera_models.WorkflowTemplate.model_validate(default_compiled.argo)
    assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == default_compiled.argo


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t["spec"]["templates"][1].__setitem__("retryStrategey", {"limit": 2}), "retryStrategey"),
        (lambda t: t["spec"]["securityContext"].__setitem__("runAsNonroot", True), "runAsNonroot"),
        (lambda t: t["spec"]["securityContext"].__setitem__("runAsUser", "10001"), "'10001' is not of type"),
    ],
)
def test_the_schema_check_catches_typos_and_wrong_types(
    default_compiled: Compiled, change: Any, expected: str
) -> None:
    broken = copy.deepcopy(default_compiled.argo)
    change(broken)
    errors = argo_errors(broken)
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith("$.spec.")  # the path says where


def test_every_argo_pod_is_a_valid_restricted_pod(default_compiled: Compiled) -> None:
    found = pods(default_compiled.argo)
    assert set(found) == {*STEPS, EXIT_HANDLER}
    for name, pod in found.items():
        assert pod_errors(pod) == [], name
        spec = pod["spec"]
        assert spec["securityContext"] == {
            "fsGroup": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        (container,) = spec["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        }, name
        assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"], name
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"], name
        resources = container["resources"]
        assert resources["requests"] == resources["limits"] and set(resources["limits"]) >= {"cpu", "memory"}
    # The strict Pod check can fail: a typo in a container is refused.
    pod = copy.deepcopy(found["train"])
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    assert pod_errors(pod) != []


# --- cluster settings reach both engines -------------------------------------------------------


GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SECRETS = [
    {"name": "MLFLOW_TRACKING_TOKEN", "secret": "mlflow", "key": "token"},
    {"name": "AWS_ACCESS_KEY_ID", "secret": "s3-credentials", "key": "access-key"},
]
TRACKING = "https://mlflow.example.com"


@pytest.fixture(scope="module")
def gpu_compiled(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    project = Path(copy_project(default_project, tmp_path_factory.mktemp("gpu")))

    def change(settings: dict[str, Any]) -> None:
        settings["training"].update(
            gpus=2, cpu="8", memory="32Gi", node_selector={"pool": "gpu"}, tolerations=[GPU_TAINT]
        )
        settings["cluster"].update(
            mlflow_tracking_uri=TRACKING,
            secret_env=SECRETS,
            retries=3,
            service_account="ml-runner",
            timeout_s=100_000,
        )

    edit_yaml(project / "handoff.yaml", change)
    return compile_both(project, project / "compiled")


def copy_project(source: Path, parent: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, parent / source.name))


def test_training_resources_and_placement_go_to_the_train_step_on_both_engines(
    gpu_compiled: Compiled,
) -> None:
    kfp = gpu_compiled.containers["train"]["resources"]
    assert (kfp["resourceCpuRequest"], kfp["resourceCpuLimit"]) == ("8", "8")
    assert (kfp["resourceMemoryRequest"], kfp["resourceMemoryLimit"]) == ("32Gi", "32Gi")
    accelerator = kfp["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
    assert gpu_compiled.pod_settings["train"]["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert gpu_compiled.pod_settings["train"]["tolerations"] == [GPU_TAINT]
    argo = gpu_compiled.templates["train"]
    train_amounts = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert argo["container"]["resources"] == {"requests": train_amounts, "limits": train_amounts}
    assert argo["nodeSelector"] == {"pool": "gpu"} and argo["tolerations"] == [GPU_TAINT]
    assert {"mountPath": "/dev/shm", "name": "dshm"} in argo["container"]["volumeMounts"]
    # The other steps: their own CPU and memory (requests = limits), no GPUs, no placement.
    for step in cluster_plan(Project.load(gpu_compiled.folder.parent).settings.training)[1:]:
        resources = gpu_compiled.containers[step.name]["resources"]
        assert {k: v for k, v in resources.items() if k.startswith("resource")} == {
            "resourceCpuLimit": step.cpu,
            "resourceCpuRequest": step.cpu,
            "resourceMemoryLimit": step.memory,
            "resourceMemoryRequest": step.memory,
        }, step.name
        amounts = {"cpu": step.cpu, "memory": step.memory}
        assert gpu_compiled.templates[step.name]["container"]["resources"] == {
            "requests": amounts,
            "limits": amounts,
        }
        assert "nodeSelector" not in gpu_compiled.templates[step.name]
        assert "nodeSelector" not in gpu_compiled.pod_settings[step.name]


def test_retries_with_backoff_only_on_the_steps_safe_to_retry(gpu_compiled: Compiled) -> None:
    for name in STEPS:
        kfp, argo = (
            gpu_compiled.tasks[name].get("retryPolicy"),
            gpu_compiled.templates[name].get("retryStrategy"),
        )
        if name == "deploy":  # moves traffic and rolls back by itself
            assert kfp is None and argo is None
            continue
        window = "86400s" if name == "train" else "3600s"  # train: training.job.timeout_s
        assert kfp == {
            "maxRetryCount": 3,
            "backoffDuration": "30s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": window,
        }, name
        assert argo == {
            "limit": 3,
            "retryPolicy": "Always",
            "backoff": {"duration": "30s", "factor": 2, "maxDuration": window},
        }, name


def test_deadlines_and_cleanup_come_from_handoff_yaml_on_both_engines(
    gpu_compiled: Compiled, default_compiled: Compiled
) -> None:
    # The whole run: cluster.timeout_s (Argo stops every pod then); one training attempt:
    # training.job.timeout_s; on KFP, which has no run deadline, each step's pod gets one.
    argo = gpu_compiled.argo["spec"]
    assert argo["activeDeadlineSeconds"] == 100_000
    assert gpu_compiled.templates["train"]["activeDeadlineSeconds"] == 86_400
    for name in STEPS:
        expected = "86400" if name == "train" else "100000"
        assert gpu_compiled.pod_settings[name]["activeDeadlineSeconds"] == expected, name
    # Pods go when the run succeeds (a failed run keeps them for `kubectl logs`); the workflow
    # itself a day after success, a week after failure.
    assert argo["podGC"] == {"strategy": "OnWorkflowSuccess"}
    assert argo["ttlStrategy"] == {"secondsAfterSuccess": 86_400, "secondsAfterFailure": 7 * 86_400}
    assert default_compiled.argo["spec"]["activeDeadlineSeconds"] == 2 * 86_400  # the default: two days
    assert argo_errors(gpu_compiled.argo) == []


def test_secrets_are_secret_references_and_the_tracking_uri_is_env_never_a_parameter(
    gpu_compiled: Compiled,
) -> None:
    expected_kfp = [
        {
            "keyToEnv": [{"envVar": s["name"], "secretKey": s["key"]}],
            "optional": False,
            "secretName": s["secret"],
            "secretNameParameter": {"runtimeValue": {"constant": s["secret"]}},
        }
        for s in SECRETS
    ]
    expected_argo = [
        {"name": s["name"], "valueFrom": {"secretKeyRef": {"name": s["secret"], "key": s["key"]}}}
        for s in SECRETS
    ]
    for name in STEPS:
        assert gpu_compiled.pod_settings[name]["secretAsEnv"] == expected_kfp, name
        assert {"name": TRACKING_URI_ENV, "value": TRACKING} in gpu_compiled.containers[name]["env"], name
        env = gpu_compiled.templates[name]["container"]["env"]
        image = {"name": IMAGE_ENV, "value": Project.load(gpu_compiled.folder.parent).settings.image}
        assert env == [image, {"name": TRACKING_URI_ENV, "value": TRACKING}, *expected_argo], name
    # The only parameters either pipeline takes: where the project is in the image.
    assert set(gpu_compiled.ir["root"]["inputDefinitions"]["parameters"]) == {"project_dir"}
    assert [p["name"] for p in gpu_compiled.argo["spec"]["arguments"]["parameters"]] == ["project-dir"]
    assert gpu_compiled.argo["spec"]["serviceAccountName"] == "ml-runner"
    assert argo_errors(gpu_compiled.argo) == []


def test_kfp_steps_run_as_the_image_user_with_scratch_space(default_compiled: Compiled) -> None:
    for name, settings in default_compiled.pod_settings.items():
        assert settings["securityContext"] == {
            "runAsUser": str(RUN_AS_USER),
            "runAsGroup": str(RUN_AS_USER),
            "runAsNonRoot": True,
        }, name
        assert {"mountPath": "/tmp", "volumeName": "tmp"} in settings["emptyDirMounts"], name
        assert settings["podMetadata"]["labels"] == labels("digits-classifier"), name
    assert RUN_AS_USER == train_job.RUN_AS_USER


def test_no_run_reuses_another_runs_results_and_side_effects_are_never_cached(
    default_compiled: Compiled,
) -> None:
    tasks = default_compiled.tasks
    # KFP keys its cache on image, command and inputs: train's inputs hold the run's id, and every
    # later step reads (through its inputs) what train wrote in this run.
    assert tasks["train"]["inputs"]["parameters"]["run_key"] == {
        "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}
    }
    for name in ("register", "deploy"):  # the registry and the server change every time
        assert tasks[name]["cachingOptions"] == {}, name
    for name in ("train", "export", "optimize", "evaluate"):
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name
    assert all("memoize" not in t for t in default_compiled.argo["spec"]["templates"])


def test_local_runs_get_none_of_the_cluster_settings(tmp_path: Path) -> None:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(image="digits-classifier:local"), str(tmp_path / "local.yaml"))
    documents = list(yaml.safe_load_all((tmp_path / "local.yaml").read_text()))
    assert len(documents) == 1  # no kfp-kubernetes platform spec at all
    text = (tmp_path / "local.yaml").read_text()
    assert "retryPolicy" not in text and "resourceCpuLimit" not in text and "cachingOptions: {}" not in text
    assert IMAGE_ENV not in text  # register records handoff.image "-"


# --- artifacts that match the task --------------------------------------------------------------


def evaluate_artifacts(ir: dict[str, Any]) -> dict[str, str]:
    """KFP: the evaluate step's output artifacts, name -> type (``system.Metrics``, ...)."""
    outputs = ir["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    return {name: spec["artifactType"]["schemaTitle"] for name, spec in outputs.items()}


def test_a_regression_project_shows_residuals_and_no_classification_metrics(
    default_compiled: Compiled, tmp_path: Path
) -> None:
    classification = evaluate_artifacts(default_compiled.ir)
    assert classification["confusion"] == "system.ClassificationMetrics" and "residuals" not in classification

    regression = generate(tmp_path / "generated", starter="tabular-regression")
    compile_project(regression, tmp_path / "compiled", targets=("kfp",))
    ir, _ = yaml.safe_load_all((tmp_path / "compiled" / KFP_FILE).read_text())
    artifacts = evaluate_artifacts(ir)
    assert "system.ClassificationMetrics" not in artifacts.values()
    assert artifacts["metrics"] == "system.Metrics" and artifacts["residuals"] == "system.HTML"
    # Everything else the later steps read is where it was: same graph, same step names.
    assert {name: t for name, t in artifacts.items() if name != "residuals"} == {
        name: t for name, t in classification.items() if name != "confusion"
    }
    assert set(ir["root"]["dag"]["tasks"]) == set(default_compiled.ir["root"]["dag"]["tasks"])


# --- which targets, which image -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("orchestrator", "written"),
    [("kfp", [KFP_FILE]), ("argo", [ARGO_FILE]), ("both", [KFP_FILE, ARGO_FILE])],
)
def test_the_default_target_is_handoff_yamls_orchestrator(
    project: Path, orchestrator: str, written: list[str]
) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s.update(orchestrator=orchestrator))
    paths = compile_project(project, project / "compiled")
    assert [p.name for p in paths] == written
    assert sorted(p.name for p in (project / "compiled").iterdir()) == sorted(written)


def test_image_option_pins_every_step_of_both_targets(project: Path) -> None:
    tagged = Project.load(project).settings.image
    result = handoff("compile", "--target", "all", "--image", PINNED, cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["wrote", f"compiled/{KFP_FILE}", "wrote", f"compiled/{ARGO_FILE}"]
    ir = next(yaml.safe_load_all((project / "compiled" / KFP_FILE).read_text()))
    assert {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()} == {PINNED}
    argo = yaml.safe_load((project / "compiled" / ARGO_FILE).read_text())
    assert {t["container"]["image"] for t in argo["spec"]["templates"] if "container" in t} == {PINNED}
    # Every step is told its image, which register records on the version (handoff.image).
    pinned = {"name": IMAGE_ENV, "value": PINNED}
    for step in STEPS:
        assert pinned in ir["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["env"], step
        (template,) = [t for t in argo["spec"]["templates"] if t["name"] == step]
        assert pinned in template["container"]["env"], step
    # The image is the only difference from a compile by tag, with how it is pulled (a tag at
    # every pod start, a digest once per node); handoff.yaml keeps its tag.
    by_tag = compile_both(project, project / "by-tag")
    for name in (KFP_FILE, ARGO_FILE):
        pinned_text = (project / "compiled" / name).read_text()
        by_tag_text = (by_tag.folder / name).read_text()
        assert "PullPolicy: Always" in by_tag_text and "PullPolicy: Always" not in pinned_text
        pulled_once = by_tag_text.replace("PullPolicy: Always", "PullPolicy: IfNotPresent")
        assert pulled_once.replace(tagged, PINNED) == pinned_text
    assert Project.load(project).settings.image == tagged


def test_multi_node_training_is_refused_for_argo_naming_the_setting(project: Path) -> None:
    edit_yaml(
        project / "handoff.yaml",
        lambda s: s["training"].update(nodes=2, job={"workspace_claim": "shared-workspace"}),
    )
    result = handoff("compile", "--target", "all", cwd=project)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {project.resolve() / 'handoff.yaml'}: training.nodes: 2 nodes train as")
    assert "--target kfp" in line
    assert not (project / "compiled").exists()  # refused before anything is written
    # The KFP target still compiles the pipeline and its TrainJob.
    paths = compile_project(project, project / "compiled", targets=("kfp",))
    assert [p.name for p in paths] == [KFP_FILE, TRAIN_JOB_FILE]
    # Its train step only launches and watches the job (which gets the GPUs): it asks for little.
    ir = next(yaml.safe_load_all(paths[0].read_text()))
    resources = ir["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert (resources["resourceCpuLimit"], resources["resourceMemoryLimit"]) == ("1", "2Gi")
    assert "accelerator" not in resources
    with pytest.raises(HandoffError, match=r"training\.nodes"):
        compile_project(project, project / "compiled", targets=("argo",))


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        (None, "is not set, so the pods would each use a sqlite file in their read-only image"),
        ("sqlite:///mlflow.db", "is sqlite:///mlflow.db, a store on one machine that no pod can share"),
        ("file:///srv/mlruns", "is file:///srv/mlruns, a store on one machine that no pod can share"),
    ],
)
def test_a_tracking_store_pods_cannot_share_is_refused_at_compile(
    project: Path, uri: str | None, problem: str
) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update(mlflow_tracking_uri=uri))
    for target in ("kfp", "argo"):
        result = handoff("compile", "--target", target, cwd=project)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        (line,) = result.stderr.splitlines()
        assert line == (
            f"error: {project.resolve() / 'handoff.yaml'}: cluster.mlflow_tracking_uri: {problem}: set it "
            "to the MLflow tracking server the pipeline's pods reach "
            "(e.g. http://mlflow.mlflow.svc.cluster.local:5000)"
        )
        assert not (project / "compiled").exists()  # refused before anything is written
