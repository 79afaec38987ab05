"""The monitoring pipeline (`handoff monitor` as a pipeline step), compiled for both engines.

The KFP pipeline comes from the real KFP compiler and is loaded back with kfp; the Argo
WorkflowTemplate from hera, validated against Argo's JSON schema (strict about unknown fields),
round-tripped through hera's models, and each of its pods validated as a restricted Kubernetes
Pod. ``pipelines/goldens/monitor*.yaml`` hold the default project's (with a payload store set);
regenerate them with ``pytest tests/test_monitor_pipeline.py --regenerate-goldens``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hera.workflows import models as hera_models
from kfp import components

from handoff.cli import app
from handoff.errors import HandoffError
from handoff.labels import labels
from handoff.settings import IMAGE_ENV, TRACKING_URI_ENV
from handoff.step_entry import record_json
from handoff.steps import monitor as monitor_step
from handoff_pipelines import commands as pipeline_commands
from handoff_pipelines.compiled import (
    ARGO_FILE,
    KFP_FILE,
    MONITOR_ARGO_FILE,
    MONITOR_KFP_FILE,
    compile_project,
)
from handoff_pipelines.graph import RUN_AS_USER
from handoff_pipelines.monitor_pipeline import ARGO_OUTPUTS, FAIL_FLAG, MONITOR_PLAN, check_drift

from .conftest import TEMPLATE, check_golden, edit_yaml, handoff
from .test_compile_targets import (
    VERSION_PLACEHOLDER,
    argo_errors,
    pod_errors,
    pods,
    without_version,
)

pytestmark = pytest.mark.unit

GOLDENS = TEMPLATE / "pipelines" / "goldens"
STORE = "s3://handoff-payloads/payloads/digits-classifier"
MONITORED = (MONITOR_KFP_FILE, MONITOR_ARGO_FILE)
TRACKING = "https://mlflow.example.com"
SECRETS = [
    {"name": "MLFLOW_TRACKING_TOKEN", "secret": "mlflow", "key": "token"},
    {"name": "AWS_ACCESS_KEY_ID", "secret": "s3-credentials", "key": "access-key"},
]


@dataclasses.dataclass(frozen=True)
class Monitoring:
    """A project's compiled monitoring pipelines, read back."""

    folder: Path
    written: list[str]
    ir: dict[str, Any]
    platform: dict[str, Any]
    argo: dict[str, Any]

    @property
    def templates(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.argo["spec"]["templates"]}

    @property
    def kfp_pods(self) -> dict[str, dict[str, Any]]:
        executors = self.platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        return {name.removeprefix("exec-"): settings for name, settings in executors.items()}


def compile_monitored(project: Path, out: Path, **options: Any) -> Monitoring:
    written = compile_project(project, out, targets=("kfp", "argo"), **options)
    ir, platform = yaml.safe_load_all((out / MONITOR_KFP_FILE).read_text())
    argo = yaml.safe_load((out / MONITOR_ARGO_FILE).read_text())
    return Monitoring(out, [p.name for p in written], ir, platform, argo)


def with_store(source: Path, parent: Path, change: Any = None) -> Path:
    import shutil

    project = Path(shutil.copytree(source, parent / source.name))

    def edit(settings: dict[str, Any]) -> None:
        settings["monitoring"]["store"] = STORE
        if change:
            change(settings)

    edit_yaml(project / "handoff.yaml", edit)
    return project


