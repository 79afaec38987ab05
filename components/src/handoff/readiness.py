"""The readiness checklist: what "done" means for a model, item by item, with the evidence.

Evaluation assesses it and writes the report (Markdown, self-contained HTML with the plots
embedded, and the PNGs); registration attaches it to the version. The gate items are read from
the gate itself, and "Contract satisfied" from the contract checks that ran on this model.onnx
(``CONTRACT_CHECKS``), which the gate's contract check reads too (``contract_gate``): the report can
never say something the pipeline did not check or act on.
The serving checks (the model server's request guards, deploy's smoke test) run after this
report, at deploy, and gate the rollout there.
"""

from __future__ import annotations

import base64
import html
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from handoff import __version__
from handoff.artifacts import EXPORT_RECORD_FILE
from handoff.contract import Contract, TensorSpec
from handoff.errors import HandoffError
from handoff.gates import LATENCY_CHECK, Gate, GateCheck, contract_check
from handoff.hooks import (
    build_optimizer,
    call_hook,
    hook_batch,
    model_outputs,
    split_batch,
    user_code,
)
from handoff.lineage import git_sha
from handoff.model_card import project_card_problems
from handoff.onnx_io import check_arrays
from handoff.project import Project
from handoff.raw_io import has_raw_hooks
from handoff.runtime import seed_everything

REPORT_MD = "readiness.md"
REPORT_HTML = "readiness.html"
CONFUSION_PNG = "confusion_matrix.png"
LATENCY_PNG = "latency_histogram.png"
CURVES_PNG = "training_curves.png"
FORMS_PNG = "optimized_forms.png"


@dataclass(frozen=True)
class ReadinessItem:
    name: str
    passed: bool
    evidence: str


# The contract checks "Contract satisfied" and the gate's contract check stand on, each over what
# will be served (model.onnx in ONNX Runtime). Export checks the example at two batch sizes and at a
# second size of every dynamic axis (outputs' count, dtypes and shapes, the batch as every output's
# first axis, parity) and writes its record only when they pass. Evaluate checks every held-out
# batch's inputs as it reads them and stops on the first that breaks the contract (bad data is an
# error, not a verdict: ``check_arrays`` raises), and every batch's outputs through ``ContractWatch``,
# which records rather than raises, so a model whose outputs break the contract fails its gate.
EXPORT_CHECKS = "export"
HELDOUT_INPUTS = "held-out inputs"
HELDOUT_OUTPUTS = "held-out outputs"
MONITORING_ITEM = "Monitoring configured"
CONTRACT_CHECKS = (EXPORT_CHECKS, HELDOUT_INPUTS, HELDOUT_OUTPUTS)

Outcome = Literal["passed", "failed", "not run"]


@dataclass(frozen=True)
class ContractCheck:
    """One contract check as this evaluation knows it: its outcome and what it saw (or why not)."""

    name: str
    outcome: Outcome
    detail: str

    def sentence(self) -> str:
        """How the report and the gate say it: what it saw, or its outcome in capitals and why."""
        if self.outcome == "passed":
            return f"{self.name}: {self.detail}"
        return f"{self.name} {self.outcome.upper()}: {self.detail}"


def heldout_inputs_check(items: int) -> ContractCheck:
    """The held-out inputs' check, for an evaluation that scored ``items`` items: evaluate checks
    each batch's inputs (count, dtypes, shapes, ranges) as it reads it and raises on the first that
    breaks the contract, so having scored them means they all passed. There is no failed outcome."""
    return ContractCheck(
        HELDOUT_INPUTS, "passed", f"{items} items: count, dtypes, shapes and ranges as declared"
    )


