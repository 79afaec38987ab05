"""Loopback fakes of the Kubeflow Pipelines v2beta1 API and the Argo Server, for the real clients.

``kfp.Client`` and hera's ``WorkflowsService`` talk over loopback HTTP to these. The fakes check
what a real server checks: the path and method, the bearer token, and the body (KFP: runs and
recurring runs against the fields of KFP's messages, their pipeline spec parsed strictly into
KFP's own protobuf messages, as the API server does; Argo: Argo's JSON schema for the request,
strict about unknown fields, plus the server's own checks on names and cron schedules). They
answer with the same shapes and error bodies (grpc-gateway JSON) as the servers.
"""

from __future__ import annotations

import copy
import json
import random
import re
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

from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from .conftest import edit_yaml
from .test_compile_targets import argo_errors

NAMESPACE = "ml-models"
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
# Fields of KFP's v2beta1 RecurringRun message (backend/api/v2beta1/recurring_run.proto), its
# Trigger (a oneof) and CronSchedule.
RECURRING_RUN_FIELDS = {
    "recurring_run_id",
    "display_name",
    "description",
    "pipeline_id",
    "pipeline_version_id",
    "pipeline_spec",
    "pipeline_version_reference",
    "runtime_config",
    "service_account",
    "max_concurrency",
    "trigger",
    "mode",
    "created_at",
    "updated_at",
    "status",
    "error",
    "no_catchup",
    "namespace",
    "experiment_id",
    "plugins_input",
}
TRIGGER_FIELDS = {"cron_schedule", "periodic_schedule"}
CRON_SCHEDULE_FIELDS = {"start_time", "end_time", "cron"}
RUNTIME_CONFIG_FIELDS = {"parameters", "pipeline_root"}
# What a cron field may hold in the parsers the servers use (robfig/cron): numbers, names, ranges,
# steps, lists, * and ?.
_CRON_FIELD = re.compile(r"^[\w*?/,\-]+$")
# The Argo Server refuses longer CronWorkflow names: the Workflows it creates get a 10-digit suffix.
CRON_WORKFLOW_NAME_MAX = 52


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

        do_GET = do_POST = do_PUT = do_DELETE = _handle

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


def point_at(project: Path, kfp: FakeApi | None = None, argo: FakeApi | None = None, **settings: Any) -> None:
    """handoff.yaml's cluster endpoints at the fakes (and any top-level ``settings``)."""

    def change(data: dict[str, Any]) -> None:
        data.update(settings)
        data["cluster"].update(kfp_endpoint=kfp and kfp.url, argo_server=argo and argo.url)

    edit_yaml(project / "handoff.yaml", change)


# --- the Kubeflow Pipelines v2beta1 API ---------------------------------------------------------


def _display_name_filter(seen: Seen) -> str | None:
    """The name a list request filters on (kfp.Client's ``filter``: one EQUALS on display_name)."""
    if "filter" not in seen.query:
        return None
    (predicate,) = json.loads(seen.query["filter"][0])["predicates"]
    assert predicate["key"] == "display_name"
    return str(predicate["stringValue"])


def _pipeline_spec(spec: Any) -> None:
    """What the API server does with a pipeline spec: parse it into the protos, strictly."""
    try:
        json_format.ParseDict(spec["pipeline_spec"], pipeline_spec_pb2.PipelineSpec())
        json_format.ParseDict(spec["platform_spec"], pipeline_spec_pb2.PlatformSpec())
    except (json_format.ParseError, KeyError, TypeError) as exc:
        raise Reply(400, f"Invalid input error: pipeline spec: {exc}") from None


def _robfig_cron(expression: str) -> None:
    """What KFP's recurring run API accepts (robfig/cron v1's ``Parse``): seconds first, then
    minutes, hours, day of month, month, and an optional day of week."""
    fields = expression.split()
    if len(fields) not in (5, 6) or not all(_CRON_FIELD.match(f) for f in fields):
        raise Reply(400, f"Invalid input error: invalid cron schedule {expression!r}")


def _recurring_run(api: FakeApi, body: Any) -> dict[str, Any]:
    experiments = api.objects.setdefault("experiments", {})
    problems = sorted(set(body) - RECURRING_RUN_FIELDS)
    trigger = body.get("trigger") or {}
    problems += sorted(set(trigger) - TRIGGER_FIELDS)
    cron = trigger.get("cron_schedule") or {}
    problems += sorted(set(cron) - CRON_SCHEDULE_FIELDS)
    problems += sorted(set(body.get("runtime_config") or {}) - RUNTIME_CONFIG_FIELDS)
    if problems:
        raise Reply(400, f"Invalid input error: unknown fields {problems}")
    if not body.get("display_name") or body.get("experiment_id") not in experiments:
        raise Reply(400, f"Invalid input error: recurring run {sorted(body)}")
    if len(trigger) != 1 or body.get("mode") not in ("ENABLE", "DISABLE"):
        raise Reply(400, "Invalid input error: a recurring run needs one trigger and a mode")
    if not 1 <= int(body.get("max_concurrency") or 0) <= 10:
        raise Reply(400, "Invalid input error: max concurrency must be in [1, 10]")
    if cron:
        _robfig_cron(cron.get("cron", ""))
    _pipeline_spec(body.get("pipeline_spec"))
    created = {
        **copy.deepcopy(body),
        "recurring_run_id": str(uuid.uuid4()),
        "status": "ENABLED" if body["mode"] == "ENABLE" else "DISABLED",
        "namespace": experiments[body["experiment_id"]]["namespace"],
    }
    api.objects.setdefault("recurring_runs", {})[created["recurring_run_id"]] = created
    return created


