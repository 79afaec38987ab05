"""The reference profile registered with every version: what "no drift" looks like for it.

Inputs are described by training items spread over the training split (what the model learned
from), outputs by the served model's answers on the held-out split (what it does on data it did
not see: its training-split answers are overconfident). Both are kept as compact column tables
(``handoff.drift_features``: a few summary columns per image, a column per tabular feature),
at most ``REFERENCE_ROWS`` rows each, so a version carries its profile in a few hundred KB and
`handoff monitor` needs nothing but the registry to judge a window of traffic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from handoff.artifacts import REFERENCE_FILE, REFERENCE_INPUTS_FILE, REFERENCE_OUTPUTS_FILE
from handoff.drift_features import feature_table, input_columns, prediction_columns
from handoff.files import read_json, write_json
from handoff.project import Project
from handoff.scoring import HeldOut, training_feeds

# Rows per side: enough for the drift tests to see a shift of a few percent, small enough to
# register with every version.
REFERENCE_ROWS = 2000
BATCH = 256


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def reference_inputs(project: Project, cfg: Any) -> pd.DataFrame:
    """Input columns of up to ``REFERENCE_ROWS`` training items spread over the split."""
    contract = project.contract
    return _concat(
        [
            feature_table(input_columns(contract, feeds))
            for feeds in training_feeds(project, cfg, REFERENCE_ROWS, BATCH)
        ]
    )


def reference_outputs(project: Project, session: Any, data: HeldOut) -> pd.DataFrame:
    """Output columns of the served model's answers on the held-out split's first
    ``REFERENCE_ROWS`` items."""
    contract = project.contract
    tables, rows = [], 0
    for inputs, _ in data.batches(project):
        arrays = [t.numpy() for t in inputs]
        outputs = session.run(contract.output_names, dict(zip(contract.input_names, arrays, strict=True)))
        taken = min(len(arrays[0]), REFERENCE_ROWS - rows)
        named = {name: array[:taken] for name, array in zip(contract.output_names, outputs, strict=True)}
        tables.append(feature_table(prediction_columns(contract, named)))
        rows += taken
        if rows >= REFERENCE_ROWS:
            break
    return _concat(tables)


@dataclass(frozen=True)
class Reference:
    """The profile's two tables and its record, built before evaluate's report folder exists
    (the readiness checklist reports it) and written into it afterwards."""

    inputs: pd.DataFrame
    outputs: pd.DataFrame
    record: dict[str, Any]

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.inputs.to_parquet(out_dir / REFERENCE_INPUTS_FILE, index=False)
        self.outputs.to_parquet(out_dir / REFERENCE_OUTPUTS_FILE, index=False)
        write_json(out_dir / REFERENCE_FILE, self.record)


def build_reference(project: Project, cfg: Any, session: Any, data: HeldOut) -> Reference:
    """The profile of the model in ``session``: training inputs, its held-out outputs."""
    started = time.perf_counter()
    inputs, outputs = reference_inputs(project, cfg), reference_outputs(project, session, data)
    record = {
        "model": project.contract.name,
        "contract_sha256": project.contract.sha256,
        "inputs": {"rows": len(inputs), "columns": list(inputs.columns), "source": "training split"},
        "outputs": {
            "rows": len(outputs),
            "columns": list(outputs.columns),
            "source": "held-out split",
            "heldout_sha256": data.sha256,
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    return Reference(inputs, outputs, record)


def load_reference(folder: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """The record and both tables from a folder holding a registered version's profile."""
    return (
        read_json(folder / REFERENCE_FILE),
        pd.read_parquet(folder / REFERENCE_INPUTS_FILE),
        pd.read_parquet(folder / REFERENCE_OUTPUTS_FILE),
    )
