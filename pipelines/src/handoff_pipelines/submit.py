"""Submit a project's compiled pipeline to a cluster: Kubeflow Pipelines, Argo Workflows, or both.

``handoff submit`` compiles first (``handoff_pipelines.compiled``, so what runs is what
``compiled/`` shows), then:

- Kubeflow Pipelines (``cluster.kfp_endpoint``): ``kfp.Client.create_run_from_pipeline_package``
  through the v2beta1 API, in experiment ``<project>``, in handoff.yaml's namespace, as
  ``cluster.service_account`` (KFP's IR cannot carry a service account: the run does);
- Argo Workflows (``cluster.argo_server``): the Argo Server's REST API through hera's
  ``WorkflowsService``: create the WorkflowTemplate (or update it when it exists), then create a
  Workflow that references it (``workflowTemplateRef``).

Tokens come from the environment only, never from files in the project: ``KF_PIPELINES_TOKEN``
and ``ARGO_TOKEN`` (for instance ``kubectl create token <service-account>``; a ``Bearer`` prefix
is optional). Without one, requests go unauthenticated (a port-forward, or a server that needs
no token). Errors name the endpoint, the setting in handoff.yaml or the variable to fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import yaml

from handoff.errors import HandoffError
from handoff.labels import labels
from handoff.lineage import git_sha
from handoff.project import Project
from handoff.settings import SETTINGS_FILE
from handoff_pipelines.compiled import ARGO_FILE, KFP_FILE, compile_project, targets_for

KFP_TOKEN_ENV = "KF_PIPELINES_TOKEN"
ARGO_TOKEN_ENV = "ARGO_TOKEN"
# Seconds to wait for an API server's answer: long enough for a busy server, short enough that a
# wrong address fails while the user is still looking.
TIMEOUT_S = 30.0
GENERATE_NAME_MAX = 58
ENDPOINT_FIELDS = {"kfp": "cluster.kfp_endpoint", "argo": "cluster.argo_server"}
ENDPOINT_EXAMPLES = {"kfp": "https://kfp.example.com", "argo": "https://argo.example.com:2746"}


@dataclass(frozen=True)
class Submitted:
    """A run started on a cluster."""

    target: str
    name: str
    id: str
    url: str


def run_name(project: Project, now: datetime | None = None) -> str:
    """``<project>-<short commit>`` in a git checkout (or CI), else ``<project>-<UTC time>``."""
    sha = git_sha(project.root)
    if sha != "unknown":
        return f"{project.settings.project}-{sha[:7]}"
    return f"{project.settings.project}-{(now or datetime.now(UTC)).strftime('%Y%m%d-%H%M%S')}"


def generate_name(name: str) -> str:
    """A Workflow's ``generateName`` from the run's name: the Argo Server refuses more than 58
    characters (the API server adds 5, and a workflow's name goes into its pods' labels)."""
    return name[: GENERATE_NAME_MAX - 1].rstrip("-") + "-"


def endpoint(project: Project, target: str) -> str:
    """The API address handoff.yaml gives for ``target``, checked: http(s) and a host."""
    field = ENDPOINT_FIELDS[target]
    value = getattr(project.settings.cluster, field.split(".")[1])
    settings_file = project.root / SETTINGS_FILE
    if not value:
        engine = "Kubeflow Pipelines API" if target == "kfp" else "Argo Server"
        raise HandoffError(
            f"not set: `handoff submit --target {target}` needs the {engine} address, "
            f"e.g. {ENDPOINT_EXAMPLES[target]}",
            file=settings_file,
            field=field,
        )
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HandoffError(
            f"expected an http(s) URL like {ENDPOINT_EXAMPLES[target]}, got {value!r}",
            file=settings_file,
            field=field,
        )
    return value.rstrip("/")


def _token(variable: str) -> str | None:
    """A bearer token from the environment, with or without its ``Bearer`` prefix."""
    value = os.environ.get(variable, "").strip()
    if value.lower().startswith("bearer "):
        value = value[len("bearer ") :].strip()
    return value or None


def _refused(status: int, engine: str, host: str, variable: str) -> str:
    if status == 401:
        return f"{engine} at {host} did not accept the credentials (401): set {variable} to a valid token"
    return f"{engine} at {host} refused the request (403): the token in {variable} may not do this"


# --- Kubeflow Pipelines -----------------------------------------------------------------------


def _kfp_error(exc: Any, host: str, action: str) -> HandoffError:
    status = int(getattr(exc, "status", 0) or 0)
    if status in (401, 403):
        return HandoffError(_refused(status, "Kubeflow Pipelines", host, KFP_TOKEN_ENV) + f" ({action})")
    detail = str(getattr(exc, "reason", "") or "")
    try:  # grpc-gateway's error body: {"error"/"message": ..., "code": ...}
        body = json.loads(getattr(exc, "body", "") or "{}")
        detail = body.get("message") or body.get("error") or detail
    except (ValueError, AttributeError):
        pass
    return HandoffError(f"Kubeflow Pipelines at {host}: {action} failed: {status} {detail}".rstrip())


@dataclass
class Session:
    """An API client for one engine, its address and what it is doing now (for error messages)."""

    api: Any  # kfp.Client, or hera's WorkflowsService
    host: str
    namespace: str
    action: str = "connecting"


@contextlib.contextmanager
def kfp_session(project: Project) -> Iterator[Session]:
    """A ``kfp.Client`` for handoff.yaml's ``cluster.kfp_endpoint``; API errors become HandoffErrors
    naming ``session.action``, the endpoint, and the setting or the variable to fix."""
    import kfp
    import kfp_server_api
    import urllib3

    host = endpoint(project, "kfp")
    namespace = project.settings.namespace
    session = Session(None, host, namespace)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # kfp.Client warns about server versions and prints links; ours are printed by the CLI.
            warnings.simplefilter("ignore", FutureWarning)
            session.api = kfp.Client(host=host, namespace=namespace, existing_token=_token(KFP_TOKEN_ENV))
            yield session
    except kfp_server_api.ApiException as exc:
        raise _kfp_error(exc, host, session.action) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise HandoffError(
            f"cannot reach Kubeflow Pipelines at {host} ({exc.__class__.__name__}); check "
            f"{ENDPOINT_FIELDS['kfp']} in {SETTINGS_FILE}",
        ) from None


def submit_kfp(project: Project, pipeline_file: Path, name: str) -> Submitted:
    """Start a run of the compiled pipeline; the experiment is the project (created if missing)."""
    settings = project.settings
    with kfp_session(project) as session:
        session.action = f"starting run {name!r}"
        result = session.api.create_run_from_pipeline_package(
            str(pipeline_file),
            arguments={},
            run_name=name,
            experiment_name=settings.project,
            namespace=settings.namespace,
            service_account=settings.cluster.service_account,
        )
    run_id = str(result.run_id)
    return Submitted("kfp", name, run_id, f"{session.host}/#/runs/details/{run_id}")


# --- Argo Workflows -----------------------------------------------------------------------------


class _Session(requests.Session):
    """hera's service sets no timeout: a black-holed address would hang the command."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT_S)
        return super().request(*args, **kwargs)