def kfp_route(api: FakeApi, seen: Seen) -> Any:
    experiments = api.objects.setdefault("experiments", {})
    recurring = api.objects.setdefault("recurring_runs", {})
    if (seen.method, seen.path) == ("GET", "/apis/v2beta1/healthz"):
        return {
            "commit_sha": "unknown",
            "tag_name": "2.17.0",
            "multi_user": False,
            "pipeline_store": "database",
        }
    if (seen.method, seen.path) == ("GET", "/apis/v2beta1/experiments"):
        (namespace,) = seen.query["namespace"]
        name = _display_name_filter(seen)
        found = [e for e in experiments.values() if (e["display_name"], e["namespace"]) == (name, namespace)]
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
        _pipeline_spec(run.get("pipeline_spec"))
        created = {**copy.deepcopy(run), "run_id": str(uuid.uuid4()), "state": "PENDING"}
        api.objects.setdefault("runs", {})[created["run_id"]] = created
        return created
    if (seen.method, seen.path) == ("POST", "/apis/v2beta1/recurringruns"):
        return _recurring_run(api, seen.body)
    if (seen.method, seen.path) == ("GET", "/apis/v2beta1/recurringruns"):
        name = _display_name_filter(seen)
        (experiment,) = seen.query.get("experiment_id", [None])
        found = [
            r
            for r in recurring.values()
            if (name is None or r["display_name"] == name) and experiment in (None, r["experiment_id"])
        ]
        # The proto's field is `recurringRuns` (not snake_case, unlike every other list response).
        return {"recurringRuns": found, "total_size": len(found)} if found else {}
    if seen.method == "DELETE" and seen.path.startswith("/apis/v2beta1/recurringruns/"):
        run_id = seen.path.rsplit("/", 1)[1]
        if recurring.pop(run_id, None) is None:
            raise Reply(404, f"Not found: recurring run {run_id}")
        return {}
    raise Reply(404, f"Not Found: {seen.method} {seen.path}")


@contextmanager
def fake_kfp(**kwargs: Any) -> Iterator[FakeApi]:
    with running(FakeApi(**kwargs), kfp_route) as api:
        yield api


# --- the Argo Server ----------------------------------------------------------------------------


def _valid(seen: Seen, kind: str) -> None:
    errors = argo_errors(seen.body, kind)
    if errors:
        raise Reply(400, "; ".join(errors))


def _standard_cron(expression: str) -> None:
    """What the Argo Server accepts (robfig/cron v3's ``ParseStandard``): five fields, no seconds."""
    fields = expression.split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise Reply(400, f"cron schedule {expression} is malformed: expected exactly 5 fields")


def _replace(store: dict[str, Any], name: str, obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """An update, accepted only at the version the server holds now."""
    version = obj["metadata"].get("resourceVersion")
    if version != store[name]["metadata"]["resourceVersion"]:
        raise Reply(409, f"Operation cannot be fulfilled on {kind} {name!r}: the object has been modified")
    obj["metadata"]["resourceVersion"] = str(int(version) + 1)
    store[name] = obj
    return obj


def argo_route(api: FakeApi, seen: Seen) -> Any:
    templates = api.objects.setdefault("templates", {})
    crons = api.objects.setdefault("cron_workflows", {})
    if (seen.method, seen.path) == ("GET", "/api/v1/version"):
        return {"version": "v3.7.4", "gitCommit": "0" * 40, "platform": "linux/amd64"}
    base = f"/api/v1/workflow-templates/{NAMESPACE}"
    cron_base = f"/api/v1/cron-workflows/{NAMESPACE}"

    if (seen.method, seen.path) == ("POST", base):
        _valid(seen, "WorkflowTemplateCreateRequest")
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
            _valid(seen, "WorkflowTemplateUpdateRequest")
            return _replace(templates, name, copy.deepcopy(seen.body["template"]), "workflowtemplates")
    if (seen.method, seen.path) == ("POST", f"/api/v1/workflows/{NAMESPACE}"):
        _valid(seen, "WorkflowCreateRequest")
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

    def checked_cron(kind: str) -> dict[str, Any]:
        """The server's validation of a CronWorkflow (workflow/validate's ValidateCronWorkflow)."""
        _valid(seen, kind)
        cron = copy.deepcopy(seen.body["cronWorkflow"])
        name = cron["metadata"]["name"]
        if len(name) > CRON_WORKFLOW_NAME_MAX:
            raise Reply(400, f"cron workflow name {name!r} must not be more than 52 characters long")
        for schedule in cron["spec"]["schedules"]:
            _standard_cron(schedule)
        ref = cron["spec"]["workflowSpec"]["workflowTemplateRef"]["name"]
        if ref not in templates:
            raise Reply(400, f'workflowtemplates.argoproj.io "{ref}" not found')
        return cron

    if (seen.method, seen.path) == ("POST", cron_base):
        cron = checked_cron("CreateCronWorkflowRequest")
        name = cron["metadata"]["name"]
        if name in crons:
            raise Reply(409, f'cronworkflows.argoproj.io "{name}" already exists')
        cron["metadata"].update(resourceVersion="1", uid=str(uuid.uuid4()))
        crons[name] = cron
        return cron
    if seen.path.startswith(cron_base + "/"):
        name = seen.path.removeprefix(cron_base + "/")
        if name not in crons:
            raise Reply(404, f'cronworkflows.argoproj.io "{name}" not found')
        if seen.method == "GET":
            return crons[name]
        if seen.method == "PUT":
            return _replace(crons, name, checked_cron("UpdateCronWorkflowRequest"), "cronworkflows")
        if seen.method == "DELETE":
            del crons[name]
            return {}
    raise Reply(404, f"Not Found: {seen.method} {seen.path}")


@contextmanager
def fake_argo(**kwargs: Any) -> Iterator[FakeApi]:
    with running(FakeApi(**kwargs), argo_route) as api:
        yield api
