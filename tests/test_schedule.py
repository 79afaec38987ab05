"""`handoff schedule` and `handoff retrain`: train on a schedule, or when monitoring finds drift.

The real clients (``kfp.Client``, hera's ``WorkflowsService``) talk to the loopback fakes of the
KFP v2beta1 API and the Argo Server (``tests/fake_pipeline_apis.py``), which check recurring runs
against KFP's RecurringRun message and CronWorkflows against Argo's JSON schema, strictly, and
refuse what the servers refuse (cron fields, CronWorkflow name length, a missing template). The
CronWorkflows ``handoff compile --cron`` writes are golden-tested
(``pipelines/goldens/*-cron-workflow.argo.yaml``; regenerate with
``pytest tests/test_schedule.py --regenerate-goldens``).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hera.workflows import models as hera_models
from typer.testing import CliRunner

from handoff.errors import HandoffError
from handoff.files import write_json
from handoff.labels import labels
from handoff.project import Project
from handoff.registry import RETRAIN_TAG
from handoff.steps.monitor import VERDICT_FILE, Verdict
from handoff.tracking import use_tracking
from handoff_pipelines import commands
from handoff_pipelines.compiled import (
    ARGO_FILE,
    KFP_FILE,
    MONITOR_ARGO_FILE,
    MONITOR_CRON_FILE,
    MONITOR_KFP_FILE,
    RETRAIN_CRON_FILE,
    compile_project,
)
from handoff_pipelines.monitor_pipeline import retrain as retrain_component
from handoff_pipelines.retrain import retrain
from handoff_pipelines.schedule import (
    MONITOR,
    RETRAIN,
    check_cron,
    cron_workflow,
    schedule_name,
    schedule_project,
    unschedule_project,
)
from handoff_pipelines.submit import ARGO_TOKEN_ENV, KFP_TOKEN_ENV

from .conftest import TEMPLATE, check_golden, edit_yaml, handoff, mlflow_state_restored
from .fake_pipeline_apis import NAMESPACE, TOKEN, FakeApi, fake_argo, fake_kfp, point_at
from .test_compile_targets import argo_errors, without_version

pytestmark = pytest.mark.unit

GOLDENS = TEMPLATE / "pipelines" / "goldens"
PROJECT = "digits-classifier"
STORE = "s3://handoff-payloads/payloads/digits-classifier"
WEEKLY = "0 3 * * 1"
HOURLY = "0 * * * *"


@pytest.fixture(autouse=True)
def _own_mlflow_state() -> Iterator[None]:
    """handoff retrain reads the registry in this process: MLflow's process-wide URIs go back after."""
    with mlflow_state_restored():
        yield


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Tokens as CI (or the pod's cluster.secret_env) sets them, and a known commit."""
    monkeypatch.setenv(KFP_TOKEN_ENV, TOKEN)
    monkeypatch.setenv(ARGO_TOKEN_ENV, TOKEN)
    monkeypatch.setenv("HANDOFF_GIT_SHA", "3f2c1e0d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e")
    monkeypatch.delenv("HANDOFF_IMAGE", raising=False)
    return monkeypatch


@pytest.fixture
def monitored(project: Path) -> Path:
    """The default project with a payload store pods can read: it has a monitoring pipeline."""
    edit_yaml(project / "handoff.yaml", lambda s: s["monitoring"].update(store=STORE))
    return project


def recurring_runs(kfp: FakeApi) -> list[dict[str, Any]]:
    return list(kfp.objects.get("recurring_runs", {}).values())


# --- the CronWorkflows, as compiled -------------------------------------------------------------


@pytest.fixture(scope="module")
def cron_files(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `handoff compile --target argo --cron ... --on-drift-cron ...` writes for the default
    project with monitoring.store set (the goldens' source)."""
    project = Path(shutil.copytree(default_project, tmp_path_factory.mktemp("cron") / default_project.name))
    edit_yaml(project / "handoff.yaml", lambda s: s["monitoring"].update(store=STORE))
    out = project / "compiled"
    written = compile_project(project, out, targets=("argo",), cron=WEEKLY, on_drift_cron=HOURLY)
    assert [p.name for p in written] == [ARGO_FILE, MONITOR_ARGO_FILE, RETRAIN_CRON_FILE, MONITOR_CRON_FILE]
    return out


@pytest.mark.golden
@pytest.mark.parametrize("name", [RETRAIN_CRON_FILE, MONITOR_CRON_FILE])
def test_compiled_cron_workflows_match_their_goldens_and_argos_schema(
    cron_files: Path, name: str, request: pytest.FixtureRequest
) -> None:
    text = (cron_files / name).read_text()
    check_golden(
        GOLDENS / name,
        without_version(text),
        request,
        "tests/test_schedule.py",
        "`handoff compile --cron/--on-drift-cron` writes for the default project with monitoring.store set",
    )
    cron = yaml.safe_load(text)
    assert argo_errors(cron, "CronWorkflow") == []  # strict: a typo in a field fails here
    model = hera_models.CronWorkflow.model_validate(cron)
    assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == cron


def test_each_cron_workflow_runs_its_compiled_template_one_run_at_a_time_in_utc(cron_files: Path) -> None:
    retrain_cron = yaml.safe_load((cron_files / RETRAIN_CRON_FILE).read_text())
    monitor_cron = yaml.safe_load((cron_files / MONITOR_CRON_FILE).read_text())
    training = yaml.safe_load((cron_files / ARGO_FILE).read_text())
    monitoring = yaml.safe_load((cron_files / MONITOR_ARGO_FILE).read_text())
    for cron, template, schedule in ((retrain_cron, training, WEEKLY), (monitor_cron, monitoring, HOURLY)):
        spec = cron["spec"]
        assert spec["workflowSpec"]["workflowTemplateRef"] == {"name": template["metadata"]["name"]}
        assert (spec["schedules"], spec["timezone"], spec["concurrencyPolicy"]) == (
            [schedule],
            "UTC",
            "Forbid",
        )
        assert cron["metadata"]["namespace"] == template["metadata"]["namespace"] == NAMESPACE
        assert (
            cron["metadata"]["labels"] == spec["workflowMetadata"]["labels"] == template["metadata"]["labels"]
        )
    assert retrain_cron["metadata"]["name"] == f"{PROJECT}-retrain"
    assert "arguments" not in retrain_cron["spec"]["workflowSpec"]  # the template's defaults
    assert monitor_cron["metadata"]["name"] == f"{PROJECT}-monitor"
    # The one argument that makes a drift verdict start a training run; the template defaults it off.
    assert monitor_cron["spec"]["workflowSpec"]["arguments"] == {
        "parameters": [{"name": "retrain-on-drift", "value": "true"}]
    }
    defaults = {p["name"]: p["value"] for p in monitoring["spec"]["arguments"]["parameters"]}
    assert defaults["retrain-on-drift"] == "false"


def test_compile_without_argo_refuses_cron_and_points_at_handoff_schedule(project: Path) -> None:
    with pytest.raises(HandoffError, match="create them with `handoff schedule`"):
        compile_project(project, project / "compiled", targets=("kfp",), cron=WEEKLY)
    assert not (project / "compiled").exists()


def test_a_long_project_name_still_gets_a_cron_workflow_name_argo_accepts(project: Path) -> None:
    long_name = "digits-" + "x" * 56
    assert len(schedule_name(long_name, RETRAIN)) == 52 and schedule_name(long_name, MONITOR).endswith(
        "-monitor"
    )
    edit_yaml(project / "handoff.yaml", lambda s: s.update(project=long_name))
    cron = cron_workflow(Project.load(project), RETRAIN, WEEKLY)
    assert cron["spec"]["workflowSpec"]["workflowTemplateRef"] == {"name": long_name}


# --- the cron expression ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("0 3 * *", "4 fields"),
        ("0 0 3 * * 1", "6 fields"),  # KFP's own six-field form: handoff adds the seconds itself
        ("@weekly", "1 fields"),
        ("60 3 * * 1", "the minute field takes 0-59, not '60'"),
        ("0 3 * * 7", "the day of week field takes 0-6, not '7'"),
        ("0 3 * foo 1", "the month field takes 1-12, not 'foo'"),
        ("*/0 * * * *", "the minute field's step '0' is not a positive number"),
        ("0 18-8 * * *", "the hour field's range '18-8' ends before it starts"),
    ],
)
def test_a_bad_cron_is_refused_naming_the_option_and_an_example(expression: str, problem: str) -> None:
    with pytest.raises(HandoffError) as refused:
        check_cron(expression)
    assert str(refused.value) == (
        f"--cron {expression!r}: {problem}; expected 5 fields (minute hour day-of-month month day-of-week), "
        'e.g. --cron "0 3 * * 1" for Mondays at 03:00 UTC'
    )


@pytest.mark.parametrize("expression", [WEEKLY, HOURLY, "*/15 8-18 * * mon-fri", "30 2 1,15 jan,jul *"])
def test_cron_expressions_argo_and_kfp_take_pass(expression: str) -> None:
    assert check_cron(f"  {expression} ") == expression


def test_a_bad_cron_is_refused_before_anything_is_compiled_or_sent(project: Path) -> None:
    with fake_kfp() as kfp, fake_argo() as argo:
        point_at(project, kfp=kfp, argo=argo, orchestrator="both")
        with pytest.raises(HandoffError, match=r"^--cron '0 3 \* \*': 4 fields; expected 5 fields"):
            schedule_project(project, project / "compiled", "0 3 * *")
    assert kfp.seen == argo.seen == [] and not (project / "compiled").exists()


def test_training_needs_a_cron_and_says_so(project: Path) -> None:
    with pytest.raises(HandoffError, match=r'--cron is required: when to train, e.g. --cron "0 3 \* \* 1"'):
        schedule_project(project, project / "compiled")


# --- Kubeflow Pipelines: recurring runs ---------------------------------------------------------


def test_kfp_schedule_creates_a_recurring_run_and_a_second_schedule_replaces_it(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    with fake_kfp() as kfp:
        point_at(project, kfp=kfp)
        (first,) = schedule_project(project, project / "compiled", WEEKLY, targets=("kfp",))
        (run,) = recurring_runs(kfp)
        assert kfp.calls() == [
            "GET /apis/v2beta1/experiments",
            "POST /apis/v2beta1/experiments",
            "GET /apis/v2beta1/recurringruns",
            "POST /apis/v2beta1/recurringruns",
        ]
        (experiment,) = kfp.objects["experiments"].values()
        assert (run["display_name"], run["experiment_id"]) == (
            f"{PROJECT}-retrain",
            experiment["experiment_id"],
        )
        # KFP's scheduler reads seconds first: the user's five fields get a leading 0.
        assert run["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
        assert (int(run["max_concurrency"]), run["no_catchup"], run["mode"]) == (1, True, "ENABLE")
        assert run["service_account"] == "handoff-pipeline"  # cluster.service_account, as submit
        assert run["runtime_config"]["parameters"] == {"project_dir": "/app"}
        ir, platform = yaml.safe_load_all((project / "compiled" / KFP_FILE).read_text())
        assert run["pipeline_spec"] == {"pipeline_spec": ir, "platform_spec": platform}
        assert (first.name, first.id, first.replaced) == (f"{PROJECT}-retrain", run["recurring_run_id"], 0)
        assert first.url == f"{kfp.url}/#/recurringrun/details/{first.id}"

        (second,) = schedule_project(project, project / "compiled", "0 4 * * *", targets=("kfp",))
    assert kfp.calls()[4:] == [
        "GET /apis/v2beta1/experiments",  # the project's experiment, found this time
        "GET /apis/v2beta1/recurringruns",
        "POST /apis/v2beta1/recurringruns",  # the new one first: a refused create keeps the old
        f"DELETE /apis/v2beta1/recurringruns/{first.id}",
    ]
    (left,) = recurring_runs(kfp)
    assert left["recurring_run_id"] == second.id and left["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"
    assert second.replaced == 1


def test_kfp_remove_deletes_the_recurring_run_and_again_is_no_error(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    with fake_kfp() as kfp:
        point_at(project, kfp=kfp)
        schedule_project(project, project / "compiled", WEEKLY, targets=("kfp",))
        assert unschedule_project(project, targets=("kfp",)) == [("kfp", f"{PROJECT}-retrain", 1)]
        assert recurring_runs(kfp) == []
        assert unschedule_project(project, targets=("kfp",)) == [("kfp", f"{PROJECT}-retrain", 0)]


# --- Argo: CronWorkflows ------------------------------------------------------------------------


def test_argo_schedule_applies_the_template_then_creates_and_later_updates_the_cron_workflow(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    templates = f"/api/v1/workflow-templates/{NAMESPACE}"
    crons = f"/api/v1/cron-workflows/{NAMESPACE}"
    name = f"{PROJECT}-retrain"
    with fake_argo() as argo:
        point_at(project, argo=argo)
        (first,) = schedule_project(project, project / "compiled", WEEKLY, targets=("argo",))
        assert argo.calls() == [f"POST {templates}", f"POST {crons}"]
        sent = argo.seen[1].body["cronWorkflow"]
        assert sent == cron_workflow(Project.load(project), RETRAIN, WEEKLY)  # the pure function's object
        compiled = yaml.safe_load((project / "compiled" / ARGO_FILE).read_text())
        assert argo.seen[0].body == {"template": compiled}  # exactly as `handoff submit` sends it
        assert (first.name, first.replaced, first.url) == (
            name,
            0,
            f"{argo.url}/cron-workflows/{NAMESPACE}/{name}",
        )

        (second,) = schedule_project(project, project / "compiled", "0 4 * * *", targets=("argo",))
        assert argo.calls()[2:] == [
            f"POST {templates}",  # 409: it exists
            f"GET {templates}/{PROJECT}",
            f"PUT {templates}/{PROJECT}",
            f"POST {crons}",  # 409: it exists
            f"GET {crons}/{name}",
            f"PUT {crons}/{name}",
        ]
        (cron,) = argo.objects["cron_workflows"].values()
        assert cron["spec"]["schedules"] == ["0 4 * * *"] and cron["metadata"]["resourceVersion"] == "2"
        assert second.replaced == 1 and "workflows" not in argo.objects  # scheduled, nothing started

        assert unschedule_project(project, targets=("argo",)) == [("argo", name, 1)]
        assert unschedule_project(project, targets=("argo",)) == [("argo", name, 0)]
    assert argo.objects["cron_workflows"] == {} and PROJECT in argo.objects["templates"]


# --- on drift -----------------------------------------------------------------------------------


def test_on_drift_schedules_the_monitoring_pipeline_with_retrain_on_drift_from_the_cli(
    monitored: Path, env: pytest.MonkeyPatch
) -> None:
    with fake_kfp() as kfp, fake_argo() as argo:
        point_at(monitored, kfp=kfp, argo=argo, orchestrator="both")
        result = handoff("schedule", "--on-drift", cwd=monitored)
    assert result.returncode == 0, result.stderr
    kfp_line, argo_line = result.stdout.splitlines()
    (run,) = recurring_runs(kfp)
    name = f"{PROJECT}-monitor"
    assert kfp_line == (
        f"scheduled kfp recurring run {name} ({run['recurring_run_id']}) at '0 0 * * * *': "
        f"{kfp.url}/#/recurringrun/details/{run['recurring_run_id']}"
    )
    assert run["display_name"] == name and run["trigger"]["cron_schedule"]["cron"] == "0 0 * * * *"
    assert run["runtime_config"]["parameters"] == {
        "project_dir": "/app",
        "version": "",
        "since": "24h",
        "fail_on_drift": True,
        "retrain_on_drift": True,
    }
    ir, _ = yaml.safe_load_all((monitored / "compiled" / MONITOR_KFP_FILE).read_text())
    assert run["pipeline_spec"]["pipeline_spec"] == ir
    assert argo_line.startswith(f"scheduled argo CronWorkflow {name} (") and argo_line.endswith(
        f"at '0 * * * *': {argo.url}/cron-workflows/{NAMESPACE}/{name}"
    )
    cron = argo.objects["cron_workflows"][name]
    assert cron["spec"]["workflowSpec"] == {
        "workflowTemplateRef": {"name": f"{PROJECT}-monitor"},
        "arguments": {"parameters": [{"name": "retrain-on-drift", "value": "true"}]},
    }
    assert cron["metadata"]["labels"] == labels(PROJECT, "monitor")
    assert f"{PROJECT}-monitor" in argo.objects["templates"]


def test_on_drift_without_a_store_pods_can_read_is_refused_before_anything_is_sent(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    with fake_argo() as argo:
        point_at(project, argo=argo)
        with pytest.raises(HandoffError, match=r"monitoring.store: is null"):
            schedule_project(project, project / "compiled", on_drift=True, targets=("argo",))
    assert argo.seen == []


# --- handoff retrain: a drift verdict starts a training run -------------------------------------


def write_verdict(folder: Path, status: str) -> Path:
    """A verdict as `handoff monitor` writes it (steps/monitor.py: asdict of its Verdict)."""
    drifted = status == "drift"
    verdict = Verdict(
        model=PROJECT,
        version="3",
        status=status,
        drift_detected=drifted,
        rows=640,
        window={"first": "2026-12-01 00:00:00Z", "last": "2026-12-01 23:59:00Z", "requests": 640},
        thresholds={"max_drift_share": 0.5, "min_rows": 200, "prediction": True},
        drift_share=0.75 if drifted else 0.0,
        reasons=["48 of 64 input columns drifted (75% >= slo.drift.max_drift_share 50%): ..."]
        if drifted
        else [],
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / VERDICT_FILE, dataclasses.asdict(verdict))
    return folder / VERDICT_FILE


def test_a_drift_verdict_submits_the_training_pipeline_to_kfp_and_argo(
    project: Path, env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    verdict = write_verdict(tmp_path / "monitor", "drift")
    with fake_kfp() as kfp, fake_argo() as argo:
        point_at(project, kfp=kfp, argo=argo, orchestrator="both")
        done = retrain(project, verdict, tmp_path / "compiled")
    assert done.drift_detected and [s.target for s in done.submitted] == ["kfp", "argo"]
    assert done.line.startswith(
        f"handoff: retrain: {PROJECT} v3: drift over 640 rows: 48 of 64 input columns"
    )
    # The same requests `handoff submit` makes: a run of the training pipeline, a Workflow from its template.
    (run,) = kfp.objects["runs"].values()
    ir, _ = yaml.safe_load_all((tmp_path / "compiled" / KFP_FILE).read_text())
    assert run["pipeline_spec"]["pipeline_spec"] == ir and ir["pipelineInfo"]["name"] == "handoff"
    (workflow,) = argo.objects["workflows"].values()
    assert workflow["spec"] == {"workflowTemplateRef": {"name": PROJECT}}
    assert {s.authorization for s in [*kfp.seen, *argo.seen]} == {f"Bearer {TOKEN}"}


def test_a_lasting_drift_starts_one_training_run_per_cooldown(
    project: Path, env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The hourly monitor keeps seeing the same drift while the run it started trains: the drifted
    version's tag says a run was started, and none is started again within the cooldown."""
    client = use_tracking(Project.load(project))
    client.create_registered_model(PROJECT)
    for _ in range(3):
        client.create_model_version(PROJECT, source=str(tmp_path))
    verdict = write_verdict(tmp_path / "monitor", "drift")
    with fake_kfp() as kfp:
        point_at(project, kfp=kfp)
        first = retrain(project, verdict, tmp_path / "c1")
        again = retrain(project, verdict, tmp_path / "c2")
        forced = retrain(project, verdict, tmp_path / "c3", cooldown_hours=0)
    tag = client.get_model_version(PROJECT, "3").tags[RETRAIN_TAG]
    assert len(first.submitted) == 1 and len(forced.submitted) == 1 and len(kfp.objects["runs"]) == 2
    assert again.skipped and again.submitted == []
    assert "a training run was started for this drift at " in again.line
    assert (
        f"(kfp run {first.submitted[0].name}): none again within 24 h of it (--cooldown-hours)" in again.line
    )
    assert tag.endswith(f" kfp run {forced.submitted[0].name}")


@pytest.mark.parametrize("status", ["no drift", "not enough data"])
def test_without_drift_nothing_is_submitted(
    project: Path, env: pytest.MonkeyPatch, tmp_path: Path, status: str
) -> None:
    verdict = write_verdict(tmp_path / "monitor", status)
    with fake_kfp() as kfp, fake_argo() as argo:
        point_at(project, kfp=kfp, argo=argo, orchestrator="both")
        done = retrain(project, verdict, tmp_path / "compiled")
    assert not done.drift_detected and done.submitted == []
    assert kfp.seen == argo.seen == [] and not (tmp_path / "compiled").exists()


def test_the_kfp_step_submits_to_kfp_on_drift_only_when_asked(
    project: Path, env: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The monitoring pipeline's retrain component, called as KFP calls it (an artifact's path);
    it runs `python -m handoff retrain`, the Argo step's command."""

    @dataclasses.dataclass
    class Handed:  # the one attribute the step reads of kfp's Input[Artifact]
        path: str

    verdict = Handed(str(write_verdict(tmp_path / "monitor", "drift")))
    with fake_kfp() as kfp, fake_argo() as argo:
        point_at(project, kfp=kfp, argo=argo, orchestrator="both")
        retrain_component(project_dir=str(project), verdict=verdict, retrain_on_drift=False)
        assert kfp.seen == [] and "retrain_on_drift is false: nothing to submit" in capfd.readouterr().out
        retrain_component(project_dir=str(project), verdict=verdict, retrain_on_drift=True)
    (run_id,) = kfp.objects["runs"]
    assert f"submitted kfp run {PROJECT}-3f2c1e0 ({run_id})" in capfd.readouterr().out
    assert argo.seen == []  # the KFP pipeline retrains on KFP; Argo's on Argo


def test_the_argo_step_fails_after_submitting_so_a_drifted_run_stays_red(
    project: Path, env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The command line the Argo step runs (monitor_pipeline.retrain_arguments, fail-on-drift),
    parsed and run by the real Typer command in this process."""
    verdict = write_verdict(tmp_path / "monitor", "drift")
    runner = CliRunner()
    with fake_argo() as argo:
        point_at(project, argo=argo)
        args = ["--project", str(project), "--target", "argo", "--out", str(tmp_path / "out")]
        result = runner.invoke(commands.app, ["retrain", "--verdict", str(verdict), *args, "--fail-on-drift"])
        missing = runner.invoke(commands.app, ["retrain", "--verdict", str(tmp_path / "none.json"), *args])
    assert result.exit_code == 1, result.output
    (name,) = argo.objects["workflows"]
    assert f"submitted argo run {name} (" in result.stdout
    assert f"handoff: retrain: {PROJECT} v3: drift over 640 rows" in result.stderr
    # Monitor failed before deciding: no verdict, nothing sent, and the step fails as monitor did.
    assert isinstance(missing.exception, HandoffError) and len(argo.objects["workflows"]) == 1
    assert str(missing.exception) == (
        f"verdict: no verdict at {tmp_path / 'none.json'}: `handoff monitor` failed before writing one "
        "(see its log)"
    )