def _argo_error(exc: Exception, host: str, action: str) -> HandoffError:
    # hera says "Server returned status code <code> with message: `<the server's message>`".
    said = re.fullmatch(r"Server returned status code (\d+) with message: `(.*)`", str(exc), re.DOTALL)
    status, message = (int(said[1]), said[2]) if said else (0, str(exc))
    if status in (401, 403):
        return HandoffError(_refused(status, "the Argo Server", host, ARGO_TOKEN_ENV) + f" ({action})")
    code = f"{status} " if status else ""
    return HandoffError(f"the Argo Server at {host}: {action} failed: {code}{message}")


@contextlib.contextmanager
def argo_session(project: Project) -> Iterator[Session]:
    """hera's ``WorkflowsService`` for handoff.yaml's ``cluster.argo_server``; API errors become
    HandoffErrors naming ``session.action``, the server, and the setting or the variable to fix."""
    from hera.exceptions import HeraException
    from hera.workflows import WorkflowsService

    host = endpoint(project, "argo")
    namespace = project.settings.namespace
    service = WorkflowsService(
        host=host, token=_token(ARGO_TOKEN_ENV), namespace=namespace, session=_Session()
    )
    session = Session(service, host, namespace)
    try:
        with service, warnings.catch_warnings():
            # hera 7.1 serialises requests with pydantic's deprecated `.json()`: not the user's concern.
            warnings.simplefilter("ignore", DeprecationWarning)
            yield session
    except HeraException as exc:
        raise _argo_error(exc, host, session.action) from None
    except requests.RequestException as exc:
        raise HandoffError(
            f"cannot reach the Argo Server at {host} ({exc.__class__.__name__}); check "
            f"{ENDPOINT_FIELDS['argo']} in {SETTINGS_FILE}",
        ) from None


