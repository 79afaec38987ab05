"""`handoff submit`: the compiled pipeline goes to Kubeflow Pipelines and/or the Argo Server.

The real clients (``kfp.Client``, hera's ``WorkflowsService``) talk over loopback HTTP to small
fakes of the two APIs. The fakes check what a real server checks: the path and method, the bearer
token, and the body (KFP: the run and the pipeline spec parsed strictly into KFP's own protobuf
messages, as the API server does; Argo: Argo's JSON schema for the request, strict about unknown
fields). They answer with the same shapes and error bodies (grpc-gateway JSON) as the servers.
"""

from __future__ import annotations

import copy
import json
import random
import socket
import string
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from handoff.errors import HandoffError
from handoff.labels import labels
from handoff_pipelines.compiled import ARGO_FILE, KFP_FILE
from handoff_pipelines.submit import ARGO_TOKEN_ENV, KFP_TOKEN_ENV, submit_project

from . import test_compile_targets as compile_checks
from .conftest import edit_yaml, handoff

pytestmark = pytest.mark.unit

NAMESPACE = "ml-models"
PROJECT = "digits-classifier"
SHA = "3f2c1e0d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"
TOKEN = "s3cr3t-token"
# Fields of KFP's v2beta1 Run message (backend/api/v2beta1/run.proto): anything else is a typo.
RUN_FIELDS = {
    "experiment_id",
    "run_id",
    "display_name",
    "storage_state",
    "description",
    "pipeline_version_id",
    "pipeline_spec",
    "pipeline_version_reference",
    "runtime_config",
    "service_account",
    "created_at",
    "scheduled_at",
    "finished_at",
    "state",
    "error",
    "run_details",
    "recurring_run_id",
    "state_history",
}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    body: Any


@dataclass
class FakeApi:
    """State and request log shared by a fake server's handler threads."""

    token: str | None = TOKEN
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)  # "METHOD path" -> (status, message)
    seen: list[Seen] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""

    def calls(self) -> list[str]:
        return [f"{s.method} {s.path}" for s in self.seen]


class Reply(Exception):
    """Answer the request with ``status`` and a grpc-gateway error body (or ``body``)."""

    def __init__(self, status: int, message: str = "", body: Any = None):
        self.status = status
        self.body = body if body is not None else {"error": message, "code": 2, "message": message}


def serve(api: FakeApi, route: Any) -> Any:
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command,
                parts.path,
                parse_qs(parts.query),
                self.headers.get("Authorization"),
                json.loads(raw) if raw else None,
            )
            api.seen.append(seen)
            try:
                if api.token and seen.authorization != f"Bearer {api.token}":
                    raise Reply(401, "Unauthenticated: a valid bearer token is required")
                failure = api.failures.get(f"{seen.method} {seen.path}")
                if failure:
                    raise Reply(*failure)
                status, body = 200, route(api, seen)
            except Reply as reply:
                status, body = reply.status, reply.body
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _handle

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def running(api: FakeApi, route: Any) -> Iterator[FakeApi]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), serve(api, route))
    api.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


# --- the Kubeflow Pipelines v2beta1 API ---------------------------------------------------------


def kfp_route(api: FakeApi, seen: Seen) -> Any:
    experiments = api.objects.setdefault("experiments", {})
    if (seen.method, seen.path) == ("GET", "/apis/v2beta1/healthz"):
        return {
            "commit_sha": "unknown",
            "tag_name": "2.17.0",
            "multi_user": False,
            "pipeline_store": "database",
        }
    if (seen.method, seen.path) == ("GET", "/apis/v2beta1/experiments"):
        (namespace,) = seen.query["namespace"]
        (predicate,) = json.loads(seen.query["filter"][0])["predicates"]
        assert predicate["key"] == "display_name"
        found = [
            e
            for e in experiments.values()
            if (e["display_name"], e["namespace"]) == (predicate["stringValue"], namespace)
        ]
        return {"experiments": found, "total_size": len(found)} if found else {}
    if (seen.method, seen.path) == ("POST", "/apis/v2beta1/experiments"):
        if set(seen.body) - {"display_name", "description", "namespace"}:
            raise Reply(400, f"unknown fields in experiment: {sorted(seen.body)}")
        experiment = {
            **copy.deepcopy(seen.body),
            "experiment_id": str(uuid.uuid4()),
            "storage_state": "AVAILABLE",
        }
        experiments[experiment["experiment_id"]] = experiment
        return experiment
    if (seen.method, seen.path) == ("POST", "/apis/v2beta1/runs"):
        run = seen.body
        if (
            set(run) - RUN_FIELDS
            or not run.get("display_name")
            or run.get("experiment_id") not in experiments
        ):
            raise Reply(400, f"Invalid input error: run {sorted(run)}")
        try:  # what the API server does with the pipeline spec: parse it into the protos, strictly
            json_format.ParseDict(run["pipeline_spec"]["pipeline_spec"], pipeline_spec_pb2.PipelineSpec())
            json_format.ParseDict(run["pipeline_spec"]["platform_spec"], pipeline_spec_pb2.PlatformSpec())
        except (json_format.ParseError, KeyError) as exc:
            raise Reply(400, f"Invalid input error: pipeline spec: {exc}") from None
        created = {**copy.deepcopy(run), "run_id": str(uuid.uuid4()), "state": "PENDING"}
        api.objects.setdefault("runs", {})[created["run_id"]] = created
        return created
    raise Reply(404, f"Not Found: {seen.method} {seen.path}")


