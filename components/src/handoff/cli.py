"""The ``handoff`` command: check a project, run its pipeline, or run one step by hand.

User errors (``HandoffError``) print as one ``error:`` line and exit 1; step commands print
their result as JSON on stdout so scripts and orchestrators can read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

from handoff import __version__
from handoff.errors import HandoffError
from handoff.files import atomic_write_bytes
from handoff.step_entry import record_json, write_termination_message

app = typer.Typer(
    help="Take a model.py project from training to a served, smoke-tested model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ProjectOpt = Annotated[Path, typer.Option("--project", "-p", help="The project folder.", file_okay=False)]


def _print_record(result: Any) -> None:
    typer.echo(json.dumps(json.loads(record_json(result)), indent=2))


@contextlib.contextmanager
def _record_only_on_stdout() -> Iterator[None]:
    """A step's stdout is its record (JSON), for scripts that read it; what the step and its
    libraries print meanwhile (training progress, MLflow's run links) goes to stderr. Orchestrators
    read the record from the ``--record`` file instead, so stray output never reaches them."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _overrides(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise HandoffError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


@app.command()
def version() -> None:
    """Print the step library version (the template version it belongs to)."""
    typer.echo(__version__)


@app.command()
def check(project: ProjectOpt = Path(".")) -> None:
    """Check that model.py satisfies contract.yaml (hooks, shapes, overfit, ONNX round trip)."""
    from handoff.check import check as run_check

    report = run_check(project, progress=lambda name, detail: typer.echo(f"  ok  {name}: {detail}"))
    typer.echo(f"model.py satisfies the contract ({len(report.passed)} checks, {report.seconds:.1f} s)")


# Commands another distribution adds to this CLI: a Typer app it declares under this entry-point
# group, found at start-up (``add_commands``), so the step library never imports the package that
# has them. Until one is found, each name below stands in for its command: listed in --help, and
# saying which package brings it.
COMMANDS_GROUP = "handoff.commands"
PIPELINES_PACKAGE = "ml-handoff-pipelines"
ADDED_COMMANDS = {
    "run": "Run the whole pipeline: train, export, optimize, evaluate, register, deploy and smoke-test",
    "compile": "Compile the pipeline for a cluster: Kubeflow Pipelines and/or Argo Workflows",
    "submit": "Compile, then start a run on the cluster",
    "schedule": "Retrain on a schedule (KFP recurring run, Argo CronWorkflow) or on drift",
    "retrain": "Start a training run when a drift verdict says so",
}


# Distributions whose commands entry point failed to load -> why, so a stand-in does not call an
# installed but broken package "not installed".
_UNLOADED: dict[str, str] = {}


def _stand_in(name: str, summary: str, package: str = PIPELINES_PACKAGE) -> None:
    """``handoff NAME`` (whatever its arguments) fails with one line saying what to install."""

    def missing() -> None:
        if package in _UNLOADED:
            raise HandoffError(
                f"`handoff {name}` comes with the {package} package, which is installed but did not "
                f"load ({_UNLOADED[package]}): pip install --force-reinstall {package}"
            )
        raise HandoffError(
            f"`handoff {name}` comes with the {package} package, which is not installed: "
            f"pip install {package}"
        )

    settings = {"allow_extra_args": True, "ignore_unknown_options": True}
    app.command(name, help=f"{summary} (needs {package}).", context_settings=settings)(missing)


for _name, _summary in ADDED_COMMANDS.items():
    _stand_in(_name, _summary)


def add_commands(target: typer.Typer) -> None:
    """Add the commands the installed distributions declare under ``COMMANDS_GROUP`` (each entry
    point a ``typer.Typer``); they take the places of the stand-ins of the same names.

    One that fails to load is said on stderr and skipped: the step commands work whatever else is
    installed beside them. A command named like one of handoff's own is skipped with a warning,
    so no package can silently replace a step."""
    own = {_command_name(info) for info in target.registered_commands} - set(ADDED_COMMANDS)
    for entry in entry_points(group=COMMANDS_GROUP):
        package = entry.dist.name if entry.dist else "a package"
        where = f"{package}'s {COMMANDS_GROUP} entry point {entry.value}"
        try:
            commands = entry.load()
        except Exception as exc:  # noqa: BLE001 - another package's import error, of any type
            _UNLOADED[package] = f"{type(exc).__name__}: {exc}"
            typer.echo(f"warning: handoff: {where} did not load: {_UNLOADED[package]}", err=True)
            continue
        if not isinstance(commands, typer.Typer):
            typer.echo(f"warning: handoff: {where} is not a typer.Typer; skipped", err=True)
            continue
        if any(group.typer_instance is commands for group in target.registered_groups):
            continue
        clashes = sorted(own & {_command_name(info) for info in commands.registered_commands})
        if clashes:
            typer.echo(
                f"warning: handoff: {where} names handoff's own command(s) {', '.join(clashes)}; "
                "those are kept and its own skipped",
                err=True,
            )
            kept = typer.Typer()
            kept.registered_commands = [
                c for c in commands.registered_commands if _command_name(c) not in own
            ]
            kept.registered_groups = commands.registered_groups
            commands = kept
        target.add_typer(commands)  # no name: its commands join this app's


def _command_name(info: typer.models.CommandInfo) -> str:
    """The name a command is called by: its own, or its function's as Typer names it."""
    if info.name:
        return info.name
    return typer.main.get_command_name(info.callback.__name__) if info.callback else ""


@app.command()
def train(
    project: ProjectOpt = Path("."),
    checkpoint: Annotated[Path, typer.Option(help="Where to write the checkpoint.")] = Path("checkpoint.pt"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override FIELD=VALUE.")] = None,
    fresh: Annotated[
        bool, typer.Option(help="Ignore saved state in <checkpoint>.state/ and start over.")
    ] = False,
    record: Annotated[Path | None, typer.Option(help="Also write the result here (JSON).")] = None,
    run_key: Annotated[
        str,
        typer.Option(
            help="The pipeline run's id, the same for every attempt: state is also kept in the MLflow "
            "run tagged with it, and a retried step on a new machine resumes from there."
        ),
    ] = "",
) -> None:
    """Train model.py's model and write a checkpoint (resumes from <checkpoint>.state/); with
    training.gpus > 1, one process per GPU under torchrun."""
    from handoff.steps.train_launch import train_on_this_node as step

    with _record_only_on_stdout():
        result = step(project, checkpoint, run_key=run_key, overrides=_overrides(set_ or []), fresh=fresh)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one record, from rank 0
        if record:
            atomic_write_bytes(record, (record_json(result) + "\n").encode())
        _print_record(result)


@app.command()
def export(
    project: ProjectOpt = Path("."),
    checkpoint: Annotated[Path, typer.Option(exists=True, dir_okay=False)] = Path("checkpoint.pt"),
    out: Annotated[Path, typer.Option(help="Folder for model.onnx and example.json.")] = Path("onnx"),
) -> None:
    """Export a checkpoint to one self-contained ONNX file, parity-checked against torch."""
    from handoff.steps.export import export as step

    with _record_only_on_stdout():
        result = step(project, checkpoint, out)
    _print_record(result)


@app.command()
def optimize(
    project: ProjectOpt = Path("."),
    model_dir: Annotated[Path, typer.Option(exists=True, file_okay=False, help="What export wrote.")] = Path(
        "onnx"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the chosen form, laid out as export's.")] = Path(
        "optimized"
    ),
) -> None:
    """Serve the fastest form (graph-optimized, int8, fp16) that keeps the contract's slo.optimize."""
    from handoff.steps.optimize import optimize as step

    with _record_only_on_stdout():
        result = step(project, model_dir, out)
    _print_record(result)


@app.command()
def evaluate(
    project: ProjectOpt = Path("."),
    model_dir: Annotated[Path, typer.Option(exists=True, file_okay=False)] = Path("onnx"),
    out: Annotated[Path | None, typer.Option(help="Also write the result here (JSON).")] = None,
    report: Annotated[
        Path, typer.Option(help="Folder for the readiness report (Markdown, HTML, plots).", file_okay=False)
    ] = Path("report"),
    run_id: Annotated[str, typer.Option(help="MLflow run of the training (for curves, lineage).")] = "",
) -> None:
    """Evaluate the ONNX model on the held-out split, decide the gate, write the readiness report."""
    from handoff.steps.evaluate import evaluate as step

    with _record_only_on_stdout():
        result = step(project, model_dir, report_dir=report, training_run_id=run_id)
    if out:
        out.write_text(record_json(result))
    _print_record(result)


@app.command()
def register(
    project: ProjectOpt = Path("."),
    model_dir: Annotated[Path, typer.Option(exists=True, file_okay=False)] = Path("onnx"),
    evaluation: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="JSON written by `handoff evaluate --out`.")
    ] = Path("evaluation.json"),
    run_id: Annotated[str, typer.Option(help="MLflow run of the training.")] = "",
    report: Annotated[
        Path | None, typer.Option(help="Readiness report folder from `handoff evaluate`.", file_okay=False)
    ] = None,
    record: Annotated[
        Path | None, typer.Option(help="Also write the result here (JSON; what Argo hands to deploy).")
    ] = None,
) -> None:
    """Register the ONNX model in MLflow; alias champion only if the gate passed."""
    from handoff.steps.register import register as step

    with _record_only_on_stdout():
        result = step(project, model_dir, json.loads(evaluation.read_text()), run_id, report)
    if record:
        atomic_write_bytes(record, (record_json(result) + "\n").encode())
    _print_record(result)