@dataclass
class ContractWatch:
    """An ONNX Runtime session that checks what every run gives back against contract.yaml and
    records, rather than raises, what does not conform: evaluate scores the held-out split through
    it, and "Contract satisfied" and the gate's contract check report what it saw (``checks``).

    It keeps counts and the first failure only (never the arrays), so it costs nothing per item
    held; the latency measurement uses the bare session, unwatched. The inputs are not checked
    here: evaluate checks them once, as it reads them (``heldout_inputs_check``).
    """

    session: Any  # onnxruntime.InferenceSession, or anything with its ``run``
    contract: Contract
    batches: int = 0
    rows: int = 0
    failing: int = 0  # batches whose outputs break the contract
    first_failure: str = ""

    def run(self, output_names: Sequence[str], input_feed: dict[str, Any], run_options: Any = None) -> Any:
        """``InferenceSession.run``, with what came out checked."""
        first = np.asarray(input_feed[self.contract.input_names[0]])
        rows = int(first.shape[0]) if first.ndim else 0
        got = self.session.run(output_names, input_feed, run_options)
        by_name = {spec.name: spec for spec in self.contract.outputs}
        unknown = [name for name in output_names if name not in by_name]
        if unknown:
            problem: str | None = f"outputs {unknown} are not in contract.yaml"
        else:
            problem = _conforms([by_name[name] for name in output_names], got, rows)
        self.batches += 1
        self.rows += rows
        if problem is not None:
            self.failing += 1
            self.first_failure = self.first_failure or problem
        return got

    def checks(self) -> tuple[ContractCheck, ...]:
        """The held-out outputs' check as the runs so far went; none before the first run (and
        ``contract_checks`` reports a check with no evidence as not run)."""
        if not self.batches:
            return ()
        if self.failing:
            detail = f"{self.first_failure} ({self.failing} of {self.batches} batches fail)"
            return (ContractCheck(HELDOUT_OUTPUTS, "failed", detail),)
        declared = "count, dtypes and shapes as declared, the batch first"
        return (
            ContractCheck(
                HELDOUT_OUTPUTS, "passed", f"{self.rows} items in {self.batches} batches: {declared}"
            ),
        )


def _conforms(specs: Sequence[TensorSpec], arrays: Sequence[Any], rows: int) -> str | None:
    """What in ``arrays`` (a run's outputs) breaks the contract (None: nothing): ``check_arrays``'s
    rules and the batch as the first axis (the model server splits a batched answer by row)."""
    try:
        check_arrays(
            specs,
            [np.asarray(a) for a in arrays],
            what="outputs",
            source="ONNX Runtime on the held-out split (outputs)",
        )
    except HandoffError as exc:
        return exc.detail
    for index, (spec, array) in enumerate(zip(specs, arrays, strict=True)):
        found = np.shape(array)[0] if np.ndim(array) else 0
        if found != rows:
            return (
                f"outputs[{index}] '{spec.name}' has {found} rows for a batch of {rows}; "
                "the first axis of every output must be the batch"
            )
    return None


@dataclass(frozen=True)
class Evidence:
    """What evaluation knows when it assesses the checklist."""

    project: Project
    metrics: dict[str, float]
    gate: Gate
    export: dict[str, Any] | None  # export's record (sha256, parity), when it travelled with the model
    onnx_sha256: str  # of the model.onnx evaluated: export's record counts only when it names this file
    # What evaluate's own checks saw (``heldout_inputs_check``, ``ContractWatch.checks``); a check in
    # CONTRACT_CHECKS that is neither here nor export's did not run (``contract_checks``).
    contract_checks: tuple[ContractCheck, ...]
    training_run_id: str
    cfg: Any
    # optimize's record (its candidates and choice), when the model came through `handoff optimize`.
    optimized: dict[str, Any] | None = None
    # The reference profile's record (handoff.reference_profile), when evaluate wrote one, and
    # the alerts of the monitoring config it generated from the contract (handoff.monitoring_config).
    reference: dict[str, Any] | None = None
    alerts: tuple[str, ...] = ()


def export_check(record: dict[str, Any] | None, onnx_sha256: str) -> ContractCheck:
    """Export's checks, as its record shows them: it is written only when they all pass, and it
    holds the sha256 of the model.onnx they ran on."""
    if record is None:
        return ContractCheck(
            EXPORT_CHECKS, "not run", f"export record missing (no {EXPORT_RECORD_FILE} came with model.onnx)"
        )
    checked = str(record.get("onnx_sha256", ""))
    if checked != onnx_sha256:
        return ContractCheck(
            EXPORT_CHECKS,
            "not run",
            f"the export record is for model.onnx sha256 {checked[:12] or '-'}, "
            f"not the one evaluated ({onnx_sha256[:12]})",
        )
    return ContractCheck(
        EXPORT_CHECKS,
        "passed",
        "the example at two batch sizes and every dynamic axis at a second size: outputs as declared, "
        "batch first, parity within tolerance",
    )


