"""The run summary: what a person wants to know after a run, as JSON and as a short text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handoff.project import Project
from handoff_pipelines import STEPS


def build_summary(
    project: Project,
    run_dir: Path,
    records: dict[str, dict[str, Any]],
    failure: dict[str, str] | None,
    total_seconds: float,
) -> dict[str, Any]:
    evaluation = records.get("evaluate", {})
    registered = records.get("register")
    deployed = records.get("deploy")
    gate = evaluation.get("gate")
    if failure is not None:
        status = "failed"
    elif gate is not None and not gate["passed"]:
        status = "gate_failed"
    elif registered is not None and not registered.get("promoted", True):
        status = "not_promoted"  # the gate passed, but another run promoted its model meanwhile
    else:
        status = "succeeded"
    slo = project.contract.slo
    return {
        "project": project.settings.project,
        "run_dir": str(run_dir),
        "status": status,
        "error": failure,
        "metrics": evaluation.get("metrics", {}),
        "contract": {
            "min_metrics": slo.min_metrics,
            "max_metrics": slo.max_metrics,
            "latency_p99_ms": slo.latency_p99_ms,
            "latency_batch_size": slo.latency_batch_size,
        },
        "latency_ms": (
            {"p50": evaluation["latency_p50_ms"], "p99": evaluation["latency_p99_ms"]} if evaluation else None
        ),
        "gate": gate,
        "registered": (
            {
                "name": registered["model_name"],
                "version": registered["version"],
                "aliases": registered["aliases"],
                "uri": registered["model_uri"],
                "promotion": registered.get("promotion", ""),
            }
            if registered
            else None
        ),
        # What is registered and served: optimize's chosen form (export's fp32 file before a run
        # reached optimize).
        "onnx_sha256": records.get("optimize", records.get("export", {})).get("onnx_sha256"),
        "optimized": _optimized(records["optimize"]) if "optimize" in records else None,
        "endpoint": deployed["url"] if deployed else None,
        "smoke_test": (
            {
                "passed": deployed["smoke_passed"],
                "detail": deployed["smoke_detail"],
                "latency_ms": deployed["smoke_latency_ms"],
            }
            if deployed
            else None
        ),
        "readiness": _readiness(evaluation) if evaluation else None,
        "step_seconds": {step: records[step]["seconds"] for step in STEPS if step in records},
        "total_seconds": total_seconds,
    }


def _optimized(record: dict[str, Any]) -> dict[str, Any]:
    """The form served, why, and each candidate's size, p50/p99, metrics and whether it kept the
    contract (or why it was not made)."""
    return {
        "form": record["form"],
        "reason": record["reason"],
        "fp32_sha256": record["fp32_sha256"],
        "candidates": {
            c["form"]: (
                {
                    "size_bytes": c["size_bytes"],
                    "p50_ms": c["latency_p50_ms"],
                    "p99_ms": c["latency_p99_ms"],
                    "metrics": c["metrics"],
                    "kept": c["kept"],
                }
                if c["made"]
                else {"not_made": c["reason"]}
            )
            for c in record["candidates"]
        },
    }


def _readiness(evaluation: dict[str, Any]) -> dict[str, Any]:
    items = evaluation["readiness"]
    return {
        "passed": sum(item["passed"] for item in items),
        "items": len(items),
        "failing": [f"{item['name']}: {item['evidence']}" for item in items if not item["passed"]],
        "report": evaluation["report"],
    }


def _bounds(contract: dict[str, Any], metric: str) -> str:
    """Every bound the contract sets on ``metric`` (``  (contract: >= 0.9, <= 0.99)``), or ''."""
    bounds = [
        f"{sign} {contract[field][metric]:g}"
        for sign, field in ((">=", "min_metrics"), ("<=", "max_metrics"))
        if metric in contract[field]
    ]
    return f"  (contract: {', '.join(bounds)})" if bounds else ""


def format_summary(summary: dict[str, Any]) -> str:
    """A dozen lines for the terminal; summary.json has the same facts for machines."""
    lines = [f"\n== {summary['project']}: {summary['status'].upper().replace('_', ' ')} =="]
    if summary["error"]:
        lines.append(f"error: {summary['error']['step']} failed: {summary['error']['message']}")
    contract = summary["contract"]
    for name, value in summary["metrics"].items():
        lines.append(f"metric     {name:<14} {value:.4f}{_bounds(contract, name)}")
    if summary["latency_ms"]:
        lines.append(
            f"latency    p50 {summary['latency_ms']['p50']:.3f} ms, "
            f"p99 {summary['latency_ms']['p99']:.3f} ms "
            f"(contract: p99 <= {summary['contract']['latency_p99_ms']:g} ms)"
        )
    if summary["gate"]:
        gate = summary["gate"]
        lines.append(
            "gate       " + ("passed" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"]))
        )
    if summary["readiness"]:
        ready = summary["readiness"]
        report = f"{ready['report']}/readiness.html"
        lines.append(f"readiness  {ready['passed']}/{ready['items']} items pass: {report}")
        lines += [f"           not ready: {item}" for item in ready["failing"]]
    if summary["registered"]:
        reg = summary["registered"]
        lines.append(
            f"registered {reg['name']} version {reg['version']} (aliases: {', '.join(reg['aliases'])})"
        )
    if summary["optimized"]:
        lines.append(f"optimized  {summary['optimized']['reason']}")
    if summary["onnx_sha256"]:
        lines.append(f"onnx       sha256 {summary['onnx_sha256']}")
    if summary["endpoint"]:
        smoke = summary["smoke_test"]
        lines.append(f"endpoint   {summary['endpoint']}/v2/models/{summary['registered']['name']}/infer")
        lines.append(f"smoke test {'passed' if smoke['passed'] else 'FAILED'}: {smoke['detail']}")
    elif summary["status"] == "gate_failed":
        lines.append("deploy     skipped: the gate failed, so the model was not promoted or served")
    elif summary["status"] == "not_promoted":
        reg = summary["registered"]
        lines.append(f"deploy     skipped: version {reg['version']} was {reg['promotion']}")
    steps = "".join(f"{k} {v:.1f}s, " for k, v in summary["step_seconds"].items())
    lines.append(f"time       {steps}total {summary['total_seconds']:.1f}s")
    lines.append(f"summary    {summary['run_dir']}/summary.json")
    return "\n".join(lines)
