"""Thin KFP wrappers: each calls one handoff step and hands files on.

KFP ships each function's source to the task on its own, so every import sits inside the
function, and the annotations are real types (no ``from __future__ import annotations``). All
logic lives in the ``handoff`` library, which the project image already has installed.

Every step writes its result to a ``record`` artifact (JSON): later steps read what they need
from it and the local runner builds the run summary from it. The gate is evaluate's single
return value because conditions on single outputs are what every engine, kfp.local included,
resolves.
"""

from typing import Any

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Input, Markdown, Metrics, Model, Output


def train(project_dir: str, run_key: str, checkpoint: Output[Model], record: Output[Artifact]):
    """Train model.py's model (under torchrun when training.gpus > 1), or launch a multi-node job named
    after run_key; a retried attempt resumes from the state the run keyed by run_key stored
    (handoff.steps.train_launch)."""
    from handoff.step_entry import run_step
    from handoff.steps.train_launch import train_step as step

    run_step("train", step, record.path, project_dir=project_dir, checkpoint=checkpoint.path, run_key=run_key)


def export(project_dir: str, checkpoint: Input[Model], onnx_model: Output[Model], record: Output[Artifact]):
    """Export to one parity-checked ONNX file (handoff.steps.export)."""
    from handoff.step_entry import run_step
    from handoff.steps.export import export as step

    result = run_step(
        "export",
        step,
        record.path,
        project_dir=project_dir,
        checkpoint=checkpoint.path,
        model_dir=onnx_model.path,
    )
    onnx_model.metadata.update({"onnx_sha256": result.onnx_sha256, "opset": result.opset})


def optimize(
    project_dir: str, onnx_model: Input[Model], served_model: Output[Model], record: Output[Artifact]
):
    """Make the forms slo.optimize allows and keep the fastest that holds the contract
    (handoff.steps.optimize); served_model is laid out as export's folder, for the chosen form."""
    from handoff.step_entry import run_step
    from handoff.steps.optimize import optimize as step

    result = run_step(
        "optimize",
        step,
        record.path,
        project_dir=project_dir,
        model_dir=onnx_model.path,
        out_dir=served_model.path,
    )
    served_model.metadata.update({"onnx_sha256": result.onnx_sha256, "form": result.form})


def evaluate(
    project_dir: str,
    onnx_model: Input[Model],
    training: Input[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Artifact],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    record: Output[Artifact],
) -> bool:
    """Evaluate in ONNX Runtime, write the readiness report; returns whether the gate passed."""
    from handoff_pipelines.components import evaluated

    result = evaluated(project_dir, onnx_model, training, metrics, report, report_html, report_md, record)
    if result.confusion:  # the KFP UI draws it
        labels = [str(i) for i in range(len(result.confusion))]
        confusion.log_confusion_matrix(labels, result.confusion)
    return result.gate.passed


def evaluated(
    project_dir: str,
    onnx_model: Any,
    training: Any,
    metrics: Any,
    report: Any,
    report_html: Any,
    report_md: Any,
    record: Any,
) -> Any:
    """What every evaluate step does, whatever the task (imported by the step, not a step itself):
    run handoff's evaluate, log its metrics into ``metrics``, copy the report where the KFP UI
    shows it; the step's result."""
    import shutil
    from pathlib import Path

    from handoff.readiness import REPORT_HTML, REPORT_MD
    from handoff.step_entry import read_record, run_step
    from handoff.steps.evaluate import evaluate as step

    result = run_step(
        "evaluate",
        step,
        record.path,
        project_dir=project_dir,
        model_dir=onnx_model.path,
        report_dir=report.path,
        training_run_id=read_record(training.path)["mlflow_run_id"],
    )
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    metrics.log_metric("latency_p99_ms", result.latency_p99_ms)
    shutil.copyfile(Path(report.path) / REPORT_HTML, report_html.path)
    shutil.copyfile(Path(report.path) / REPORT_MD, report_md.path)
    return result


def register(
    project_dir: str,
    onnx_model: Input[Model],
    evaluation: Input[Artifact],
    report: Input[Artifact],
    training: Input[Artifact],
    record: Output[Artifact],
) -> bool:
    """Register in MLflow: challenger always, champion if the gate passed and nothing promoted
    another meanwhile (handoff.steps.register); returns whether it was promoted (deploy's condition)."""
    from handoff.step_entry import read_record, run_step
    from handoff.steps.register import register as step

    result = run_step(
        "register",
        step,
        record.path,
        project_dir=project_dir,
        model_dir=onnx_model.path,
        evaluation=read_record(evaluation.path),
        mlflow_run_id=read_record(training.path)["mlflow_run_id"],
        report_dir=report.path,
    )
    return result.promoted


def deploy(project_dir: str, registration: Input[Artifact], record: Output[Artifact]):
    """Serve the version register promoted and smoke-test it, unless a later run promoted another
    meanwhile (handoff.steps.deploy)."""
    from handoff.step_entry import read_record, run_step
    from handoff.steps.deploy import deploy as step

    registered = read_record(registration.path)
    run_step(
        "deploy",
        step,
        record.path,
        project_dir=project_dir,
        model_name=registered["model_name"],
        version=registered["version"],
        champion_only=True,
    )
