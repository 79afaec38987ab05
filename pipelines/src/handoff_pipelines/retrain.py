"""Start a training run when a drift verdict says so: the monitoring pipeline's ``retrain`` step.

``handoff monitor`` writes its verdict (``verdict.json``: model, version, status, drift_detected,
rows, reasons). When the verdict is drift, ``retrain`` submits the project's training pipeline
exactly as ``handoff submit`` does (``handoff_pipelines.submit.submit_project``: compile, then the
Kubeflow Pipelines API and/or the Argo Server at handoff.yaml's ``cluster`` endpoints, tokens from
``KF_PIPELINES_TOKEN`` / ``ARGO_TOKEN``); otherwise it submits nothing and says why.

In a pod the project folder is the image's read-only ``/app``: the compiled files go to
``out_dir`` under ``/tmp``, and the training pipeline is compiled for the image the step runs in
(``HANDOFF_IMAGE``, which every pipeline step gets), so a drift-started run trains with the very
build that is monitoring, not the tag written in the image's handoff.yaml.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from handoff.errors import HandoffError
from handoff.project import Project
from handoff.registry import record_retrain, retrain_requested
from handoff.settings import IMAGE_ENV
from handoff.tracking import use_tracking
from handoff_pipelines.submit import Submitted, submit_project

DRIFT = "drift"
DEFAULT_COOLDOWN_HOURS = 24.0
VERDICT_FIELDS = ("model", "version", "status", "drift_detected", "rows", "reasons")


@dataclass(frozen=True)
class Retrained:
    """What a verdict led to: its one-line summary and the runs started (none unless drift)."""

    model: str
    version: str
    status: str
    drift_detected: bool
    line: str
    submitted: list[Submitted] = field(default_factory=list)
    skipped: bool = False  # drift, but a run was started for it within the cooldown


def read_verdict(path: Path | str) -> dict[str, Any]:
    """``handoff monitor``'s verdict; a missing file means monitor failed before it decided."""
    file = Path(path)
    if not file.is_file():
        raise HandoffError(
            f"no verdict at {file}: `handoff monitor` failed before writing one (see its log)",
            field="verdict",
        )
    try:
        found = json.loads(file.read_text())
    except ValueError as exc:
        raise HandoffError(f"not JSON: {exc}", file=file) from None
    missing = [name for name in VERDICT_FIELDS if not isinstance(found, dict) or name not in found]
    if missing:
        raise HandoffError(
            f"expected the verdict `handoff monitor` writes, with {', '.join(VERDICT_FIELDS)}; "
            f"missing {', '.join(missing)}",
            file=file,
        )
    return found


def summary(verdict: dict[str, Any]) -> str:
    """``handoff: retrain: <model> v<version>: <status> over <rows> rows[: reasons]``."""
    line = (
        f"handoff: retrain: {verdict['model']} v{verdict['version']}: "
        f"{verdict['status']} over {verdict['rows']} rows"
    )
    return line + (": " + "; ".join(verdict["reasons"]) if verdict["reasons"] else "")


def retrain(
    project_dir: Path | str,
    verdict_path: Path | str,
    out_dir: Path | str,
    targets: tuple[str, ...] | None = None,
    image: str | None = None,
    cooldown_hours: float = DEFAULT_COOLDOWN_HOURS,
) -> Retrained:
    """Submit the training pipeline when the verdict at ``verdict_path`` is drift; else nothing.

    One drift starts one run: the drifted version's ``handoff.retrain.requested`` tag records
    when a run was started for it, and for ``cooldown_hours`` after that a drift verdict on the
    same version starts none (the run it started may still be training, or its model failed the
    gates: starting one every hour would not help). A new champion is a new version, so its own
    drift starts a run at once.

    ``targets`` defaults to handoff.yaml's orchestrator (a pipeline step names its own engine);
    ``image`` to the image this step runs in (``HANDOFF_IMAGE``), else handoff.yaml's.
    """
    verdict = read_verdict(verdict_path)
    line = summary(verdict)
    model, version = str(verdict["model"]), str(verdict["version"])
    drifted = bool(verdict["drift_detected"]) and verdict["status"] == DRIFT
    submitted: list[Submitted] = []
    if drifted:
        client = use_tracking(Project.load(project_dir))
        now = datetime.now(UTC)
        earlier = retrain_requested(client, model, version)
        if earlier is not None and now - earlier[0] < timedelta(hours=cooldown_hours):
            line += (
                f"; a training run was started for this drift at {earlier[0].isoformat(timespec='seconds')} "
                f"({earlier[1]}): none again within {cooldown_hours:g} h of it (--cooldown-hours)"
            )
            return Retrained(model, version, str(verdict["status"]), drifted, line, [], skipped=True)
        submitted = submit_project(
            project_dir, out_dir, image=image or os.environ.get(IMAGE_ENV) or None, targets=targets
        )
        runs = ", ".join(f"{run.target} run {run.name}" for run in submitted)
        if not record_retrain(client, model, version, runs, now):
            line += f"; the registry holds no {model} v{version}: the next drift verdict retrains again"
    return Retrained(model, version, str(verdict["status"]), drifted, line, submitted)