def contract_checks(
    export: dict[str, Any] | None, onnx_sha256: str, checks: Sequence[ContractCheck]
) -> list[ContractCheck]:
    """Every check in CONTRACT_CHECKS, in order, as evaluation knows it: export's from its record,
    the held-out ones from ``checks``; one with no evidence did not run."""
    found = {c.name: c for c in (export_check(export, onnx_sha256), *checks)}
    return [
        found.get(name, ContractCheck(name, "not run", "no evidence of it reached evaluation"))
        for name in CONTRACT_CHECKS
    ]


def contract_gate(
    export: dict[str, Any] | None, onnx_sha256: str, checks: Sequence[ContractCheck]
) -> GateCheck:
    """The gate's contract check: every check in CONTRACT_CHECKS ran on this model and passed. The
    model server and deploy's smoke test refuse what breaks contract.yaml, so such a model (or one
    whose conformance nobody checked) must not become champion; the reason names each check that
    failed or did not run, and what it saw."""
    every = contract_checks(export, onnx_sha256, checks)
    failing = [c.sentence() for c in every if c.outcome != "passed"]
    return contract_check(failing, f"{', '.join(CONTRACT_CHECKS)} checks ran on this model.onnx and passed")


def contract_item(evidence: Evidence) -> ReadinessItem:
    """Passes only when every check in CONTRACT_CHECKS ran on this model and passed (as the gate's
    contract check, from the same checks); otherwise the evidence names each check that failed
    (and why) or did not run."""
    contract = evidence.project.contract
    checks = contract_checks(evidence.export, evidence.onnx_sha256, evidence.contract_checks)
    passed = all(c.outcome == "passed" for c in checks)
    shown = [c for c in checks if c.outcome != "passed"] or checks
    said = "; ".join(c.sentence() for c in shown)
    names = " → ".join((", ".join(contract.input_names), ", ".join(contract.output_names)))
    return ReadinessItem(
        "Contract satisfied", passed, f"{said} ({names}, contract sha256 {contract.sha256[:12]})"
    )


def _gate_item(name: str, gate: Gate, checks_of: Callable[[GateCheck], bool], empty: str) -> ReadinessItem:
    """A checklist item read from the gate's own checks, so the two cannot disagree."""
    checks = [c for c in gate.checks if checks_of(c)]
    if not checks:
        return ReadinessItem(name, True, empty)
    return ReadinessItem(name, all(c.passed for c in checks), "; ".join(c.detail for c in checks))


def _latency_item(gate: Gate) -> ReadinessItem:
    """The gate's latency check: every contract has one (``slo.latency_p99_ms`` is required)."""
    (check,) = [c for c in gate.checks if c.name == LATENCY_CHECK]
    return ReadinessItem("Latency SLO", check.passed, check.detail)


def reproducibility(project: Project, cfg: Any, steps: int = 2) -> ReadinessItem:
    """Two seeded runs of a few optimizer steps on the same batch must give bit-identical weights."""
    hooks = project.hooks
    seed = int(getattr(cfg, "seed", 0))

    def run() -> list[torch.Tensor]:
        seed_everything(seed)
        model = call_hook(hooks, "build_model", cfg)
        optimizer = build_optimizer(hooks, model, cfg)
        train_set, _ = call_hook(hooks, "build_datasets", cfg)
        with user_code(hooks, "the reproducibility check"):
            inputs, target = split_batch(next(iter(DataLoader(train_set, batch_size=32))))
            for _ in range(steps):
                outputs = model_outputs(model, inputs, project.contract)
                loss = call_hook(hooks, "loss", outputs, hook_batch((inputs, target)))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    first, second = run(), run()
    same = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    detail = f"two runs with seed {seed}, {steps} optimizer steps each: weights " + (
        "bit-identical" if same else "differ (nondeterministic ops or unseeded randomness in model.py)"
    )
    return ReadinessItem("Reproducibility (seeded rerun equal)", same, detail)