def apply_workflow_template(session: Session, template_file: Path) -> str:
    """Create the compiled WorkflowTemplate, or update it when it exists; its name."""
    from hera.exceptions import AlreadyExists
    from hera.workflows import models as m

    namespace = session.namespace
    template = m.WorkflowTemplate.model_validate(yaml.safe_load(template_file.read_text()))
    template_name = template.metadata.name
    if not template_name:
        raise HandoffError("a WorkflowTemplate needs a name", file=template_file, field="metadata.name")
    what = f"WorkflowTemplate {namespace}/{template_name}"
    session.action = f"creating {what}"
    try:
        session.api.create_workflow_template(m.WorkflowTemplateCreateRequest(template=template), namespace)
    except AlreadyExists:
        # The API server accepts an update only at the version it holds now.
        session.action = f"updating {what}"
        current = session.api.get_workflow_template(template_name, namespace)
        template.metadata.resource_version = current.metadata.resource_version
        session.api.update_workflow_template(
            template_name,
            m.WorkflowTemplateUpdateRequest(name=template_name, template=template),
            namespace,
        )
    return template_name


def submit_argo(project: Project, template_file: Path, name: str) -> Submitted:
    """Create or update the WorkflowTemplate, then start a Workflow from it."""
    from hera.workflows import models as m

    settings = project.settings
    namespace = settings.namespace
    with argo_session(project) as session:
        template_name = apply_workflow_template(session, template_file)
        session.action = f"starting a workflow from WorkflowTemplate {namespace}/{template_name}"
        workflow = m.Workflow(
            metadata=m.ObjectMeta(
                generate_name=generate_name(name), namespace=namespace, labels=labels(settings.project)
            ),
            spec=m.WorkflowSpec(workflow_template_ref=m.WorkflowTemplateRef(name=template_name)),
        )
        created = session.api.create_workflow(m.WorkflowCreateRequest(workflow=workflow), namespace)
    workflow_name = created.metadata.name or ""
    return Submitted(
        "argo",
        workflow_name,
        created.metadata.uid or "",
        f"{session.host}/workflows/{namespace}/{workflow_name}",
    )


def submit_project(
    project_dir: Path | str,
    out_dir: Path | str,
    image: str | None = None,
    targets: tuple[str, ...] | None = None,
) -> list[Submitted]:
    """Compile into ``out_dir`` and submit to each target (default: handoff.yaml's orchestrator)."""
    project = Project.load(project_dir)
    chosen = targets or targets_for(project.settings.orchestrator)
    for target in chosen:  # every address is checked before anything is compiled or sent
        endpoint(project, target)
    compile_project(project.root, out_dir, image=image, targets=chosen)
    out = Path(out_dir)
    name = run_name(project)
    submitted = []
    if "kfp" in chosen:
        submitted.append(submit_kfp(project, out / KFP_FILE, name))
    if "argo" in chosen:
        submitted.append(submit_argo(project, out / ARGO_FILE, name))
    return submitted
