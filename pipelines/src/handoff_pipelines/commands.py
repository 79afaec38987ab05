"""The ``handoff`` commands this package brings: run the pipeline here, compile it, submit it,
schedule it, and retrain on a drift verdict.

The step library's CLI (``handoff.cli``) finds this Typer app at start-up through the
``handoff.commands`` entry point declared in this package's pyproject.toml, and adds its commands
beside the steps' own, so ``ml-handoff`` never imports this package. Without it installed, the same
commands say which package brings them. The pipeline code itself (kfp, hera) is imported only when
a command runs: every ``handoff`` invocation, a step's included, loads this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from handoff.cli import ProjectOpt
from handoff.errors import HandoffError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

ImageOpt = Annotated[
    str | None,
    typer.Option(help="Image the steps run in, instead of handoff.yaml's (e.g. REPOSITORY@sha256:…)."),
]
TargetOpt = Annotated[
    Literal["kfp", "argo", "all"] | None,
    typer.Option(help="Kubeflow Pipelines, Argo Workflows or both (default: handoff.yaml's orchestrator)."),
]
OutOpt = Annotated[Path, typer.Option(help="Folder for the compiled files.", file_okay=False)]
MonitorOpt = Annotated[
    bool | None,
    typer.Option(
        "--monitor/--no-monitor",
        help="Also the monitoring pipeline (handoff monitor as a step), or not (default: when "
        "handoff.yaml's monitoring.store is an object-store URI the pods can read).",
        show_default=False,
    ),
]


@app.command()
def run(
    project: ProjectOpt = Path("."),
    local: Annotated[bool, typer.Option("--local", help="Run with kfp.local on this machine.")] = False,
    fork_server: Annotated[
        bool, typer.Option(help="Start local steps as forks of a warm process (imports paid once).")
    ] = True,
) -> None:
    """Run the whole pipeline: train, export, optimize, evaluate, register, deploy and smoke-test."""
    if not local:
        raise HandoffError("only local runs are available in this version: use `handoff run --local`")
    from handoff_pipelines.local import run_local
    from handoff_pipelines.summary import format_summary

    summary = run_local(project, fork_server=fork_server)
    typer.echo(format_summary(summary))
    if summary["status"] != "succeeded":
        raise typer.Exit(1)


def _checked_image(image: str | None) -> str | None:
    from handoff.kube.images import is_image_reference

    if image is not None and not is_image_reference(image):
        raise HandoffError(
            "--image expects an image reference, [REGISTRY/]NAME[:TAG][@sha256:DIGEST] with a lowercase "
            f"NAME, e.g. registry.example.com/ml/my-model@sha256:<64 hex digits>; got {image!r}"
        )
    return image


def _targets(target: str | None) -> tuple[str, ...] | None:
    from handoff_pipelines.compiled import TARGETS

    return None if target is None else TARGETS if target == "all" else (target,)


@app.command(name="compile")
def compile_(
    project: ProjectOpt = Path("."),
    out: OutOpt = Path("compiled"),
    image: ImageOpt = None,
    target: TargetOpt = None,
    monitor: MonitorOpt = None,
    cron: Annotated[
        str | None,
        typer.Option(help='Also the Argo CronWorkflow that trains on this schedule, e.g. "0 3 * * 1" (UTC).'),
    ] = None,
    on_drift_cron: Annotated[
        str | None,
        typer.Option(
            help="Also the Argo CronWorkflow that runs the monitoring pipeline with retrain-on-drift on "
            'this schedule, e.g. "0 * * * *" (UTC).'
        ),
    ] = None,
) -> None:
    """Compile for a cluster: the KFP pipeline (and its training job when training.nodes > 1) and/or
    the Argo WorkflowTemplate, each with its monitoring pipeline when monitoring.store is set."""
    from handoff_pipelines.compiled import compile_project

    written = compile_project(
        project,
        out,
        image=_checked_image(image),
        targets=_targets(target),
        monitor=monitor,
        cron=cron,
        on_drift_cron=on_drift_cron,
    )
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def submit(
    project: ProjectOpt = Path("."),
    out: OutOpt = Path("compiled"),
    image: ImageOpt = None,
    target: TargetOpt = None,
) -> None:
    """Compile, then start a run on the cluster: Kubeflow Pipelines (cluster.kfp_endpoint, token in
    $KF_PIPELINES_TOKEN) and/or Argo Workflows (cluster.argo_server, token in $ARGO_TOKEN)."""
    from handoff_pipelines.submit import submit_project

    for run in submit_project(project, out, image=_checked_image(image), targets=_targets(target)):
        typer.echo(f"submitted {run.target} run {run.name} ({run.id}): {run.url}")


@app.command()
def schedule(
    project: ProjectOpt = Path("."),
    cron: Annotated[
        str | None,
        typer.Option(
            help='When, in UTC: 5 cron fields, e.g. "0 3 * * 1" (Mondays 03:00); with --on-drift the '
            'default is "0 * * * *" (hourly).'
        ),
    ] = None,
    on_drift: Annotated[
        bool,
        typer.Option(
            "--on-drift",
            help="Schedule the monitoring pipeline instead, with retrain_on_drift: a drift verdict "
            "starts a training run (needs monitoring.store).",
        ),
    ] = False,
    remove: Annotated[
        bool, typer.Option("--remove", help="Delete the schedule instead (nothing to delete is no error).")
    ] = False,
    out: OutOpt = Path("compiled"),
    image: ImageOpt = None,
    target: TargetOpt = None,
) -> None:
    """Compile, then run the training pipeline on a schedule (<project>-retrain), or with --on-drift
    the monitoring pipeline (<project>-monitor): a KFP recurring run and/or an Argo CronWorkflow,
    replacing the earlier one of the same name."""
    from handoff_pipelines.schedule import schedule_project, unschedule_project

    if remove:
        for engine, name, count in unschedule_project(project, on_drift=on_drift, targets=_targets(target)):
            typer.echo(
                f"removed {engine} schedule {name}" if count else f"no {engine} schedule {name} to remove"
            )
        return
    for made in schedule_project(
        project, out, cron, on_drift=on_drift, image=_checked_image(image), targets=_targets(target)
    ):
        what = "recurring run" if made.target == "kfp" else "CronWorkflow"
        replaced = f", replacing {made.replaced} earlier" if made.replaced else ""
        typer.echo(
            f"scheduled {made.target} {what} {made.name} ({made.id}) at {made.cron!r}{replaced}: {made.url}"
        )


@app.command()
def retrain(
    verdict: Annotated[
        Path, typer.Option(help="The verdict `handoff monitor` wrote (verdict.json).", dir_okay=False)
    ],
    project: ProjectOpt = Path("."),
    out: OutOpt = Path("compiled"),
    image: ImageOpt = None,
    target: TargetOpt = None,
    fail_on_drift: Annotated[
        bool,
        typer.Option(
            "--fail-on-drift/--no-fail-on-drift",
            help="After submitting on a drift verdict, exit 1 (as `handoff monitor` does), or 0.",
        ),
    ] = False,
    cooldown_hours: Annotated[
        float,
        typer.Option(
            min=0,
            help="Start no run for a version whose drift started one less than this long ago (0: always).",
        ),
    ] = 24.0,
) -> None:
    """Submit the training pipeline (as `handoff submit`) when the verdict is drift; else nothing."""
    from handoff.step_entry import write_termination_message
    from handoff_pipelines.retrain import retrain as start

    done = start(
        project,
        verdict,
        out,
        targets=_targets(target),
        image=_checked_image(image),
        cooldown_hours=cooldown_hours,
    )
    typer.echo(done.line, err=True)
    for run in done.submitted:
        typer.echo(f"submitted {run.target} run {run.name} ({run.id}): {run.url}")
    if not done.drift_detected:
        typer.echo("handoff: retrain: no drift: nothing submitted", err=True)
    elif fail_on_drift:
        write_termination_message(done.line)  # the failed pod's message (the Argo UI, kubectl describe)
        raise typer.Exit(1)