@app.command()
def deploy(
    project: ProjectOpt = Path("."),
    version: Annotated[str, typer.Option(help="Registered version, or an alias.")] = "champion",
    cluster: Annotated[
        bool | None,
        typer.Option(
            "--cluster/--local",
            help="Roll out to the project's KServe InferenceService (canary, smoke test, rollback), or "
            "serve on this machine. Default: the cluster when running in a pod, else this machine.",
        ),
    ] = None,
    champion_only: Annotated[
        bool,
        typer.Option(
            "--champion-only",
            help="Refuse unless the version is the champion (what pipelines deploy: the version their "
            "register promoted, unless a later run promoted another since).",
        ),
    ] = False,
) -> None:
    """Serve a registered version (locally, or on the cluster with KServe) and smoke-test it."""

    from handoff.project import Project
    from handoff.steps.deploy import deploy as step
    from handoff.tracking import alias_version, use_tracking

    loaded = Project.load(project)
    name = loaded.contract.name
    if not version.isdigit():
        found = alias_version(use_tracking(loaded), name, version)
        if found is None:
            raise HandoffError(
                f"model {name!r} has no version with alias {version!r} in the registry "
                f"({loaded.tracking_uri})"
            )
        version = found
    with _record_only_on_stdout():
        result = step(project, name, version, cluster=cluster, champion_only=champion_only)
    _print_record(result)