def lineage(evidence: Evidence) -> ReadinessItem:
    project = evidence.project
    facts = {
        "onnx sha256": (evidence.export or {}).get("onnx_sha256", ""),
        "contract sha256": project.contract.sha256,
        "template version": __version__,
        "training run": evidence.training_run_id,
        "git commit": git_sha(project.root),
    }
    missing = [k for k, v in facts.items() if not v or v == "unknown"]
    shown = ", ".join(f"{k} {str(v)[:12] or '-'}" for k, v in facts.items())
    if missing:
        hint = ""
        if "git commit" in missing:
            hint = "; commit the project (`git init && git add -A && git commit -m 'First commit'`)"
        return ReadinessItem("Lineage complete", False, f"missing {', '.join(missing)} ({shown}){hint}")
    return ReadinessItem("Lineage complete", True, shown)


def monitoring_item(evidence: Evidence) -> ReadinessItem:
    """Whether `handoff monitor` and the alerts can watch this model once served: a reference
    profile to compare traffic with, payloads logged to compare, the alert rules generated."""
    settings = evidence.project.settings
    monitoring, reference = settings.monitoring, evidence.reference
    problems = []
    if reference is None:
        problems.append("no reference profile: evaluate ran without a report folder (--report)")
    elif not (reference["inputs"]["rows"] and reference["outputs"]["rows"]):
        problems.append("the reference profile is empty (no training items or held-out outputs were read)")
    if monitoring.sample_rate == 0:
        problems.append("handoff.yaml monitoring.sample_rate is 0: the server logs no payloads to compare")
    if not evidence.alerts:
        problems.append("no alert rules were generated from contract.yaml")
    if has_raw_hooks(evidence.project.contract):
        problems.append(
            "the contract's raw: requests (preprocess/postprocess in the server) are logged as clients "
            "send them, which `handoff monitor` cannot compare with the model's reference profile yet"
        )
    if problems:
        return ReadinessItem(MONITORING_ITEM, False, "; ".join(problems))
    assert reference is not None
    inputs, outputs = reference["inputs"], reference["outputs"]
    where = monitoring.store or "this machine's state folder (monitoring.store is null: a cluster keeps none)"
    said = (
        f"reference profile registered with the version ({inputs['rows']} training items as "
        f"{len(inputs['columns'])} input columns, {outputs['rows']} held-out outputs); "
        f"{len(evidence.alerts)} alert rules and a Grafana dashboard generated from contract.yaml "
        f"(monitoring/ in this report); payloads sampled at {monitoring.sample_rate:g} into {where}"
    )
    if settings.serving.kserve.runtime == "triton":
        said += (
            "; on the cluster Triton serves (serving.kserve.runtime: triton) and exports metrics of its "
            "own: the latency, error and traffic alerts read the handoff server's (local, kserve runtime)"
        )
    return ReadinessItem(MONITORING_ITEM, True, said)


def assess(evidence: Evidence) -> list[ReadinessItem]:
    """Every checklist item, in the order a reviewer reads them."""
    project, gate = evidence.project, evidence.gate
    items = [contract_item(evidence)]
    if evidence.export is None:
        items.append(ReadinessItem("ONNX parity", False, "no export record travelled with the model"))
    else:
        items.append(_parity_item(evidence.export))
    items += [
        _latency_item(gate),
        _gate_item(
            "Metric gates",
            gate,
            lambda c: c.kind == "absolute" and c.name != LATENCY_CHECK,
            "contract.yaml sets no metric or size objective",
        ),
        _gate_item(
            "Champion comparison",
            gate,
            lambda c: c.kind == "relative",
            "the champion shares no gated metric with this model: nothing to compare",
        ),
        reproducibility(project, evidence.cfg),
    ]
    problems = project_card_problems(project.root)
    items.append(
        ReadinessItem(
            "Model card complete", not problems, "; ".join(problems) or "every required section is written"
        )
    )
    items.append(lineage(evidence))
    items.append(monitoring_item(evidence))
    return items


def _parity_item(export: dict[str, Any]) -> ReadinessItem:
    """Export's parity with torch and, for a form optimize made from that fp32 model, the form's
    parity with fp32 (``export.json`` as optimize rewrote it)."""
    worst, tolerance = export["parity_max_abs_diff"], export["parity_tolerance"]
    passed = worst <= tolerance
    said = f"max |torch − ONNX Runtime| {worst:.2e} vs slo.parity_tolerance {tolerance:g}"
    form = export.get("form")
    if form and form != "fp32":
        diff, allowed = export["form_parity_max_abs_diff"], export["form_parity_tolerance"]
        passed = passed and diff <= allowed
        said += (
            f"; served form {form}: max |fp32 − {form}| {diff:.2e} vs "
            f"slo.optimize.parity_tolerance.{form} {allowed:g}"
        )
    return ReadinessItem("ONNX parity", passed, said)