@contextmanager
def fake_kfp(**kwargs: Any) -> Iterator[FakeApi]:
    with running(FakeApi(**kwargs), kfp_route) as api:
        yield api


# --- the Argo Server ----------------------------------------------------------------------------


def argo_route(api: FakeApi, seen: Seen) -> Any:
    templates = api.objects.setdefault("templates", {})
    if (seen.method, seen.path) == ("GET", "/api/v1/version"):
        return {"version": "v3.7.4", "gitCommit": "0" * 40, "platform": "linux/amd64"}
    base = f"/api/v1/workflow-templates/{NAMESPACE}"

    def valid(kind: str) -> None:
        errors = compile_checks.argo_errors(seen.body, kind)
        if errors:
            raise Reply(400, "; ".join(errors))

    if (seen.method, seen.path) == ("POST", base):
        valid("WorkflowTemplateCreateRequest")
        template = copy.deepcopy(seen.body["template"])
        name = template["metadata"]["name"]
        if name in templates:
            raise Reply(409, f'workflowtemplates.argoproj.io "{name}" already exists')
        template["metadata"].update(resourceVersion="1", uid=str(uuid.uuid4()))
        templates[name] = template
        return template
    if seen.path.startswith(base + "/"):
        name = seen.path.removeprefix(base + "/")
        if name not in templates:
            raise Reply(404, f'workflowtemplates.argoproj.io "{name}" not found')
        if seen.method == "GET":
            return templates[name]
        if seen.method == "PUT":
            valid("WorkflowTemplateUpdateRequest")
            template = copy.deepcopy(seen.body["template"])
            version = template["metadata"].get("resourceVersion")
            if version != templates[name]["metadata"]["resourceVersion"]:
                raise Reply(
                    409, f"Operation cannot be fulfilled: resourceVersion {version!r} is not the latest"
                )
            template["metadata"]["resourceVersion"] = str(int(version) + 1)
            templates[name] = template
            return template
    if (seen.method, seen.path) == ("POST", f"/api/v1/workflows/{NAMESPACE}"):
        valid("WorkflowCreateRequest")
        workflow = copy.deepcopy(seen.body["workflow"])
        ref = workflow["spec"]["workflowTemplateRef"]["name"]
        if ref not in templates:
            raise Reply(400, f'workflowtemplates.argoproj.io "{ref}" not found')
        metadata = workflow["metadata"]
        if len(metadata["generateName"]) > 58:  # what the Argo Server's validation refuses
            raise Reply(
                400, f"workflow name prefix {metadata['generateName']!r} is longer than 58 characters"
            )
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        metadata.update(name=metadata.pop("generateName") + suffix, uid=str(uuid.uuid4()))
        api.objects.setdefault("workflows", {})[metadata["name"]] = workflow
        return workflow
    raise Reply(404, f"Not Found: {seen.method} {seen.path}")


@contextmanager
def fake_argo(**kwargs: Any) -> Iterator[FakeApi]:
    with running(FakeApi(**kwargs), argo_route) as api:
        yield api


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Tokens as CI sets them, and a known commit for the run's name."""
    monkeypatch.setenv(KFP_TOKEN_ENV, TOKEN)
    monkeypatch.setenv(ARGO_TOKEN_ENV, f"Bearer {TOKEN}")
    monkeypatch.setenv("HANDOFF_GIT_SHA", SHA)
    return monkeypatch


def point_at(project: Path, kfp: FakeApi | None = None, argo: FakeApi | None = None, **settings: Any) -> None:
    def change(data: dict[str, Any]) -> None:
        data.update(settings)
        data["cluster"].update(kfp_endpoint=kfp and kfp.url, argo_server=argo and argo.url)

    edit_yaml(project / "handoff.yaml", change)


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
