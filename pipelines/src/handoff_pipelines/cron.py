"""Schedules as the engines hold them: the cron expression, checked, and the Argo CronWorkflow.

Pure functions of a project and an expression, shared by ``handoff compile --cron`` (the
CronWorkflow as a file, for clusters whose Argo objects are applied from git) and
``handoff schedule`` (``handoff_pipelines.schedule``: the same object through the Argo Server,
and KFP's recurring runs).

The cron expression has five fields (minute, hour, day of month, month, day of week), as Argo
(robfig/cron's ``ParseStandard``) and crontab take them, checked before anything is compiled or
sent; KFP's scheduler reads a sixth, seconds, first (``kfp_cron``). Schedules run in UTC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

from handoff.errors import HandoffError
from handoff.labels import labels
from handoff.project import Project

Kind = Literal["retrain", "monitor"]
RETRAIN: Kind = "retrain"
MONITOR: Kind = "monitor"
CRON_EXAMPLE = "0 3 * * 1"  # Mondays at 03:00 UTC
DEFAULT_ON_DRIFT_CRON = "0 * * * *"  # every hour, on the hour
TIMEZONE = "UTC"
# The Argo Server refuses longer CronWorkflow names: the Workflows it starts get a 10-digit suffix.
CRON_WORKFLOW_NAME_MAX = 52
# A run missed while the controller was down still starts, once, within a day (KFP: no_catchup).
STARTING_DEADLINE_S = 24 * 3600
# The monitoring pipeline's parameter that makes a drift verdict start a training run.
RETRAIN_PARAMETER = {"kfp": "retrain_on_drift", "argo": "retrain-on-drift"}
# Each cron field: its name and range, and the names it takes (crontab's, robfig/cron's).
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {name: number for number, name in enumerate(_MONTHS, 1)}),
    ("day of week", 0, 6, {name: number for number, name in enumerate(_DAYS)}),
)


def _cron_error(expression: str, problem: str) -> HandoffError:
    return HandoffError(
        f"--cron {expression!r}: {problem}; expected 5 fields (minute hour day-of-month month "
        f'day-of-week), e.g. --cron "{CRON_EXAMPLE}" for Mondays at 03:00 {TIMEZONE}'
    )


def check_cron(expression: str) -> str:
    """The expression, checked as Argo and KFP's schedulers would parse it (robfig/cron): five
    fields of numbers or names, ``*``, ranges ``a-b``, steps ``/n`` and lists ``a,b``."""
    fields = expression.split()
    if len(fields) != len(_FIELDS):
        raise _cron_error(expression, f"{len(fields)} fields")
    for value, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        for item in value.split(","):
            base, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                raise _cron_error(expression, f"the {name} field's step {step!r} is not a positive number")
            if base == "*":
                continue
            numbers = []
            for part in base.split("-", 1):
                number = names.get(part.lower()) if not part.isdigit() else int(part)
                if number is None or not low <= number <= high:
                    raise _cron_error(expression, f"the {name} field takes {low}-{high}, not {part!r}")
                numbers.append(number)
            if numbers != sorted(numbers):
                raise _cron_error(expression, f"the {name} field's range {base!r} ends before it starts")
    return " ".join(fields)


def kfp_cron(expression: str) -> str:
    """KFP's scheduler (robfig/cron v1's ``Parse``) reads seconds first: five fields given there
    would be read one place off (``0 3 * * 1``: minute 3 of every hour, in January)."""
    return f"0 {expression}"


def schedule_name(project: str, kind: Kind) -> str:
    """``<project>-retrain`` / ``<project>-monitor``, shortened to what the Argo Server accepts."""
    return f"{project[: CRON_WORKFLOW_NAME_MAX - len(kind) - 1].rstrip('-')}-{kind}"


def _template_name(project: str, kind: Kind) -> str:
    # handoff_pipelines.argo names the training template after the project; monitor_pipeline adds -monitor.
    return project if kind == RETRAIN else f"{project}-monitor"


def cron_workflow(project: Project, kind: Kind, cron: str) -> dict[str, Any]:
    """The Argo CronWorkflow that runs the project's compiled WorkflowTemplate on ``cron``: the
    training pipeline (``retrain``), or the monitoring pipeline with retrain-on-drift (``monitor``)."""
    cron = check_cron(cron)
    settings = project.settings
    template = _template_name(settings.project, kind)
    pod_labels = labels(settings.project, None if kind == RETRAIN else "monitor")
    workflow_spec: dict[str, Any] = {"workflowTemplateRef": {"name": template}}
    if kind == RETRAIN:
        description = (
            f"Train {settings.project} on a schedule (handoff schedule): WorkflowTemplate {template}."
        )
    else:
        description = (
            f"Check {settings.project}'s traffic for drift on a schedule and start a training run on "
            f"drift (handoff schedule --on-drift): WorkflowTemplate {template}, retrain-on-drift true."
        )
        workflow_spec["arguments"] = {"parameters": [{"name": RETRAIN_PARAMETER["argo"], "value": "true"}]}
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {
            "name": schedule_name(settings.project, kind),
            "namespace": settings.namespace,
            "labels": pod_labels,
            "annotations": {"workflows.argoproj.io/description": description},
        },
        "spec": {
            "schedules": [cron],
            "timezone": TIMEZONE,
            # A run still going when the next is due (a long training, a slow check): skip the next.
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": STARTING_DEADLINE_S,
            "workflowMetadata": {"labels": dict(pod_labels)},  # a copy: no YAML anchors in the file
            "workflowSpec": workflow_spec,
        },
    }


def write_cron_workflow(project: Project, kind: Kind, cron: str, path: Path) -> Path:
    """The CronWorkflow as YAML, for ``kubectl apply`` or a kustomization (``handoff compile --cron``)."""
    header = (
        "# Runs the project's WorkflowTemplate on a schedule; generated by `handoff compile` from\n"
        "# handoff.yaml: do not edit. Apply it beside the WorkflowTemplate it references.\n"
    )
    path.write_text(header + yaml.safe_dump(cron_workflow(project, kind, cron), sort_keys=False))
    return path
