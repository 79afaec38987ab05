"""Run a project's pipeline on a schedule: a Kubeflow Pipelines recurring run, an Argo CronWorkflow.

``handoff schedule --cron "0 3 * * 1"`` schedules the training pipeline (``<project>-retrain``);
``handoff schedule --on-drift`` schedules the monitoring pipeline (``<project>-monitor``, hourly by
default) with ``retrain_on_drift`` set, so a drift verdict starts a training run through
``handoff_pipelines.retrain``. Both compile first, as ``handoff submit`` does, and reach the
clusters through the same sessions (``handoff_pipelines.submit``): same endpoints, same tokens
from the environment, same error messages.

- Kubeflow Pipelines: a recurring run in experiment ``<project>``, as ``cluster.service_account``,
  at most one run at a time, no catching up on missed runs, carrying the compiled pipeline and
  every parameter's value. KFP's scheduler reads six cron fields, seconds first, so ``0`` seconds
  is put in front of the five the user gives; it runs them in its controller's time zone (UTC
  unless its deployment sets ``CRON_SCHEDULE_TIMEZONE``).
- Argo Workflows: the compiled WorkflowTemplate is created or updated (as ``handoff submit`` does),
  then a ``CronWorkflow`` that references it (``workflowTemplateRef``), in UTC, never two runs at
  once (``concurrencyPolicy: Forbid``); created, or updated at the version the server holds.

The cron expression is checked before anything is compiled or sent (``handoff_pipelines.cron``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from handoff.errors import HandoffError
from handoff.project import Project
from handoff_pipelines.compiled import (
    ARGO_FILE,
    KFP_FILE,
    MONITOR_ARGO_FILE,
    MONITOR_KFP_FILE,
    compile_project,
    targets_for,
)
from handoff_pipelines.cron import (
    CRON_EXAMPLE,
    DEFAULT_ON_DRIFT_CRON,
    MONITOR,
    RETRAIN,
    RETRAIN_PARAMETER,
    TIMEZONE,
    Kind,
    check_cron,
    cron_workflow,
    kfp_cron,
    schedule_name,
)
from handoff_pipelines.submit import (
    Session,
    apply_workflow_template,
    argo_session,
    endpoint,
    kfp_session,
)


@dataclass(frozen=True)
class Scheduled:
    """A schedule on a cluster, and how many earlier ones of the same name it replaced."""

    target: str
    name: str
    id: str
    url: str
    cron: str  # as the engine holds it
    replaced: int


# --- Kubeflow Pipelines -------------------------------------------------------------------------


def pipeline_parameters(pipeline_file: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every parameter of the compiled pipeline with its default, then ``overrides``: the recurring
    run's page in the KFP UI shows what each run gets."""
    ir = next(yaml.safe_load_all(pipeline_file.read_text()))
    defined = ir["root"].get("inputDefinitions", {}).get("parameters", {})
    unknown = set(overrides) - set(defined)
    if unknown:
        raise HandoffError(f"{pipeline_file} has no parameter {sorted(unknown)}: compile it again")
    return {name: spec.get("defaultValue") for name, spec in defined.items()} | overrides


def _recurring_runs(session: Session, experiment_id: str, name: str) -> list[Any]:
    """The experiment's recurring runs named ``name`` (display names are not unique in KFP)."""
    by_name = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    found, token = [], ""
    while True:
        page = session.api.list_recurring_runs(
            page_token=token, page_size=100, experiment_id=experiment_id, filter=by_name
        )
        found += [r for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return found


def schedule_kfp(project: Project, pipeline_file: Path, kind: Kind, cron: str) -> Scheduled:
    """Create the recurring run, then delete the earlier ones of the same name."""
    settings = project.settings
    name = schedule_name(settings.project, kind)
    overrides = {RETRAIN_PARAMETER["kfp"]: True} if kind == MONITOR else {}
    with kfp_session(project) as session:
        session.action = f"finding experiment {settings.project!r}"
        experiment = session.api.create_experiment(settings.project, namespace=settings.namespace)
        session.action = f"listing recurring runs named {name!r}"
        earlier = _recurring_runs(session, experiment.experiment_id, name)
        # KFP has no update for a recurring run, and a disabled one still clutters the experiment
        # and can be enabled by mistake: the new one replaces the old, which are deleted (the runs
        # they started stay). Created first, so a refused create leaves the old schedule running.
        session.action = f"creating recurring run {name!r}"
        created = session.api.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=name,
            description=f"handoff schedule{' --on-drift' if kind == MONITOR else ''}: {cron} ({TIMEZONE})",
            cron_expression=kfp_cron(cron),
            max_concurrency=1,
            no_catchup=True,
            params=pipeline_parameters(pipeline_file, overrides),
            pipeline_package_path=str(pipeline_file),
            enabled=True,
            service_account=settings.cluster.service_account,
        )
        for old in earlier:
            session.action = f"deleting the earlier recurring run {name!r} ({old.recurring_run_id})"
            session.api.delete_recurring_run(old.recurring_run_id)
    run_id = str(created.recurring_run_id)
    url = f"{session.host}/#/recurringrun/details/{run_id}"
    return Scheduled("kfp", name, run_id, url, kfp_cron(cron), len(earlier))