@app.command()
def rollback(
    project: ProjectOpt = Path("."),
    to: Annotated[
        str | None, typer.Option("--to", help="Version to return to (default: the one champion replaced).")
    ] = None,
) -> None:
    """Point champion back at the previous champion and serve it locally (smoke-tested)."""
    from handoff.steps.rollback import rollback as step

    result = step(project, to)
    typer.echo(
        f"rolled back {result.model_name}: champion v{result.from_version} -> v{result.to_version}, "
        f"serving at {result.deployed.url} (smoke test passed)"
    )


@app.command()
def doctor(
    project: ProjectOpt = Path("."),
    argo_config: Annotated[
        str, typer.Option(help="NAMESPACE/NAME of the Argo workflow controller's ConfigMap.")
    ] = "argo/workflow-controller-configmap",
    kfp_namespace: Annotated[
        str, typer.Option(help="Where KFP is installed (its API server and its Argo controller's ConfigMap).")
    ] = "kubeflow",
) -> None:
    """Check what a cluster run needs, before one: API server, namespace, CRDs, the pipeline
    account's access, GPUs, Argo's executor security context, artifact stores, KFP's mode, image,
    MLflow, and the KFP / Argo servers. Exits 1 when a check fails."""
    from handoff.doctor import run_doctor
    from handoff.doctor_engines import Locations
    from handoff.project import Project

    namespace, _, name = argo_config.partition("/")
    if not namespace or not name or "/" in name:
        raise HandoffError(f"--argo-config {argo_config!r}: expected NAMESPACE/NAME of a ConfigMap")
    where = Locations(argo_config=(namespace, name), kfp_namespace=kfp_namespace)
    findings = run_doctor(Project.load(project), where=where)
    for finding in findings:
        typer.echo(f"{finding.outcome.upper():5} {finding.check}: {finding.detail}")
    failed = [f for f in findings if f.outcome == "fail"]
    skipped = [f for f in findings if f.outcome == "skip"]
    typer.echo(
        f"doctor: {len(findings) - len(failed) - len(skipped)} passed, {len(skipped)} skipped, "
        f"{len(failed)} failed"
    )
    if failed:
        raise typer.Exit(1)


