"""`handoff submit`: the compiled pipeline goes to Kubeflow Pipelines and/or the Argo Server.

The real clients (``kfp.Client``, hera's ``WorkflowsService``) talk over loopback HTTP to small
fakes of the two APIs (``tests/fake_pipeline_apis.py``), which check bodies as the servers do.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from handoff.errors import HandoffError
from handoff.labels import labels
from handoff_pipelines.compiled import ARGO_FILE, KFP_FILE
from handoff_pipelines.submit import ARGO_TOKEN_ENV, KFP_TOKEN_ENV, submit_project

from .conftest import edit_yaml, handoff
from .fake_pipeline_apis import NAMESPACE, TOKEN, fake_argo, fake_kfp, point_at

pytestmark = pytest.mark.unit

PROJECT = "digits-classifier"
SHA = "3f2c1e0d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Tokens as CI sets them, and a known commit for the run's name."""
    monkeypatch.setenv(KFP_TOKEN_ENV, TOKEN)
    monkeypatch.setenv(ARGO_TOKEN_ENV, f"Bearer {TOKEN}")
    monkeypatch.setenv("HANDOFF_GIT_SHA", SHA)
    return monkeypatch


def test_kfp_submit_creates_the_experiment_and_starts_a_run(project: Path, env: pytest.MonkeyPatch) -> None:
    with fake_kfp() as kfp:
        point_at(project, kfp=kfp)
        (submitted,) = submit_project(project, project / "compiled", targets=("kfp",))
    assert kfp.calls() == [
        "GET /apis/v2beta1/experiments",
        "POST /apis/v2beta1/experiments",
        "POST /apis/v2beta1/runs",
    ]
    assert {s.authorization for s in kfp.seen} == {f"Bearer {TOKEN}"}
    (experiment,) = kfp.objects["experiments"].values()
    assert (experiment["display_name"], experiment["namespace"]) == (PROJECT, NAMESPACE)
    (run,) = kfp.objects["runs"].values()
    assert run["display_name"] == submitted.name == f"{PROJECT}-{SHA[:7]}"
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["service_account"] == "handoff-pipeline"  # cluster.service_account
    # The run carries exactly what `handoff compile` wrote (IR and kfp-kubernetes settings).
    ir, platform = yaml.safe_load_all((project / "compiled" / KFP_FILE).read_text())
    assert run["pipeline_spec"] == {"pipeline_spec": ir, "platform_spec": platform}
    assert submitted.url == f"{kfp.url}/#/runs/details/{run['run_id']}" and submitted.id == run["run_id"]


def test_kfp_submit_reuses_the_projects_experiment(project: Path, env: pytest.MonkeyPatch) -> None:
    with fake_kfp() as kfp:
        kfp.objects["experiments"] = {
            "e-1": {"experiment_id": "e-1", "display_name": PROJECT, "namespace": NAMESPACE}
        }
        point_at(project, kfp=kfp)
        submit_project(project, project / "compiled", targets=("kfp",))
    assert kfp.calls() == ["GET /apis/v2beta1/experiments", "POST /apis/v2beta1/runs"]
    assert [run["experiment_id"] for run in kfp.objects["runs"].values()] == ["e-1"]


