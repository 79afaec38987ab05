"""register: put the ONNX model in the MLflow model registry with its lineage, set the aliases.

Every version gets alias ``challenger``; ``champion`` moves to it only when the gate passed. The
artifact is one self-contained ``model.onnx`` (plus the contract example the smoke test replays),
and the version's tags say where it came from: ONNX sha256, contract hash, template version,
training run, git commit and the gate's verdict.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import onnx
from mlflow.models import ModelSignature
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec

from handoff import __version__
from handoff.artifacts import EXAMPLE_FILE, ONNX_FILE
from handoff.contract import Contract
from handoff.files import sha256_of
from handoff.project import Project
from handoff.tracking import use_tracking

CHALLENGER = "challenger"
CHAMPION = "champion"
SHA_TAG = "handoff.onnx_sha256"


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: str
    aliases: list[str]
    model_uri: str
    onnx_sha256: str
    seconds: float


def signature_of(contract: Contract) -> ModelSignature:
    def schema(specs: list[Any]) -> Schema:
        return Schema([MlflowTensorSpec(s.numpy_dtype, tuple(s.shape), s.name) for s in specs])

    return ModelSignature(inputs=schema(contract.inputs), outputs=schema(contract.outputs))


def git_sha(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def register(
    project_dir: Path | str, model_dir: Path | str, evaluation: dict[str, Any], mlflow_run_id: str = ""
) -> RegisterResult:
    """Register ``model_dir/model.onnx``; promote to champion only if ``evaluation`` passed its gate."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    model_dir = Path(model_dir)
    client = use_tracking(project)
    name = project.settings.model_name
    onnx_path = model_dir / ONNX_FILE
    sha = sha256_of(onnx_path)
    gate = evaluation["gate"]
    with mlflow.start_run(run_id=mlflow_run_id or None, run_name=f"{project.settings.project}-register"):
        mlflow.log_metrics({f"onnx_{k}": v for k, v in evaluation["metrics"].items()})
        mlflow.log_metrics(
            {"latency_p50_ms": evaluation["latency_p50_ms"], "latency_p99_ms": evaluation["latency_p99_ms"]}
        )
        info = mlflow.onnx.log_model(
            onnx_model=onnx.load(str(onnx_path)),
            name="model",
            registered_model_name=name,
            signature=signature_of(project.contract),
            pip_requirements=["onnxruntime"],
            # One self-contained file, byte-identical to what export checked (same sha256).
            save_as_external_data=False,
            extra_files=[str(model_dir / EXAMPLE_FILE)],
        )
        run_id = mlflow.active_run().info.run_id
    version = str(info.registered_model_version)
    tags = {
        SHA_TAG: sha,
        "handoff.contract_sha256": project.contract.sha256,
        "handoff.template_version": __version__,
        "handoff.run_id": run_id,
        "handoff.git_sha": git_sha(project.root),
        "handoff.gate": "passed" if gate["passed"] else "failed",
        "handoff.gate_reasons": "; ".join(gate["reasons"]) or "-",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = [CHALLENGER]
    client.set_registered_model_alias(name, CHALLENGER, version)
    if gate["passed"]:
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    return RegisterResult(
        model_name=name,
        version=version,
        aliases=aliases,
        model_uri=f"models:/{name}/{version}",
        onnx_sha256=sha,
        seconds=round(time.perf_counter() - started, 3),
    )
