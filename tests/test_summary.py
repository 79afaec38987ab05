"""The run summary: why a run whose gate passed deployed nothing (another run promoted first), and
the contract's bounds next to each metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from handoff.project import Project
from handoff_pipelines.summary import build_summary, format_summary

from .conftest import edit_yaml

pytestmark = pytest.mark.unit

WHY = (
    "not promoted: the champion became v3 while this model was compared against v1; "
    "evaluate it again against the new champion"
)


def test_a_version_that_lost_its_promotion_is_reported_as_not_promoted(default_project: Path) -> None:
    records = {
        "train": {"seconds": 1.0},
        "export": {"seconds": 1.0, "onnx_sha256": "ab" * 32},
        "evaluate": {
            "seconds": 1.0,
            "gate": {"passed": True, "reasons": []},
            "metrics": {"accuracy": 0.97},
            "latency_p50_ms": 0.2,
            "latency_p99_ms": 0.4,
            "readiness": [],
            "report": "/runs/x/report",
        },
        "register": {
            "seconds": 1.0,
            "model_name": "digits-classifier",
            "version": "4",
            "aliases": ["challenger"],
            "model_uri": "models:/digits-classifier/4",
            "promoted": False,
            "promotion": WHY,
        },
    }
    summary = build_summary(Project.load(default_project), Path("/runs/x"), records, None, 4.0)
    assert summary["status"] == "not_promoted" and summary["endpoint"] is None
    assert summary["registered"]["promotion"] == WHY
    text = format_summary(summary)
    assert "== digits-classifier: NOT PROMOTED ==" in text
    assert f"deploy     skipped: version 4 was {WHY}" in text.splitlines()


def test_each_metric_line_shows_every_bound_the_contract_sets(project: Path) -> None:
    def bounds(contract: dict[str, Any]) -> None:
        contract["slo"]["min_metrics"] = {"accuracy": 0.95, "macro_f1": 0.9}
        contract["slo"]["max_metrics"] = {"ece": 0.05, "macro_f1": 0.99}

    edit_yaml(project / "contract.yaml", bounds)
    evaluation = {
        "seconds": 1.0,
        "gate": {"passed": True, "reasons": []},
        "metrics": {"accuracy": 0.97, "macro_f1": 0.96, "ece": 0.02},
        "latency_p50_ms": 0.2,
        "latency_p99_ms": 0.4,
        "readiness": [],
        "report": "/runs/x/report",
    }
    summary = build_summary(Project.load(project), Path("/runs/x"), {"evaluate": evaluation}, None, 1.0)
    assert summary["contract"]["max_metrics"] == {"ece": 0.05, "macro_f1": 0.99}
    lines = format_summary(summary).splitlines()
    assert "metric     accuracy       0.9700  (contract: >= 0.95)" in lines
    assert "metric     ece            0.0200  (contract: <= 0.05)" in lines
    assert "metric     macro_f1       0.9600  (contract: >= 0.9, <= 0.99)" in lines