@app.command()
def upgrade(
    project: ProjectOpt = Path("."),
    to: Annotated[
        str | None, typer.Option("--to", help="The release to move to, vX.Y.Z (default: the newest).")
    ] = None,
    check_only: Annotated[
        bool,
        typer.Option(
            "--check", help="Only say whether a newer release exists (exit 1 if so) and what it changes."
        ),
    ] = False,
    abort: Annotated[bool, typer.Option("--abort", help="Undo the upgrade in progress.")] = False,
) -> None:
    """Move the project to a newer release of its template: cruft's merge, the release's migrations,
    then `handoff check`. Exits 1 listing each conflict; run it again once they are resolved."""
    from handoff import upgrade as upgrading
    from handoff.template_releases import parse_version

    if check_only + abort + (to is not None) > 1:
        raise HandoffError("give at most one of --check, --abort and --to")
    if check_only:
        if upgrading.check_for_release(project, typer.echo):
            raise typer.Exit(1)
        return
    if abort:
        upgrading.abort(project, typer.echo)
        return
    outcome = upgrading.upgrade(project, to, typer.echo)
    if not outcome.finished:
        raise typer.Exit(1)
    if not outcome.changed:
        return
    installed, pinned = parse_version(__version__), parse_version(outcome.target)
    try:
        check(project)
    except HandoffError as exc:
        if installed and pinned and installed < pinned:
            # The check ran with the previous release's step library: what it refuses may be what
            # the release changed. The upgrade is done; the check belongs to the new pins.
            upgrading.finish(project, outcome, typer.echo, checked=False)
            raise HandoffError(
                f"the upgrade to {outcome.target} is applied, but handoff check fails with the ml-handoff "
                f"installed here ({__version__}; the project now pins {outcome.target}): run `make setup`, "
                f"then `make check`. It said: {exc}"
            ) from exc
        raise HandoffError(
            f"after the upgrade to {outcome.target}, handoff check fails: {exc}. Fix it, then run "
            "`handoff upgrade` again to finish (or `handoff upgrade --abort`)"
        ) from exc
    upgrading.finish(project, outcome, typer.echo)


