"""The ``handoff`` commands this package brings: run the pipeline here, compile it, submit it.

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
) -> None:
    """Compile for a cluster: the KFP pipeline (and its training job when training.nodes > 1) and/or
    the Argo WorkflowTemplate, each with its monitoring pipeline when monitoring.store is set."""
    from handoff_pipelines.compiled import compile_project

    written = compile_project(
        project, out, image=_checked_image(image), targets=_targets(target), monitor=monitor
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