def unschedule_kfp(project: Project, kind: Kind) -> int:
    """Delete the project's recurring runs of ``kind``; how many there were."""
    settings = project.settings
    name = schedule_name(settings.project, kind)
    with kfp_session(project) as session:
        session.action = f"finding experiment {settings.project!r}"
        experiment = session.api.create_experiment(settings.project, namespace=settings.namespace)
        session.action = f"listing recurring runs named {name!r}"
        earlier = _recurring_runs(session, experiment.experiment_id, name)
        for old in earlier:
            session.action = f"deleting recurring run {name!r} ({old.recurring_run_id})"
            session.api.delete_recurring_run(old.recurring_run_id)
    return len(earlier)


# --- Argo Workflows -----------------------------------------------------------------------------


def schedule_argo(project: Project, template_file: Path, kind: Kind, cron: str) -> Scheduled:
    """Create or update the WorkflowTemplate (as ``handoff submit`` does), then the CronWorkflow."""
    from hera.exceptions import AlreadyExists
    from hera.workflows import models as m

    cron_wf = m.CronWorkflow.model_validate(cron_workflow(project, kind, cron))
    name = cron_wf.metadata.name or ""
    with argo_session(project) as session:
        apply_workflow_template(session, template_file)
        what = f"CronWorkflow {session.namespace}/{name}"
        session.action = f"creating {what}"
        replaced = 0
        try:
            created = session.api.create_cron_workflow(
                m.CreateCronWorkflowRequest(cron_workflow=cron_wf), session.namespace
            )
        except AlreadyExists:
            # The API server accepts an update only at the version it holds now.
            session.action = f"updating {what}"
            current = session.api.get_cron_workflow(name, session.namespace)
            cron_wf.metadata.resource_version = current.metadata.resource_version
            created = session.api.update_cron_workflow(
                name, m.UpdateCronWorkflowRequest(cron_workflow=cron_wf), session.namespace
            )
            replaced = 1
    url = f"{session.host}/cron-workflows/{session.namespace}/{name}"
    return Scheduled("argo", name, created.metadata.uid or "", url, check_cron(cron), replaced)


def unschedule_argo(project: Project, kind: Kind) -> int:
    """Delete the project's CronWorkflow of ``kind`` (its WorkflowTemplate stays); 0 when none."""
    from hera.exceptions import NotFound

    name = schedule_name(project.settings.project, kind)
    with argo_session(project) as session:
        session.action = f"deleting CronWorkflow {session.namespace}/{name}"
        try:
            session.api.delete_cron_workflow(name, session.namespace)
        except NotFound:
            return 0
    return 1


# --- both ---------------------------------------------------------------------------------------


def _chosen(project: Project, targets: tuple[str, ...] | None) -> tuple[str, ...]:
    chosen = targets or targets_for(project.settings.orchestrator)
    for target in chosen:  # every address is checked before anything is compiled or sent
        endpoint(project, target)
    return chosen


def schedule_project(
    project_dir: Path | str,
    out_dir: Path | str,
    cron: str | None = None,
    *,
    on_drift: bool = False,
    image: str | None = None,
    targets: tuple[str, ...] | None = None,
) -> list[Scheduled]:
    """Compile into ``out_dir``, then schedule the training pipeline on ``cron`` (or, ``on_drift``,
    the monitoring pipeline with retrain-on-drift, hourly by default) on each target."""
    if cron is None and not on_drift:
        raise HandoffError(f'--cron is required: when to train, e.g. --cron "{CRON_EXAMPLE}"')
    cron = check_cron(DEFAULT_ON_DRIFT_CRON if cron is None else cron)
    project = Project.load(project_dir)
    chosen = _chosen(project, targets)
    # --on-drift needs the monitoring pipeline: compile refuses it without a store pods can read.
    compile_project(project.root, out_dir, image=image, targets=chosen, monitor=True if on_drift else None)
    out = Path(out_dir)
    kind = MONITOR if on_drift else RETRAIN
    scheduled = []
    if "kfp" in chosen:
        scheduled.append(
            schedule_kfp(project, out / (MONITOR_KFP_FILE if on_drift else KFP_FILE), kind, cron)
        )
    if "argo" in chosen:
        scheduled.append(
            schedule_argo(project, out / (MONITOR_ARGO_FILE if on_drift else ARGO_FILE), kind, cron)
        )
    return scheduled


def unschedule_project(
    project_dir: Path | str, *, on_drift: bool = False, targets: tuple[str, ...] | None = None
) -> list[tuple[str, str, int]]:
    """Delete the schedules ``schedule_project`` made (target, name, how many); none is no error."""
    project = Project.load(project_dir)
    kind = MONITOR if on_drift else RETRAIN
    name = schedule_name(project.settings.project, kind)
    removed = []
    for target in _chosen(project, targets):
        count = unschedule_kfp(project, kind) if target == "kfp" else unschedule_argo(project, kind)
        removed.append((target, name, count))
    return removed
