"""The monitoring pipeline: ``handoff monitor`` as a pipeline step, for Kubeflow Pipelines and Argo.

One check of the served model's logged traffic against its registered reference profile
(``handoff.steps.monitor``): Evidently's report, the verdict, and the drift gauges pushed to
handoff.yaml's ``monitoring.pushgateway`` when it names one. The step reads the payload log at
handoff.yaml's ``monitoring.store``, which on a cluster must be an object-store URI: the pods
cannot read this machine's state folder (``check_monitor_target``). Pods, labels, service
account, secrets, tracking URI, image, retries and deadlines are set as the training pipeline
sets them (``graph.on_cluster``, ``handoff_pipelines.argo``).

Parameters, on both engines: the project's folder in the image, the ``version`` to check (empty:
the champion), ``since`` (the window, a duration or an ISO time; empty: the whole log),
``fail_on_drift`` (a drift verdict fails the run, so a scheduled run shows red; its report and
verdict are kept either way) and ``retrain_on_drift`` (default false: a drift verdict also starts
a training run of the project, through ``handoff submit``'s path; ``handoff schedule --on-drift``
sets it). The ``retrain`` step (``handoff_pipelines.retrain``) reads the verdict and submits the
training pipeline to the engine it runs on, at handoff.yaml's endpoint, with the token its pod
gets from ``cluster.secret_env`` (``KF_PIPELINES_TOKEN`` / ``ARGO_TOKEN``); it is never retried,
as a second attempt could start a second training run.

How a drifted run fails differs, because the engines keep different things of a failed task:

- KFP uploads no outputs of a failed task (its launcher registers only the executor's logs), so
  ``monitor`` never fails on drift: it writes the report (an HTML artifact the KFP UI shows), the
  verdict and its numbers (KFP Metrics); ``retrain`` reads the verdict next, then ``check-drift``
  reads it and fails when it is drift and ``fail_on_drift`` is set.
- Argo's wait container saves a step's output artifacts whatever its exit code, so its step is
  ``python -m handoff monitor``, the command a researcher runs by hand, which exits 1 on drift
  (``--no-fail-on-drift``: 0). It is retried only on an Argo error (an evicted or preempted pod),
  never on its own exit: a drift verdict is not a transient failure. With ``retrain-on-drift``,
  ``python -m handoff retrain`` runs after it whether it succeeded or failed (``depends``) and
  exits as monitor did (1 on drift with ``fail-on-drift``, 1 without a verdict): Argo takes a
  DAG's outcome from its last task, so the run still ends red on drift. Without it the step is
  skipped and monitor's outcome is the run's, as before.

Nothing is cached: every run reads a newer window of a log that keeps changing.

KFP reads the components' annotations at definition time, so this module keeps them as real types
(no ``from __future__ import annotations``).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hera.workflows import DAG, Container, NoneArchiveStrategy, Parameter, Task, WorkflowTemplate

# kfp's Artifact keeps its own name: KFP runs each step's source as written, with kfp.dsl's names.
from hera.workflows import Artifact as ArgoArtifact
from hera.workflows import models as m
from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from handoff import __version__
from handoff.errors import HandoffError
from handoff.kube.images import pull_policy
from handoff.labels import labels
from handoff.project import Project
from handoff.settings import PROJECT_DIR_IN_IMAGE, SETTINGS_FILE, ClusterSettings
from handoff_pipelines import PIPELINE_NAME
from handoff_pipelines.argo import (
    EXIT_HANDLER,
    IN,
    OUT,
    POD_GC,
    PROJECT_DIR,
    TTL,
    container_security,
    env,
    exit_handler,
    mounts,
    pod_security,
    resources,
)
from handoff_pipelines.graph import (
    RETRY_BACKOFF_FACTOR,
    RETRY_BACKOFF_S,
    TMP_VOLUME,
    StepPlan,
    component_maker,
    pod_placer,
)

MONITOR_PIPELINE_NAME = f"{PIPELINE_NAME}-monitor"
COMPONENT = "monitor"  # app.kubernetes.io/component of the monitoring pods: a selector tells them apart
STORE_FIELD = "monitoring.store"
# One attempt's deadline, and the window retries must start in: a check that has not finished in
# an hour is stuck, and the next scheduled run would start on top of it.
MONITOR_DEADLINE_S = 3600
# Each step as every engine runs it on a cluster. Monitor is safe to retry (it reads, writes its
# own outputs and sets gauges); check-drift is not: its failure is the verdict, and repeating it
# would only delay the red run. Neither is ever served from a cache (side_effects): monitor's
# inputs are the same every run while the log it reads is not.
# Retrain compiles and submits (kfp and hera in one process: 1Gi); never retried, as a second
# attempt could start a second training run.
MONITOR_PLAN = (
    StepPlan("monitor", (), "1", "4Gi", MONITOR_DEADLINE_S, side_effects=True, deadline_s=MONITOR_DEADLINE_S),
    StepPlan("retrain", ("monitor",), "500m", "1Gi", 0, side_effects=True, deadline_s=MONITOR_DEADLINE_S),
    StepPlan(
        "check-drift",
        ("monitor", "retrain"),
        "100m",
        "512Mi",
        0,
        side_effects=True,
        deadline_s=MONITOR_DEADLINE_S,
    ),
)
DEFAULT_SINCE = "24h"
# Argo: the workflow's parameters (KFP: the pipeline's, in snake_case), as the Argo UI offers them.
ARGO_PARAMETERS = (
    Parameter(name=PROJECT_DIR, value=PROJECT_DIR_IN_IMAGE, description="Where the project is in the image."),
    Parameter(name="version", value="", description="Registered version to check; empty: the champion."),
    Parameter(
        name="since",
        value=DEFAULT_SINCE,
        description="Only traffic this recent: a duration (30m, 24h, 7d) or an ISO time; empty: all of it.",
    ),
    Parameter(
        name="fail-on-drift",
        value="true",
        enum=["true", "false"],
        description="Whether a drift verdict fails the run (its report and verdict are kept either way).",
    ),
    Parameter(
        name="retrain-on-drift",
        value="false",
        enum=["true", "false"],
        description="Whether a drift verdict also starts a training run of the project (handoff retrain).",
    ),
)
MONITOR_OUT = f"{OUT}/monitor"  # --out: report.html, verdict.json, metrics.prom
RETRAIN_VERDICT = f"{IN}/verdict.json"  # the retrain step's copy of monitor's verdict
RETRAIN_OUT = f"{OUT}/retrain"  # the training pipeline it compiles (under /tmp: /app is read-only)
# Argo: retrain runs after monitor whatever monitor's exit (drift is exit 1), only when asked.
RETRAIN_DEPENDS = "monitor.Succeeded || monitor.Failed"
RETRAIN_WHEN = "{{workflow.parameters.retrain-on-drift}} == true"
# handoff.steps.monitor's REPORT_FILE and VERDICT_FILE, kept as literals so compiling does not import
# the step and what it needs (a test checks they agree). No report when the window had too few rows.
ARGO_OUTPUTS = (("report", "report.html", True), ("verdict", "verdict.json", False))
# The CLI flag fail-on-drift picks; an expression because a flag has no value to substitute.
FAIL_FLAG = "{{=workflow.parameters['fail-on-drift'] == 'true' ? '--fail-on-drift' : '--no-fail-on-drift'}}"


def check_monitor_target(project: Project) -> str:
    """The payload log the monitoring pods read; refused unless it is a store they can reach."""
    store = project.settings.monitoring.store
    if not store:
        problem = "is null, so the payload log is in this machine's state folder, which no pod can read"
    elif "://" not in store or store.startswith("file://"):
        problem = f"is {store}, a folder on one machine that no pod can read"
    else:
        return store
    raise HandoffError(
        f"{problem}: set it to the object-store URI the cluster's payload collector writes this model's "
        f"log to (e.g. s3://handoff-payloads/payloads/{project.contract.name}) to compile the "
        "monitoring pipeline",
        file=project.root / SETTINGS_FILE,
        field=STORE_FIELD,
    )


def monitor_description(contract_sha256: str) -> str:
    """What the compiled monitoring pipelines say they are (the contract's slo.drift sets the verdict)."""
    text = (
        "Check the served model's logged traffic for drift against its reference profile "
        f"(handoff monitor, ml-template {__version__})."
    )
    return text + (f" Contract sha256 {contract_sha256}." if contract_sha256 else "")


# --- Kubeflow Pipelines -------------------------------------------------------------------------


def monitor(
    project_dir: str,
    version: str,
    since: str,
    report: Output[HTML],
    verdict: Output[Artifact],
    metrics: Output[Metrics],
):
    """Compare the payload log's window with the version's reference (handoff.steps.monitor); never
    fails on drift, so KFP keeps the report, the verdict and its metrics (check-drift fails next)."""
    import html
    import shutil
    import tempfile
    from pathlib import Path

    from handoff.step_entry import run_step
    from handoff.steps.monitor import REPORT_FILE
    from handoff.steps.monitor import monitor as step

    out = Path(tempfile.mkdtemp(prefix="monitor-"))
    result = run_step(
        "monitor",
        step,
        verdict.path,
        project_dir=project_dir,
        out_dir=out,
        version=version or None,
        since=since or None,
    )
    if (out / REPORT_FILE).is_file():
        shutil.copyfile(out / REPORT_FILE, report.path)
    else:  # too few rows to test: the page says why, where the report would be
        said = html.escape("; ".join(result.reasons))
        Path(report.path).write_text(f"<!doctype html><p>{html.escape(result.status)}: {said}</p>\n")
    numbers = {
        "drift_detected": float(result.drift_detected),
        "drift_share": result.drift_share,
        "prediction_drift": None if result.prediction_drift is None else float(result.prediction_drift),
        "prediction_drift_score": result.prediction_drift_score,
        "window_rows": float(result.rows),
    }
    for name, value in numbers.items():
        if value is not None:  # no test ran (too few rows), or it could not score
            metrics.log_metric(name, value)
    verdict.metadata.update({"model": result.model, "version": result.version, "status": result.status})


def check_drift(verdict: Input[Artifact], fail_on_drift: bool):
    """Fail the run when monitor's verdict is drift and fail_on_drift is set; its own step because
    KFP drops a failed task's outputs, and the report must stay."""
    import json

    from handoff.step_entry import write_termination_message

    with open(verdict.path) as file:
        found = json.load(file)
    line = (
        f"handoff: monitor {found['model']} v{found['version']}: {found['status']} over {found['rows']} rows"
    )
    if found["reasons"]:
        line += ": " + "; ".join(found["reasons"])
    print(line, flush=True)
    if found["drift_detected"] and fail_on_drift:
        write_termination_message(line)  # what the failed task shows as its message
        raise SystemExit(1)


def retrain(project_dir: str, verdict: Input[Artifact], retrain_on_drift: bool):
    """Submit the training pipeline to this KFP when monitor's verdict is drift and retrain_on_drift
    is set: ``python -m handoff retrain``, the command the Argo step runs (handoff submit's path);
    before check-drift, which fails the run."""
    import subprocess
    import sys
    import tempfile

    if not retrain_on_drift:
        print("handoff: retrain: retrain_on_drift is false: nothing to submit", flush=True)
        return
    out = tempfile.mkdtemp(prefix="retrain-")  # the project folder is read-only in pods
    command = ["--project", project_dir, "--verdict", verdict.path, "--target", "kfp", "--out", out]
    # --no-fail-on-drift: check-drift fails the run next. An error is reported by the command
    # itself (its message is the pod's termination message).
    done = subprocess.run([sys.executable, "-m", "handoff", "retrain", *command, "--no-fail-on-drift"])
    if done.returncode:
        raise SystemExit(done.returncode)


def build_monitor_pipeline(
    image: str,
    contract_sha256: str = "",
    pod_labels: dict[str, str] | None = None,
    cluster: ClusterSettings | None = None,
) -> Callable[..., Any]:
    """The KFP monitoring pipeline for a project whose steps run in ``image``; ``cluster`` and
    ``pod_labels`` place its pods as ``graph.build_pipeline`` places the training pipeline's."""
    on_pods = pod_placer(MONITOR_PLAN, image, pod_labels, cluster)
    component = component_maker(image)
    monitor_op, retrain_op, check_op = component(monitor), component(retrain), component(check_drift)

    @dsl.pipeline(name=MONITOR_PIPELINE_NAME, description=monitor_description(contract_sha256))
    def handoff_monitor(
        project_dir: str,
        version: str = "",
        since: str = DEFAULT_SINCE,
        fail_on_drift: bool = True,
        retrain_on_drift: bool = False,
    ) -> None:
        monitored = on_pods(monitor_op(project_dir=project_dir, version=version, since=since), "monitor")
        verdict = monitored.outputs["verdict"]
        retrained = on_pods(
            retrain_op(project_dir=project_dir, verdict=verdict, retrain_on_drift=retrain_on_drift), "retrain"
        )
        # After retrain: check-drift's failure ends the run, and the training run must start first.
        checked = check_op(verdict=verdict, fail_on_drift=fail_on_drift).after(retrained)
        on_pods(checked, "check-drift")

    return handoff_monitor


def compile_monitor_kfp(project: Project, path: Path) -> Path:
    """The monitoring pipeline's KFP v2 IR; refused when the pods could not read the payload log."""
    check_monitor_target(project)
    compiler.Compiler().compile(
        build_monitor_pipeline(
            image=project.settings.image,
            contract_sha256=project.contract.sha256,
            pod_labels=labels(project.settings.project, COMPONENT),
            cluster=project.settings.cluster,
        ),
        str(path),
        pipeline_parameters={"project_dir": PROJECT_DIR_IN_IMAGE},
    )
    return path


# --- Argo Workflows -----------------------------------------------------------------------------


def monitor_arguments() -> list[str]:
    """``python -m handoff monitor``'s options (see ``handoff monitor --help``)."""
    parameter = "{{{{workflow.parameters.{}}}}}".format
    return [
        "--project",
        parameter(PROJECT_DIR),
        "--version",
        parameter("version"),
        "--since",
        parameter("since"),
        "--out",
        MONITOR_OUT,
        FAIL_FLAG,
    ]


def retrain_arguments() -> list[str]:
    """``python -m handoff retrain``'s options (see ``handoff retrain --help``)."""
    return [
        "--project",
        f"{{{{workflow.parameters.{PROJECT_DIR}}}}}",
        "--verdict",
        RETRAIN_VERDICT,
        "--target",
        "argo",
        "--out",
        RETRAIN_OUT,
        FAIL_FLAG,
    ]


def _container(project: Project, step: StepPlan, args: list[str], **extra: Any) -> Container:
    """One step of the monitoring workflow: ``python -m handoff <step>`` in the platform image,
    with the pipeline's environment, resources, security context and mounts."""
    settings = project.settings
    return Container(
        name=step.name,
        image=settings.image,
        image_pull_policy=pull_policy(settings.image),
        command=["python", "-m", "handoff", step.name],
        args=args,
        env=env(project),
        resources=resources(step.cpu, step.memory),
        security_context=container_security(),
        volume_mounts=mounts(step),
        active_deadline_seconds=step.deadline_s,
        **extra,
    )


def _retry_on_error(step: StepPlan, retries: int) -> m.RetryStrategy | None:
    """OnError: an evicted or preempted pod (an Argo error); never the step's own exit 1, the verdict."""
    if not retries:
        return None
    return m.RetryStrategy(
        limit=m.IntOrString(retries),
        retry_policy="OnError",
        backoff=m.Backoff(
            duration=f"{RETRY_BACKOFF_S}s",
            factor=m.IntOrString(RETRY_BACKOFF_FACTOR),
            max_duration=f"{step.retry_window_s}s",
        ),
    )


def monitor_workflow_template(project: Project) -> WorkflowTemplate:
    """The project's monitoring WorkflowTemplate, ``<project>-monitor``, in its namespace."""
    check_monitor_target(project)
    settings = project.settings
    step, retrain_step = MONITOR_PLAN[0], MONITOR_PLAN[1]
    with WorkflowTemplate(
        name=f"{settings.project}-monitor",
        namespace=settings.namespace,
        labels=labels(settings.project, COMPONENT),
        annotations={"workflows.argoproj.io/description": monitor_description(project.contract.sha256)},
        entrypoint=MONITOR_PIPELINE_NAME,
        on_exit=EXIT_HANDLER,
        service_account_name=settings.cluster.service_account,
        arguments=list(ARGO_PARAMETERS),
        pod_metadata=m.Metadata(labels=labels(settings.project, COMPONENT)),
        security_context=pod_security(),
        volumes=[m.Volume(name=TMP_VOLUME[0], empty_dir=m.EmptyDirVolumeSource())],
        active_deadline_seconds=settings.cluster.timeout_s,
        pod_gc=POD_GC,
        ttl_strategy=TTL,
    ) as template:
        with DAG(name=MONITOR_PIPELINE_NAME):
            Task(name=step.name, template=step.name)
            Task(
                name=retrain_step.name,
                template=retrain_step.name,
                depends=RETRAIN_DEPENDS,
                when=RETRAIN_WHEN,
                # Optional here too: a monitor that failed before writing its verdict leaves none,
                # and Argo resolves a missing argument artifact only when it is optional
                # (workflow/controller/dag.go, resolveDependencyReferences).
                arguments=[
                    m.Artifact(
                        name="verdict",
                        from_=f"{{{{tasks.{step.name}.outputs.artifacts.verdict}}}}",
                        optional=True,
                    )
                ],
            )
        _container(
            project,
            step,
            monitor_arguments(),
            retry_strategy=_retry_on_error(step, settings.cluster.retries),
            # Kept whatever the exit code; unarchived, so the Argo UI shows the report as a page.
            outputs=[
                ArgoArtifact(
                    name=name,
                    path=f"{MONITOR_OUT}/{file}",
                    archive=NoneArchiveStrategy(),
                    optional=optional or None,
                )
                for name, file, optional in ARGO_OUTPUTS
            ],
        )
        _container(
            project,
            retrain_step,
            retrain_arguments(),
            # Optional: monitor may fail before writing one; retrain then says so and exits 1.
            inputs=[ArgoArtifact(name="verdict", path=RETRAIN_VERDICT, optional=True)],
        )
        exit_handler(settings.image)
    return template


def compile_monitor_argo(project: Project, path: Path) -> Path:
    """The monitoring WorkflowTemplate as YAML; refused when the pods could not read the payload log."""
    header = (
        "# The project's monitoring WorkflowTemplate (`handoff monitor` as a pipeline step), generated by\n"
        "# `handoff compile` from handoff.yaml: do not edit. The report and verdict are output artifacts.\n"
    )
    path.write_text(header + yaml.safe_dump(monitor_workflow_template(project).to_dict(), sort_keys=False))
    return path