@app.command()
def monitor(
    project: ProjectOpt = Path("."),
    version: Annotated[
        str | None,
        typer.Option(
            help="Registered version, or an alias (default: the one served here, else the champion)."
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="The payload log (a folder or s3://...; default: handoff.yaml's monitoring.store, "
            "else the local server's)."
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only rows this recent: a duration (30m, 24h, 7d) or an ISO time.")
    ] = None,
    last_rows: Annotated[
        int | None, typer.Option(min=1, help="Only the newest N logged rows (default 50000).")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for report.html, verdict.json and metrics.prom.", file_okay=False)
    ] = Path("monitor"),
    pushgateway: Annotated[
        str | None, typer.Option(help="Also push the drift gauges to this Prometheus Pushgateway.")
    ] = None,
    fail_on_drift: Annotated[
        bool,
        typer.Option(
            "--fail-on-drift/--no-fail-on-drift",
            help="Exit 1 on a drift verdict (default), or 0; the report and verdict are written either way.",
        ),
    ] = True,
) -> None:
    """Compare logged traffic with the served version's reference profile (Evidently); exit 1 on drift."""
    from handoff.project import Project
    from handoff.steps.monitor import monitor as step
    from handoff.tracking import alias_version, use_tracking

    version = version or None  # empty, as a pipeline passes it: the default
    if version is not None and not version.isdigit():
        loaded = Project.load(project)
        found = alias_version(use_tracking(loaded), loaded.contract.name, version)
        if found is None:
            raise HandoffError(f"model {loaded.contract.name!r} has no version with alias {version!r}")
        version = found
    with _record_only_on_stdout():
        verdict = step(
            project,
            out,
            version=version,
            store=store,
            since=since,
            last_rows=last_rows,
            pushgateway=pushgateway,
        )
    _print_record(verdict)
    said = (
        "; ".join(verdict.reasons)
        or f"no input column set off slo.drift (drift share {verdict.drift_share:.0%})"
    )
    line = f"handoff: monitor {verdict.model} v{verdict.version}: {verdict.status} over {verdict.rows} rows"
    line += f": {said}"
    typer.echo(line, err=True)
    if verdict.report:
        typer.echo(f"handoff: monitor: report at {verdict.report}", err=True)
    if verdict.drift_detected and fail_on_drift:
        write_termination_message(line)  # the failed pod's message (the Argo UI, kubectl describe)
        raise typer.Exit(1)


@app.command("monitoring-config")
def monitoring_config(
    project: ProjectOpt = Path("."),
    out: Annotated[Path, typer.Option(help="Folder to write the files into.", file_okay=False)] = Path(
        "monitoring"
    ),
) -> None:
    """Write the project's Prometheus alert rules (and PrometheusRule, PodMonitor) and Grafana
    dashboard, generated from contract.yaml's SLOs and handoff.yaml."""
    from handoff.monitoring_config import write_monitoring
    from handoff.project import Project

    for path in write_monitoring(Project.load(project), out):
        typer.echo(f"wrote {path}")


@app.command()
def collect(
    project: ProjectOpt = Path("."),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port KServe's logger posts to.")] = 8080,
) -> None:
    """Receive KServe's logger events (request and response pairs) and write them to the payload log
    (handoff.yaml's monitoring.store), as the local model server writes its own."""
    from handoff.payload_collector import serve_collector

    serve_collector(project, host, port)


@app.command()
def stop(project: ProjectOpt = Path(".")) -> None:
    """Stop the project's local model server (and an A/B test's servers)."""
    from handoff.ab import stop_servers
    from handoff.project import Project
    from handoff.serving import local_server

    loaded = Project.load(project)
    with local_server.deploy_lock(loaded.state_dir):  # never in the middle of a deploy's stop/start
        handle = local_server.stop(loaded.state_dir, project=loaded.root)
        ab = stop_servers(loaded)
    if ab is not None:
        typer.echo(f"stopped the A/B test of {ab.model_name} v{ab.champion} vs v{ab.challenger} at {ab.url}")
    elif handle:
        typer.echo(f"stopped {handle.model_name} v{handle.version} at {handle.url}")
    else:
        typer.echo("no local model server is running for this project")


ab_app = typer.Typer(
    help="A/B test a registered challenger against the champion on live traffic, to a verdict.",
    no_args_is_help=True,
)
app.add_typer(ab_app, name="ab")


@ab_app.command("start")
def ab_start(
    challenger: Annotated[str, typer.Option(help="The registered version to test against the champion.")],
    project: ProjectOpt = Path("."),
    share: Annotated[int, typer.Option(help="Percent of the traffic the challenger gets (1-99).")] = 50,
    key_header: Annotated[
        str | None,
        typer.Option(
            help="Request header whose value picks the arm (e.g. a user id): a caller sticks to one arm. "
            "Default: the V2 request id."
        ),
    ] = None,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster/--local",
            help="A KServe InferenceGraph Splitter over two InferenceServices, or the local router "
            "in front of two model servers on the project's port.",
        ),
    ] = False,
) -> None:
    """Serve the champion and a challenger side by side, each request to one arm by a stable hash."""
    from handoff.ab import start

    ab = start(project, challenger, share=share, key_header=key_header, cluster=cluster)
    typer.echo(
        f"A/B test started at {ab.url}: champion v{ab.champion} {100 - ab.share}%, challenger "
        f"v{ab.challenger} {ab.share}%; report outcomes to /v2/models/{ab.model_name}/feedback, "
        "then `handoff ab status`"
    )


@ab_app.command("status")
def ab_status(
    project: ProjectOpt = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="The whole status as JSON.")] = False,
) -> None:
    """Each arm's requests, errors, latency and metrics from feedback, and the verdict."""
    from handoff.ab import format_status, status

    found = status(project)
    typer.echo(json.dumps(found, indent=2, default=str) if as_json else format_status(found))


@ab_app.command("stop")
def ab_stop(
    project: ProjectOpt = Path("."),
    promote: Annotated[
        bool | None,
        typer.Option(
            "--promote/--rollback",
            help="Make the challenger champion and serve it alone, or keep the champion alone.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Promote even when the verdict is not 'challenger better'.")
    ] = False,
) -> None:
    """End the A/B test: --promote (on a 'challenger better' verdict) or --rollback."""
    from handoff.ab import stop as stop_ab

    if promote is None:
        raise HandoffError(
            "say how the test ends: `handoff ab stop --promote` or `handoff ab stop --rollback`"
        )
    typer.echo(stop_ab(project, promote=promote, force=force))


def main() -> None:
    try:
        add_commands(app)
        app()
    except HandoffError as exc:
        typer.echo(f"error: {exc}", err=True)
        write_termination_message(str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