def forms_table(optimized: dict[str, Any] | None) -> Breakdown:
    """optimize's candidates as one table: size, latency, parity with fp32 and metrics per form made."""
    if not optimized:
        return []
    made = [c for c in optimized["candidates"] if c["made"]]
    metrics = sorted({m for c in made for m in c["metrics"]})
    columns = ["size_mb", "p50_ms", "p99_ms", "parity_vs_fp32", *metrics]
    rows = [
        (
            c["form"] + (" (served)" if c["form"] == optimized["form"] else "") + ("" if c["kept"] else " ✗"),
            [
                c["size_bytes"] / 1e6,
                c["latency_p50_ms"],
                c["latency_p99_ms"],
                c["parity_max_abs_diff"],
                *(c["metrics"].get(m, float("nan")) for m in metrics),
            ],
        )
        for c in made
    ]
    return [(f"Optimized forms: {optimized['reason']}", columns, rows)]


def pictures(
    project: Project,
    confusion: list[list[int]],
    timings_ms: np.ndarray,
    slo_ms: float,
    training_run_id: str,
    scored: tuple[np.ndarray, np.ndarray] | None = None,
    scored_items: int | None = None,
    optimized: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """PNG name -> bytes: confusion matrix (classification) or residuals against predictions
    (regression, from ``scored``: predictions and targets, all of them or an even sample of the
    ``scored_items`` held-out items), latency histogram, optimize's forms (``optimized``, its
    record) and training curves from MLflow."""
    from handoff import plots
    from handoff.residuals import RESIDUALS_PNG

    found: dict[str, bytes] = {LATENCY_PNG: plots.latency_histogram_png(timings_ms.tolist(), slo_ms)}
    if confusion:
        found[CONFUSION_PNG] = plots.confusion_png(confusion, [str(i) for i in range(len(confusion))])
    if scored is not None and project.contract.task_type == "regression":
        found[RESIDUALS_PNG] = plots.residuals_png(*scored, items=scored_items)
    if optimized:
        forms = [
            (c["form"], c["latency_p50_ms"], c["latency_p99_ms"], c["kept"])
            for c in optimized["candidates"]
            if c["made"]
        ]
        found[FORMS_PNG] = plots.forms_latency_png(forms, optimized["form"])
    history = training_history(project, training_run_id)
    if history:
        found[CURVES_PNG] = plots.curves_png(history, x_label="epoch")  # train logs step=epoch
    return found


def training_history(project: Project, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch training metrics as MLflow recorded them (empty without a training run)."""
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException

    from handoff.tracking import use_tracking

    client = use_tracking(project)
    try:
        keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(("onnx_", "latency_"))]
        return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in sorted(keys)}
    except MlflowException:
        return {}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(evidence: Evidence, items: list[ReadinessItem], images: list[str], tables: str) -> str:
    ready = all(i.passed for i in items)
    lines = [
        f"# Readiness: {evidence.project.contract.name}",
        "",
        f"**{'READY' if ready else 'NOT READY'}**: {sum(i.passed for i in items)}/{len(items)} items pass; "
        f"gate {'passed' if evidence.gate.passed else 'failed'}.",
        "",
        "| item | verdict | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {i.name} | {'pass' if i.passed else 'FAIL'} | {_cell(i.evidence)} |" for i in items]
    lines += ["", "## Metrics (held-out split, ONNX Runtime)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(evidence.metrics.items())]
    lines += ["", tables, ""]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


Breakdown = list[tuple[str, list[str], list[tuple[str, list[float]]]]]


def _breakdown(per_class: dict[str, dict[str, float]], slices: dict[str, dict[str, float]]) -> Breakdown:
    """Per-class and per-slice tables, so a regression hidden in an average shows: each a title,
    its metric columns and its rows (name, values; NaN where a row lacks a metric)."""
    tables = []
    for title, rows in (("Per class", per_class), ("Slices", slices)):
        if not rows:
            continue
        columns = sorted({c for row in rows.values() for c in row})
        values = [(name, [row.get(c, float("nan")) for c in columns]) for name, row in rows.items()]
        tables.append((title, columns, values))
    return tables


def _breakdown_markdown(tables: Breakdown) -> str:
    out = []
    for title, columns, rows in tables:
        out += [f"## {title}", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        out += [
            f"| {_cell(name)} | " + " | ".join(f"{v:.4g}" for v in values) + " |" for name, values in rows
        ]
        out.append("")
    return "\n".join(out)


def _breakdown_html(tables: Breakdown) -> str:
    """HTML tables whose columns sort on a click of their header (numbers as numbers)."""
    out = []
    for title, columns, rows in tables:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["", *columns])
        body = "".join(
            f"<tr><th>{html.escape(name)}</th>"
            + "".join(f'<td data-value="{v!r}">{v:.4g}</td>' for v in values)
            + "</tr>"
            for name, values in rows
        )
        out.append(
            f'<h3>{html.escape(title)}</h3><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )
    return "\n".join(out) or "<p>none recorded</p>"


# Click a header to sort its table by that column (again: the other way). No dependencies: the
# report is one self-contained file.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th) => th.addEventListener("click", () => {
  const table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  const key = (row) => { const c = row.cells[col]; const v = parseFloat(c.dataset.value);
    return Number.isNaN(v) ? c.textContent : v; };
  const up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); }).forEach((r) => body.appendChild(r));
}));
"""


def _forms_html(forms: Breakdown) -> str:
    """optimize's candidates, under their own heading (nothing for a model optimize did not make)."""
    return f"<h2>Optimized forms</h2>\n{_breakdown_html(forms)}\n" if forms else ""


def _html(
    evidence: Evidence,
    items: list[ReadinessItem],
    images: dict[str, bytes],
    tables: Breakdown,
    forms: Breakdown,
) -> str:
    ready = all(i.passed for i in items)
    rows = "".join(
        f"<tr class={'pass' if i.passed else 'fail'}><td>{html.escape(i.name)}</td>"
        f"<td>{'pass' if i.passed else 'FAIL'}</td><td>{html.escape(i.evidence)}</td></tr>"
        for i in items
    )
    metrics = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in sorted(evidence.metrics.items())
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, data in images.items()
    )
    title = f"Readiness: {evidence.project.contract.name}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}}
table{{border-collapse:collapse;margin:1rem 0}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}}
tr.pass td:nth-child(2){{color:#0a7a2f;font-weight:600}}
tr.fail td:nth-child(2){{color:#b00020;font-weight:600}}
.verdict{{font-size:1.3rem;font-weight:700}}figure{{display:inline-block;margin:1rem}}img{{max-width:32rem}}
table.sortable th{{cursor:pointer}}table.sortable td{{text-align:right}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="verdict">{"READY" if ready else "NOT READY"}:
{sum(i.passed for i in items)}/{len(items)} items pass;
gate {"passed" if evidence.gate.passed else "failed"}.</p>
<table><tr><th>item</th><th>verdict</th><th>evidence</th></tr>{rows}</table>
<h2>Metrics (held-out split, ONNX Runtime)</h2><table>{metrics}</table>
{figures}
{_forms_html(forms)}<h2>Per class and slices</h2>
{_breakdown_html(tables)}
<script>{_SORT_SCRIPT}</script>
</body></html>
"""


def write_report(
    out: Path,
    evidence: Evidence,
    items: list[ReadinessItem],
    images: dict[str, bytes],
    per_class: dict[str, dict[str, float]],
    slices: dict[str, dict[str, float]],
) -> None:
    """readiness.md (+ the PNGs beside it) and readiness.html (self-contained) into ``out``."""
    if out.exists():  # a report is about one model: nothing from an earlier one may linger
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, data in images.items():
        (out / name).write_bytes(data)
    forms, tables = forms_table(evidence.optimized), _breakdown(per_class, slices)
    markdown = _markdown(evidence, items, list(images), _breakdown_markdown(forms + tables))
    (out / REPORT_MD).write_text(markdown, encoding="utf-8")
    (out / REPORT_HTML).write_text(_html(evidence, items, images, tables, forms), encoding="utf-8")
