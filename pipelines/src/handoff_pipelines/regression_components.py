"""The step wrappers whose outputs differ for a regression contract (``task: regression``).

``build_pipeline`` takes these in place of ``handoff_pipelines.components``' for a regression
project: its evaluate step declares the metrics and a residual plot, and no
``ClassificationMetrics`` (there is no confusion matrix to draw). A function keeps its step's name,
because KFP names the component and its task after the function. The rules of ``components``
apply: imports inside the function, real annotations.
"""

from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output


def evaluate(
    project_dir: str,
    onnx_model: Input[Model],
    training: Input[Artifact],
    metrics: Output[Metrics],
    residuals: Output[HTML],
    report: Output[Artifact],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    record: Output[Artifact],
) -> bool:
    """Evaluate in ONNX Runtime, write the readiness report and the residual plot; returns whether
    the gate passed."""
    from pathlib import Path

    from handoff.residuals import RESIDUALS_PNG, residuals_html
    from handoff_pipelines.components import evaluated

    result = evaluated(project_dir, onnx_model, training, metrics, report, report_html, report_md, record)
    png = (Path(report.path) / RESIDUALS_PNG).read_bytes()
    Path(residuals.path).write_text(residuals_html(png, "residuals on the held-out split"), encoding="utf-8")
    return result.gate.passed