def test_argo_submit_creates_the_template_then_a_workflow_from_it(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    with fake_argo() as argo:
        point_at(project, argo=argo)
        (submitted,) = submit_project(project, project / "compiled", targets=("argo",))
    assert argo.calls() == [
        f"POST /api/v1/workflow-templates/{NAMESPACE}",
        f"POST /api/v1/workflows/{NAMESPACE}",
    ]
    assert {s.authorization for s in argo.seen} == {f"Bearer {TOKEN}"}
    compiled = yaml.safe_load((project / "compiled" / ARGO_FILE).read_text())
    assert argo.seen[0].body == {"template": compiled}  # exactly what `handoff compile` wrote
    (workflow,) = argo.objects["workflows"].values()
    assert workflow["spec"] == {"workflowTemplateRef": {"name": PROJECT}}
    assert workflow["metadata"]["labels"] == labels(PROJECT)
    assert submitted.name == workflow["metadata"]["name"]
    assert submitted.name.startswith(f"{PROJECT}-{SHA[:7]}-")  # generateName: the server adds a suffix
    assert submitted.url == f"{argo.url}/workflows/{NAMESPACE}/{submitted.name}"


def test_a_63_character_project_still_gets_a_workflow_name_argo_accepts(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    long_name = "digits-" + "x" * 56
    with fake_argo() as argo:
        point_at(project, argo=argo)
        edit_yaml(project / "handoff.yaml", lambda s: s.update(project=long_name))
        (submitted,) = submit_project(project, project / "compiled", targets=("argo",))
    assert long_name in argo.objects["templates"]
    assert len(submitted.name) <= 63 and submitted.name.startswith(long_name[:50])


def test_argo_submit_updates_a_template_that_exists_at_its_current_version(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    with fake_argo() as argo:
        point_at(project, argo=argo)
        submit_project(project, project / "compiled", targets=("argo",))
        edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update(retries=5))
        submit_project(project, project / "compiled", targets=("argo",))
    base = f"/api/v1/workflow-templates/{NAMESPACE}"
    assert argo.calls()[2:] == [
        f"POST {base}",  # 409: it exists
        f"GET {base}/{PROJECT}",
        f"PUT {base}/{PROJECT}",
        f"POST /api/v1/workflows/{NAMESPACE}",
    ]
    template = argo.objects["templates"][PROJECT]
    assert template["metadata"]["resourceVersion"] == "2"
    assert {t["retryStrategy"]["limit"] for t in template["spec"]["templates"] if "retryStrategy" in t} == {5}
    assert len(argo.objects["workflows"]) == 2


def test_submit_to_both_from_the_command_line(project: Path, env: pytest.MonkeyPatch) -> None:
    with fake_kfp() as kfp, fake_argo() as argo:
        point_at(project, kfp=kfp, argo=argo, orchestrator="both")
        result = handoff("submit", cwd=project)
    assert result.returncode == 0, result.stderr
    kfp_line, argo_line = result.stdout.splitlines()
    (run_id,) = kfp.objects["runs"]
    assert kfp_line == f"submitted kfp run {PROJECT}-{SHA[:7]} ({run_id}): {kfp.url}/#/runs/details/{run_id}"
    (name,) = argo.objects["workflows"]
    assert argo_line.startswith(f"submitted argo run {name} (") and argo_line.endswith(
        f"/workflows/{NAMESPACE}/{name}"
    )
    assert sorted(p.name for p in (project / "compiled").iterdir()) == sorted([KFP_FILE, ARGO_FILE])


@pytest.mark.parametrize(("target", "setting"), [("kfp", "kfp_endpoint"), ("argo", "argo_server")])
def test_a_missing_endpoint_is_one_line_naming_handoff_yaml_and_the_setting(
    project: Path, target: str, setting: str
) -> None:
    result = handoff("submit", "--target", target, cwd=project)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {project.resolve() / 'handoff.yaml'}: cluster.{setting}: not set:")
    assert not (project / "compiled").exists()  # nothing compiled, nothing sent
    edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update({setting: "kfp.example.com"}))
    with pytest.raises(HandoffError, match=rf"cluster.{setting}: expected an http\(s\) URL"):
        submit_project(project, project / "compiled", targets=(target,))


@pytest.mark.parametrize("target", ["kfp", "argo"])
def test_a_refused_token_names_the_variable_to_set(
    project: Path, env: pytest.MonkeyPatch, target: str
) -> None:
    variable = KFP_TOKEN_ENV if target == "kfp" else ARGO_TOKEN_ENV
    env.setenv(variable, "expired")
    fake = fake_kfp if target == "kfp" else fake_argo
    with fake() as api:
        point_at(project, **{target: api})
        with pytest.raises(HandoffError) as raised:
            submit_project(project, project / "compiled", targets=(target,))
    message = str(raised.value)
    assert f"at {api.url} did not accept the credentials (401): set {variable} to a valid token" in message
    assert "expired" not in message  # never echo a token


def test_server_errors_say_what_failed_and_what_the_server_said(
    project: Path, env: pytest.MonkeyPatch
) -> None:
    with (
        fake_kfp(failures={"POST /apis/v2beta1/runs": (500, "database is locked")}) as kfp,
        fake_argo(
            failures={f"POST /api/v1/workflows/{NAMESPACE}": (500, "etcdserver: request timed out")}
        ) as argo,
    ):
        point_at(project, kfp=kfp, argo=argo)
        with pytest.raises(HandoffError) as kfp_error:
            submit_project(project, project / "compiled", targets=("kfp",))
        with pytest.raises(HandoffError) as argo_error:
            submit_project(project, project / "compiled", targets=("argo",))
    assert str(kfp_error.value) == (
        f"Kubeflow Pipelines at {kfp.url}: starting run '{PROJECT}-{SHA[:7]}' failed: 500 database is locked"
    )
    action = f"starting a workflow from WorkflowTemplate {NAMESPACE}/{PROJECT}"
    assert str(argo_error.value) == (
        f"the Argo Server at {argo.url}: {action} failed: 500 etcdserver: request timed out"
    )


def test_an_unreachable_server_names_the_setting(project: Path, env: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    edit_yaml(
        project / "handoff.yaml", lambda s: s["cluster"].update(kfp_endpoint=closed, argo_server=closed)
    )
    for target, setting in (("kfp", "cluster.kfp_endpoint"), ("argo", "cluster.argo_server")):
        with pytest.raises(
            HandoffError, match=rf"cannot reach .* at {closed} .*check {setting} in handoff.yaml"
        ):
            submit_project(project, project / "compiled", targets=(target,))


def test_without_a_token_no_credentials_are_sent(project: Path, env: pytest.MonkeyPatch) -> None:
    env.delenv(KFP_TOKEN_ENV)
    env.delenv(ARGO_TOKEN_ENV)
    with fake_kfp(token=None) as kfp, fake_argo(token=None) as argo:
        point_at(project, kfp=kfp, argo=argo)
        submit_project(project, project / "compiled", targets=("kfp", "argo"))
    assert {s.authorization for s in [*kfp.seen, *argo.seen]} == {None}
    assert len(kfp.objects["runs"]) == len(argo.objects["workflows"]) == 1