@pytest.fixture(scope="module")
def monitored(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Monitoring:
    """The default project with a payload store, compiled for both engines (the goldens' source)."""
    project = with_store(default_project, tmp_path_factory.mktemp("monitored"))
    return compile_monitored(project, project / "compiled")


@pytest.fixture(scope="module")
def on_cluster(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Monitoring:
    """The same with handoff.yaml's cluster settings changed from their defaults."""

    def change(settings: dict[str, Any]) -> None:
        settings["cluster"].update(
            mlflow_tracking_uri=TRACKING, secret_env=SECRETS, retries=3, service_account="ml-runner"
        )

    project = with_store(default_project, tmp_path_factory.mktemp("on-cluster"), change)
    return compile_monitored(project, project / "compiled")


# --- goldens ----------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("name", MONITORED)
def test_compiled_monitoring_pipelines_match_their_goldens(
    monitored: Monitoring, name: str, request: pytest.FixtureRequest
) -> None:
    golden = GOLDENS / name
    actual = without_version((monitored.folder / name).read_text())
    expected = check_golden(
        golden,
        actual,
        request,
        "tests/test_monitor_pipeline.py",
        "`handoff compile` writes for the default project with monitoring.store set",
    )
    assert f"(handoff monitor, ml-template {VERSION_PLACEHOLDER})" in expected
    assert str(TEMPLATE) not in expected and "/home/" not in expected and "pytest" not in expected


# --- what compile writes, and when -------------------------------------------------------------


def test_a_project_with_a_store_gets_both_pipelines_for_each_engine(monitored: Monitoring) -> None:
    assert monitored.written == [KFP_FILE, MONITOR_KFP_FILE, ARGO_FILE, MONITOR_ARGO_FILE]


def test_without_a_store_compile_says_why_and_leaves_no_stale_monitoring_pipeline(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = project / "compiled"
    out.mkdir()
    for name in MONITORED:  # left by a compile from when the store was set
        (out / name).write_text("stale\n")
    written = compile_project(project, out, targets=("kfp", "argo"))
    assert [p.name for p in written] == [KFP_FILE, ARGO_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted([KFP_FILE, ARGO_FILE])
    note = capsys.readouterr().err.strip()
    assert note.startswith(
        f"handoff: note: no monitoring pipeline: {project / 'handoff.yaml'}: monitoring.store: "
    )
    assert "is null, so the payload log is in this machine's state folder, which no pod can read" in note


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        (None, "is null, so the payload log is in this machine's state folder, which no pod can read"),
        ("/srv/payloads", "is /srv/payloads, a folder on one machine that no pod can read"),
        ("file:///srv/payloads", "is file:///srv/payloads, a folder on one machine that no pod can read"),
    ],
)
def test_asking_for_the_monitoring_pipeline_without_a_store_pods_can_read_is_refused(
    project: Path, store: str | None, problem: str
) -> None:
    edit_yaml(project / "handoff.yaml", lambda s: s["monitoring"].update(store=store))
    with pytest.raises(HandoffError) as refused:
        compile_project(project, project / "compiled", targets=("kfp", "argo"), monitor=True)
    assert str(refused.value) == (
        f"{project / 'handoff.yaml'}: monitoring.store: {problem}: set it to the object-store URI the "
        "cluster's payload collector writes this model's log to (e.g. "
        "s3://handoff-payloads/payloads/digits-classifier) to compile the monitoring pipeline"
    )
    assert not (project / "compiled").exists()  # refused before anything is written


def test_the_cli_refuses_monitor_without_a_store_in_one_line_and_no_monitor_skips_it(project: Path) -> None:
    result = handoff("compile", "--target", "argo", "--monitor", cwd=project)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {project.resolve() / 'handoff.yaml'}: monitoring.store: is null")
    edit_yaml(project / "handoff.yaml", lambda s: s["monitoring"].update(store=STORE))
    skipped = compile_project(project, project / "compiled", targets=("argo",), monitor=False)
    assert [p.name for p in skipped] == [ARGO_FILE]


# --- Kubeflow Pipelines ------------------------------------------------------------------------


def test_kfp_loads_the_pipeline_and_its_parameters_have_their_defaults(monitored: Monitoring) -> None:
    loaded = components.load_component_from_file(str(monitored.folder / MONITOR_KFP_FILE))
    assert loaded.name == "handoff-monitor"
    assert set(loaded.component_spec.inputs) == {
        "project_dir",
        "version",
        "since",
        "fail_on_drift",
        "retrain_on_drift",
    }
    parameters = monitored.ir["root"]["inputDefinitions"]["parameters"]
    defaults = {name: spec.get("defaultValue") for name, spec in parameters.items()}
    assert defaults == {
        "project_dir": "/app",
        "version": "",
        "since": "24h",
        "fail_on_drift": True,
        "retrain_on_drift": False,  # a drift verdict starts a training run only when asked
    }


def test_kfp_keeps_the_report_and_verdict_and_fails_the_run_in_a_step_after(monitored: Monitoring) -> None:
    """KFP uploads no outputs of a failed task: monitor never fails on drift, check-drift does."""
    outputs = monitored.ir["components"]["comp-monitor"]["outputDefinitions"]["artifacts"]
    assert {n: o["artifactType"]["schemaTitle"] for n, o in outputs.items()} == {
        "report": "system.HTML",  # the KFP UI shows it
        "verdict": "system.Artifact",
        "metrics": "system.Metrics",  # drift_share, drift_detected, ... in the run's metrics
    }
    tasks = monitored.ir["root"]["dag"]["tasks"]
    assert set(tasks) == {plan.name for plan in MONITOR_PLAN}
    check, retrain = tasks["check-drift"], tasks["retrain"]
    verdict = {"outputArtifactKey": "verdict", "producerTask": "monitor"}
    # Retrain reads the verdict before check-drift fails the run (KFP starts nothing after a failure).
    assert retrain["dependentTasks"] == ["monitor"] and sorted(check["dependentTasks"]) == [
        "monitor",
        "retrain",
    ]
    for task in (check, retrain):
        assert task["inputs"]["artifacts"]["verdict"]["taskOutputArtifact"] == verdict
    assert check["inputs"]["parameters"]["fail_on_drift"] == {"componentInputParameter": "fail_on_drift"}
    assert retrain["inputs"]["parameters"]["retrain_on_drift"] == {
        "componentInputParameter": "retrain_on_drift"
    }
    assert retrain["inputs"]["parameters"]["project_dir"] == {"componentInputParameter": "project_dir"}
    # The log changes between runs while the inputs do not: nothing is ever served from a cache.
    assert all(task["cachingOptions"] == {} for task in tasks.values())
    # Monitor is retried; check-drift's failure is the verdict and a second retrain could start a
    # second training run: neither is retried.
    assert tasks["monitor"]["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in check and "retryPolicy" not in retrain


def test_kfp_pods_are_the_projects_monitoring_pods_as_the_training_pipeline_places_them(
    on_cluster: Monitoring,
) -> None:
    executors = on_cluster.ir["deploymentSpec"]["executors"]
    # Every pod gets cluster.secret_env: the retrain pod's KF_PIPELINES_TOKEN comes from there.
    assert set(on_cluster.kfp_pods) == {"monitor", "retrain", "check-drift"}
    for name, settings in on_cluster.kfp_pods.items():
        assert settings["securityContext"] == {
            "runAsUser": str(RUN_AS_USER),
            "runAsGroup": str(RUN_AS_USER),
            "runAsNonRoot": True,
        }, name
        assert {"mountPath": "/tmp", "volumeName": "tmp"} in settings["emptyDirMounts"], name
        assert settings["podMetadata"]["labels"] == labels("digits-classifier", "monitor"), name
        assert settings["activeDeadlineSeconds"] == "3600", name
        assert [s["secretName"] for s in settings["secretAsEnv"]] == ["mlflow", "s3-credentials"], name
        env = executors[f"exec-{name}"]["container"]["env"]
        assert {"name": TRACKING_URI_ENV, "value": TRACKING} in env, name
        image = executors[f"exec-{name}"]["container"]["image"]
        assert {"name": IMAGE_ENV, "value": image} in env, name
    assert on_cluster.ir["root"]["dag"]["tasks"]["monitor"]["retryPolicy"]["maxRetryCount"] == 3


# --- Argo Workflows ----------------------------------------------------------------------------


def test_argo_template_passes_argos_schema_strictly_and_round_trips_through_hera(
    monitored: Monitoring, on_cluster: Monitoring
) -> None:
    for compiled in (monitored, on_cluster):
        assert argo_errors(compiled.argo) == []
        model = hera_models.WorkflowTemplate.model_validate(compiled.argo)
        assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == compiled.argo
    metadata = monitored.argo["metadata"]
    assert metadata["name"] == "digits-classifier-monitor" and metadata["namespace"] == "ml-models"
    assert metadata["labels"] == labels("digits-classifier", "monitor")


def test_every_argo_pod_is_a_valid_restricted_pod(monitored: Monitoring, on_cluster: Monitoring) -> None:
    found = pods(on_cluster.argo)
    assert set(found) == {"monitor", "retrain", "outcome"}
    for name, pod in found.items():
        assert pod_errors(pod) == [], name
        assert pod["spec"]["serviceAccountName"] == "ml-runner"
        assert pod["spec"]["securityContext"]["runAsUser"] == RUN_AS_USER
        (container,) = pod["spec"]["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        }, name
    for name in ("monitor", "retrain"):  # the retrain pod's ARGO_TOKEN comes from cluster.secret_env
        env = on_cluster.templates[name]["container"]["env"]
        assert {"name": TRACKING_URI_ENV, "value": TRACKING} in env
        assert {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "access-key"}},
        } in env
    assert pods(monitored.argo)["monitor"]["spec"]["serviceAccountName"] == "handoff-pipeline"


def test_argo_keeps_the_report_and_verdict_of_a_drifted_run_and_retries_only_pod_errors(
    monitored: Monitoring,
) -> None:
    template = monitored.templates["monitor"]
    assert template["container"]["command"] == ["python", "-m", "handoff", "monitor"]
    artifacts = {a["name"]: a for a in template["outputs"]["artifacts"]}
    assert artifacts["report"] == {
        "name": "report",
        "path": "/tmp/outputs/monitor/report.html",
        "archive": {"none": {}},  # the Argo UI shows it as a page
        "optional": True,  # no report when the window had too few rows
    }
    assert (
        artifacts["verdict"]["path"] == "/tmp/outputs/monitor/verdict.json"
        and "optional" not in artifacts["verdict"]
    )
    # The step exits 1 on drift: retrying that would only repeat the verdict.
    assert template["retryStrategy"]["retryPolicy"] == "OnError"
    parameters = {p["name"]: p for p in monitored.argo["spec"]["arguments"]["parameters"]}
    assert {n: p["value"] for n, p in parameters.items()} == {
        "project-dir": "/app",
        "version": "",
        "since": "24h",
        "fail-on-drift": "true",
        "retrain-on-drift": "false",
    }
    assert parameters["fail-on-drift"]["enum"] == parameters["retrain-on-drift"]["enum"] == ["true", "false"]


def test_argo_retrains_after_monitor_whatever_its_exit_and_only_when_asked(monitored: Monitoring) -> None:
    """Monitor exits 1 on drift: retrain depends on its failure too, reads the verdict it kept, and
    fails in turn on drift (fail-on-drift), since Argo takes the DAG's outcome from its last task."""
    (dag,) = [t["dag"] for t in monitored.argo["spec"]["templates"] if "dag" in t]
    tasks = {task["name"]: task for task in dag["tasks"]}
    assert tasks["retrain"] == {
        "name": "retrain",
        "template": "retrain",
        "depends": "monitor.Succeeded || monitor.Failed",
        # Skipped otherwise: a skipped task takes its parent's outcome, so monitor's exit is the run's.
        "when": "{{workflow.parameters.retrain-on-drift}} == true",
        "arguments": {
            "artifacts": [
                {"name": "verdict", "from": "{{tasks.monitor.outputs.artifacts.verdict}}", "optional": True}
            ]
        },
    }
    template = monitored.templates["retrain"]
    assert template["container"]["command"] == ["python", "-m", "handoff", "retrain"]
    assert template["inputs"]["artifacts"] == [
        {"name": "verdict", "path": "/tmp/inputs/verdict.json", "optional": True}
    ]
    assert "retryStrategy" not in template  # a second attempt could start a second training run


def test_argo_files_are_the_ones_handoff_monitor_writes() -> None:
    files = {name: file for name, file, _ in ARGO_OUTPUTS}
    assert (files["report"], files["verdict"]) == (monitor_step.REPORT_FILE, monitor_step.VERDICT_FILE)


@pytest.mark.parametrize(
    ("fail_on_drift", "flag"), [("true", "--fail-on-drift"), ("false", "--no-fail-on-drift")]
)
def test_argo_calls_options_the_handoff_cli_has(
    monitored: Monitoring, tmp_path: Path, fail_on_drift: str, flag: str
) -> None:
    """Parse the step's command line with the real CLI (nothing runs), as Argo substitutes it."""
    values = {p["name"]: p["value"] for p in monitored.argo["spec"]["arguments"]["parameters"]}
    values["fail-on-drift"] = fail_on_drift
    # Argo's expression: a flag has no value to substitute, so the parameter picks the flag.
    assert FAIL_FLAG == (
        "{{=workflow.parameters['fail-on-drift'] == 'true' ? '--fail-on-drift' : '--no-fail-on-drift'}}"
    )
    args = []
    for arg in monitored.templates["monitor"]["container"]["args"]:
        if arg == FAIL_FLAG:
            arg = flag
        for name, value in values.items():
            arg = arg.replace(f"{{{{workflow.parameters.{name}}}}}", value)
        args.append(arg.replace("/tmp/", f"{tmp_path}/"))
    assert flag in args and "{{" not in " ".join(args)
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    context = commands["monitor"].make_context("monitor", args)
    assert context.params["fail_on_drift"] is (fail_on_drift == "true")
    # The retrain step's command line, parsed by the real `handoff retrain` (the pipelines' commands).
    retrain_args = [
        flag if arg == FAIL_FLAG else arg.replace("{{workflow.parameters.project-dir}}", "/app")
        for arg in monitored.templates["retrain"]["container"]["args"]
    ]
    assert "{{" not in " ".join(retrain_args)
    retrain = typer.main.get_command(pipeline_commands.app).commands["retrain"]  # type: ignore[attr-defined]
    parsed = retrain.make_context("retrain", retrain_args).params
    assert parsed["fail_on_drift"] is (fail_on_drift == "true")
    assert (str(parsed["verdict"]), parsed["target"], str(parsed["out"])) == (
        "/tmp/inputs/verdict.json",
        "argo",
        "/tmp/outputs/retrain",  # /app is read-only in pods
    )


# --- check-drift --------------------------------------------------------------------------------


def verdict_file(tmp_path: Path, status: str, reasons: list[str]) -> Any:
    """A verdict as monitor's record (``run_step`` writes ``record_json``), and what KFP hands on."""
    verdict = monitor_step.Verdict(
        model="digits-classifier",
        version="3",
        status=status,
        drift_detected=status == "drift",
        rows=640,
        window={},
        thresholds={},
        reasons=reasons,
    )
    path = tmp_path / "verdict"
    path.write_text(record_json(verdict) + "\n")

    @dataclasses.dataclass
    class Handed:  # the one attribute the step reads of kfp's Input[Artifact]
        path: str

    return Handed(str(path))


def test_check_drift_fails_a_drifted_run_with_the_verdicts_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reasons = ["2 of 64 input columns drifted"]
    with pytest.raises(SystemExit) as failed:
        check_drift(verdict_file(tmp_path, "drift", reasons), fail_on_drift=True)
    assert failed.value.code == 1
    assert capsys.readouterr().out == (
        "handoff: monitor digits-classifier v3: drift over 640 rows: 2 of 64 input columns drifted\n"
    )


@pytest.mark.parametrize(
    ("status", "fail_on_drift"), [("drift", False), ("no drift", True), ("not enough data", True)]
)
def test_check_drift_passes_unless_asked_to_fail_on_a_drift_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: str, fail_on_drift: bool
) -> None:
    check_drift(verdict_file(tmp_path, status, []), fail_on_drift=fail_on_drift)
    assert capsys.readouterr().out == f"handoff: monitor digits-classifier v3: {status} over 640 rows\n"
    assert json.loads((tmp_path / "verdict").read_text())["status"] == status


@pytest.mark.local
@pytest.mark.filterwarnings("ignore:.*non-Python base image:RuntimeWarning")  # the image is not used here
def test_check_drift_runs_as_kfp_ships_it_and_fails_only_a_drifted_run(tmp_path: Path) -> None:
    """kfp.local runs the step's source on its own (imports inside), as a KFP pod does."""
    from kfp import dsl, local
    from kfp.local import config

    saved = config.LocalExecutionConfig.instance  # kfp.local's settings are process-wide: put them back
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    step = dsl.component(check_drift, base_image="digits-classifier:local", install_kfp_package=False)
    verdict = verdict_file(tmp_path, "drift", ["2 of 64 input columns drifted"]).path

    def run(fail_on_drift: bool) -> None:
        # A pipeline without parameters: KFP reads annotations, which this module keeps as strings.
        def check():
            imported = dsl.importer(artifact_uri=verdict, artifact_class=dsl.Artifact)
            step(verdict=imported.output, fail_on_drift=fail_on_drift)

        dsl.pipeline(name="check-drift")(check)()

    try:
        run(fail_on_drift=False)
        with pytest.raises(RuntimeError, match="Inner task failed"):
            run(fail_on_drift=True)
    finally:
        config.LocalExecutionConfig.instance = saved
