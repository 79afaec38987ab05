"""register: put the ONNX model in the MLflow model registry with its lineage, set the aliases.

Every version gets alias ``challenger``; ``champion`` moves to it only when the gate passed and
the champion it was compared against still is the champion, checked and moved under the
registry's promotion lock (``handoff.registry.move_champion``), so of two registers that beat the same
champion exactly one promotes. The artifact is one self-contained ``model.onnx`` (plus the
contract example the smoke test replays), and the version's tags say where it came from: ONNX
sha256, contract hash, template version, training run, the training data's sha256, git commit,
container image and the gate's verdict.

The Triton model repository export wrote is logged into the same run (under a name derived from
its content, so a retried step writes the same files to the same place and never changes what an
earlier version points at), and the version's ``handoff.triton_uri`` tag holds its artifact URI:
where a cluster's storage initializer fetches the model from (``handoff deploy --cluster``).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import onnx
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec

from handoff import __version__
from handoff.artifacts import EXAMPLE_FILE, FP32_FILE, ONNX_FILE, OPTIMIZE_RECORD_FILE, REFERENCE_FILES
from handoff.contract import CONTRACT_FILE, Contract
from handoff.errors import HandoffError
from handoff.files import read_json, sha256_of
from handoff.lineage import DATA_TAG, HELDOUT_TAG, IMAGE_TAG, git_sha, image_reference
from handoff.model_card import CARD_FILE, check_model_card, filled_in_card
from handoff.monitoring_config import MONITORING_DIR
from handoff.project import Project
from handoff.readiness import REPORT_HTML, REPORT_MD
from handoff.registry import (
    CODE_TAG,
    CONTRACT_TAG,
    PROMOTION_TAG,
    SHA_TAG,
    TRITON_TAG,
    describe_registered_model,
    existing_version,
    move_champion,
    verify_artifact,
)
from handoff.tracking import CHALLENGER, CHAMPION, alias_version, use_tracking
from handoff.triton import TRITON_DIR, check_layout, layout_digest


@dataclass(frozen=True)
class RegisterResult:
    """The registered version and the aliases it holds after this step."""

    model_name: str
    version: str
    aliases: list[str]
    model_uri: str
    onnx_sha256: str
    seconds: float
    # Whether the version is champion after this step, and why (or why not): a pipeline deploys
    # only a promoted version, and its summary says why another was not.
    promoted: bool = False
    promotion: str = ""


def signature_of(contract: Contract) -> ModelSignature:
    """The MLflow signature, from the contract (ONNX signatures are not inferred by MLflow)."""

    def schema(specs: list[Any]) -> Schema:
        return Schema([MlflowTensorSpec(s.numpy_dtype, tuple(s.shape), s.name) for s in specs])

    return ModelSignature(inputs=schema(contract.inputs), outputs=schema(contract.outputs))


def _gate_of(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The parts of an evaluation result register relies on, checked before anything is written."""
    try:
        gate = evaluation["gate"]
        return {
            "passed": bool(gate["passed"]),
            "reasons": list(gate["reasons"]),
            "metrics": {str(k): float(v) for k, v in evaluation["metrics"].items()},
            "latency_p50_ms": float(evaluation["latency_p50_ms"]),
            "latency_p99_ms": float(evaluation["latency_p99_ms"]),
            "checks": [(str(c["name"]), bool(c["passed"]), str(c["detail"])) for c in gate.get("checks", [])],
            "champion": (evaluation.get("champion") or {}).get("version"),
            # Written by evaluate since the relative gate pins the held-out split; "" before.
            "heldout_sha256": str(evaluation.get("heldout_sha256") or ""),
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HandoffError(
            f"not an evaluation result written by `handoff evaluate` (problem: {exc!r})", field="evaluation"
        ) from None


def _attachments(
    project: Project,
    card: str,
    checked: dict[str, Any],
    tags: dict[str, str],
    report_dir: Path | None,
    tmp: Path,
) -> list[str]:
    """Files attached to the version: the filled-in model card, the readiness report, the
    reference profile `handoff monitor` compares traffic with and the monitoring config."""
    images = sorted(p.name for p in report_dir.glob("*.png")) if report_dir else []
    filled = filled_in_card(card, _card_facts(project, checked, tags), {name: name for name in images})
    (tmp / CARD_FILE).write_text(filled, encoding="utf-8")
    files = [str(tmp / CARD_FILE)]
    if report_dir is not None:
        report = [report_dir / n for n in (REPORT_MD, REPORT_HTML, *images, *REFERENCE_FILES)]
        # The alert rules and dashboard evaluate generated from this version's contract.
        report += sorted((report_dir / MONITORING_DIR).glob("*"))
        files += [str(p) for p in report if p.is_file()]
    return files


def _card_facts(project: Project, checked: dict[str, Any], tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What registration measured and decided, as the filled-in card's tables."""
    slo = project.contract.slo
    return {
        "Metrics (held-out split, ONNX Runtime)": {
            k: f"{v:.4f}" for k, v in sorted(checked["metrics"].items())
        },
        "Gates": {n: f"{'pass' if ok else 'FAIL'}: {detail}" for n, ok, detail in checked["checks"]},
        "Contract": {
            "inputs": ", ".join(f"{t.name} {t.dtype} {t.shape}" for t in project.contract.inputs),
            "outputs": ", ".join(f"{t.name} {t.dtype} {t.shape}" for t in project.contract.outputs),
            "latency p99": f"{checked['latency_p99_ms']:.2f} ms (SLO {slo.latency_p99_ms:g} ms)",
        },
        "Lineage": tags,
    }


def register(
    project_dir: Path | str,
    model_dir: Path | str,
    evaluation: dict[str, Any],
    mlflow_run_id: str = "",
    report_dir: Path | str | None = None,
) -> RegisterResult:
    """Register ``model_dir/model.onnx``; promote to champion only if ``evaluation`` passed its gate.

    Refused, before anything is written, when the model card is incomplete. The version is
    created with all its lineage tags in one call, so a crash never leaves an untagged version
    behind; aliases follow once it exists. The filled-in model card and the readiness report
    (``report_dir``, written by evaluate) are attached to it.

    Retry-safe: a model.onnx already registered (same sha256 tag) is not registered again; its
    version gets the aliases instead. Before any alias moves, the stored model.onnx is downloaded
    and checked against the sha256, so a missing or altered artifact is never promoted. A new
    champion records the one it replaced (``handoff.previous_champion``, for ``handoff rollback``).
    Champion is read, compared and moved under the promotion lock. Whatever the outcome, one line
    on stderr says whether the version was promoted and if not why (the gate's failed checks, a
    champion that moved, the lock held too long, a stored model that changed), and so does the
    version's ``handoff.promotion`` tag.
    """
    started = time.perf_counter()
    project = Project.load(project_dir)
    model_dir = Path(model_dir)
    checked = _gate_of(evaluation)
    card = check_model_card(project.root)
    client = use_tracking(project)
    name = project.contract.name  # registered and served under the contract's name
    sha = sha256_of(model_dir / ONNX_FILE)
    triton = model_dir / TRITON_DIR
    check_layout(triton, project.contract, sha)  # before anything is written
    code = exported_code(triton, name)
    identity = {SHA_TAG: sha, CONTRACT_TAG: project.contract.sha256}
    if code:
        identity[CODE_TAG] = served_code_sha256(code)
    precision = _triton_precision(model_dir)
    if precision:  # the same bytes with another Triton config are another version
        identity[PRECISION_TAG] = precision
    version = existing_version(client, name, identity)
    if version is None:
        # Log into the training run (one run holds the whole lineage) without letting a failure
        # here mark that finished run as FAILED, which `with start_run(...)` would do.
        run = mlflow.start_run(run_id=mlflow_run_id or None, run_name=f"{project.settings.project}-register")
        try:
            triton_uri = _log_triton_layout(triton)
            tags = {
                **_tags(project, checked, sha, run.info.run_id, triton_uri, client),
                **optimize_tags(model_dir),
                **identity,
            }
            info = _log_model(project, model_dir, checked, card, tags, report_dir, code)
        finally:
            mlflow.end_run()
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
        # The registry page shows the card itself (Markdown, which MLflow's UI renders); its
        # pictures stay in the attached files, where their relative links resolve.
        client.update_model_version(
            name, version, filled_in_card(card, _card_facts(project, checked, tags), {})
        )
    else:
        print(
            f"handoff: register: {name} v{version} already holds this model.onnx (sha256 {sha[:12]}…) "
            "under this contract",
            file=sys.stderr,
            flush=True,
        )
    try:
        # Nothing points at a version whose stored model is not the one that was checked.
        verify_artifact(name, version, sha)
        client.set_registered_model_alias(name, CHALLENGER, version)
        champion, promotion = _promote(client, name, version, checked)
        describe_registered_model(client, name, project)
    except HandoffError as exc:  # the stored model changed, or the promotion lock stayed held
        _say(client, name, version, f"not promoted: {exc.detail}")
        raise
    return RegisterResult(
        model_name=name,
        version=version,
        aliases=[CHALLENGER, CHAMPION] if champion else [CHALLENGER],
        model_uri=f"models:/{name}/{version}",
        onnx_sha256=sha,
        seconds=round(time.perf_counter() - started, 3),
        promoted=champion and checked["passed"],
        promotion=promotion,
    )


def _promote(client: MlflowClient, name: str, version: str, checked: dict[str, Any]) -> tuple[bool, str]:
    """Make ``version`` champion if its gate passed and the champion it was compared against still
    is champion; says why (or why not) on stderr and in its tag. Returns whether ``version`` is
    champion afterwards, and that sentence."""
    if not checked["passed"]:
        why = f"not promoted: {_gate_failure(checked)}"
        if alias_version(client, name, CHAMPION) != version:
            return False, _say(client, name, version, why)
        # A retry whose gate failed this time (a noisy latency measurement, say): register moves
        # champion only forward, and the tag keeps saying how the version became champion.
        return True, _say(
            client, name, version, f"{why}; it remains the champion (register never demotes one)", tag=False
        )
    # Compare-and-set: nothing moves champion between this read and this write.
    compared = checked["champion"]
    holder = f"register of {name} v{version}"
    move = move_champion(client, name, version, expected=compared, holder=holder, record_previous=True)
    if move.before == version:
        return True, _say(client, name, version, "already the champion", tag=False)
    if not move.moved:
        return False, _say(client, name, version, f"not promoted: {_champion_moved(move.before, compared)}")
    replaced = f"replaced v{move.before}" if move.before else "the first champion"
    return True, _say(client, name, version, f"promoted: {replaced}")


def _gate_failure(checked: dict[str, Any]) -> str:
    """Why the gate failed, in evaluate's words: its reasons (each names the gate, the measured
    value and the bound), else the names of the failed checks."""
    why = "; ".join(checked["reasons"]) or ", ".join(name for name, ok, _ in checked["checks"] if not ok)
    return f"the gate failed: {why}" if why else "the gate failed"


def _say(client: MlflowClient, name: str, version: str, promotion: str, *, tag: bool = True) -> str:
    """Put ``promotion`` in the version's ``handoff.promotion`` tag (unless ``tag`` is False) and
    print it as register's one line about it; returns it."""
    if tag:
        client.set_model_version_tag(name, version, PROMOTION_TAG, promotion)
    print(f"handoff: register: {name} v{version} {promotion}", file=sys.stderr, flush=True)
    return promotion


def _champion_moved(current: str | None, compared: str | None) -> str:
    """Why promoting is unsafe: the champion this model beat is no longer the champion (another
    run promoted meanwhile), so the comparison is stale."""
    return (
        f"the champion became v{current} while this model was compared against "
        f"{'v' + compared if compared else 'no champion'}; evaluate it again against the new champion"
    )


def exported_code(triton: Path, name: str) -> list[Path]:
    """The Python files export put beside the model for the server (preprocess/postprocess)."""
    return sorted((triton / name).glob("*.py"))


def served_code_sha256(files: list[Path]) -> str:
    """One digest of the served Python files, their names included."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


def _log_triton_layout(root: Path) -> str:
    """Upload the Triton repository into the open run; returns its artifact URI.

    The path is named after the layout's content: the same files always land at the same URI
    (a retry rewrites identical bytes), and another model logged into the same run later gets a
    URI of its own instead of overwriting the one an earlier version's tag points at.
    """
    artifact_path = f"{TRITON_DIR}/{layout_digest(root)[:16]}"
    mlflow.log_artifacts(str(root), artifact_path=artifact_path)
    return str(mlflow.get_artifact_uri(artifact_path))


def _tags(
    project: Project,
    checked: dict[str, Any],
    sha: str,
    run_id: str,
    triton_uri: str,
    client: MlflowClient,
) -> dict[str, str]:
    return {
        SHA_TAG: sha,
        TRITON_TAG: triton_uri,
        CONTRACT_TAG: project.contract.sha256,
        "handoff.template_version": __version__,
        "handoff.run_id": run_id,
        # Tagged on the run by train; a run train did not make (register on its own) has none.
        DATA_TAG: client.get_run(run_id).data.tags.get(DATA_TAG, "unknown"),
        "handoff.git_sha": git_sha(project.root),
        IMAGE_TAG: image_reference(),
        "handoff.gate": "passed" if checked["passed"] else "failed",
        "handoff.gate_reasons": "; ".join(checked["reasons"]) or "-",
        "handoff.compared_to_champion": checked["champion"] or "-",
        # Absent when the evaluation did not say (the relative gate then scores as before it existed).
        **({HELDOUT_TAG: checked["heldout_sha256"]} if checked["heldout_sha256"] else {}),
    }


# The version's optimize tags (absent for a model that did not go through `handoff optimize`).
FORM_TAG = "handoff.optimize.form"
PRECISION_TAG = "handoff.optimize.triton_precision"
TAG_LIMIT = 5000  # MLflow's longest model version tag value


def _triton_precision(model_dir: Path) -> str | None:
    """The TensorRT precision optimize put in the Triton config (None without one)."""
    path = model_dir / OPTIMIZE_RECORD_FILE
    return read_json(path).get("triton_precision") if path.is_file() else None


def optimize_tags(model_dir: Path) -> dict[str, str]:
    """The form served, why, the fp32 model it was made from and every candidate in one line each,
    from optimize's record beside the model."""
    path = model_dir / OPTIMIZE_RECORD_FILE
    if not path.is_file():
        return {}
    record = read_json(path)
    lines = []
    for c in record["candidates"]:
        if not c["made"]:
            lines.append(f"{c['form']}: not made: {c['reason']}")
            continue
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(c["metrics"].items()))
        verdict = "kept" if c["kept"] else f"not kept: {c['why_not'][0]}"
        lines.append(
            f"{c['form']}: {c['size_bytes'] / 1e6:.3f} MB, p50 {c['latency_p50_ms']:.4f} ms, "
            f"p99 {c['latency_p99_ms']:.4f} ms, {metrics}; {verdict}"
        )
    return {
        FORM_TAG: record["form"],
        "handoff.optimize.reason": record["reason"][:TAG_LIMIT],
        "handoff.optimize.fp32_sha256": record["fp32_sha256"],
        "handoff.optimize.candidates": "\n".join(lines)[:TAG_LIMIT],
    }


def _log_model(
    project: Project,
    model_dir: Path,
    checked: dict[str, Any],
    card: str,
    tags: dict[str, str],
    report_dir: Path | str | None,
    code: list[Path],
) -> Any:
    """Log metrics and the model (with its attachments) into the open MLflow run."""
    mlflow.log_metrics({f"onnx_{k}": v for k, v in checked["metrics"].items()})
    mlflow.log_metrics({k: checked[k] for k in ("latency_p50_ms", "latency_p99_ms")})
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(report_dir) if report_dir else None
        attached = _attachments(project, card, checked, tags, report, Path(tmp))
        return mlflow.onnx.log_model(
            onnx_model=onnx.load(str(model_dir / ONNX_FILE)),
            name="model",
            signature=signature_of(project.contract),
            pip_requirements=["onnxruntime"],
            # One self-contained file, byte-identical to what export checked (same sha256),
            # with the example the smoke test replays, the contract it is served with, the
            # filled-in model card and the readiness report.
            save_as_external_data=False,
            # With preprocess/postprocess, model.py and the *.py beside it too, as export copied
            # them (what the cluster's Triton layout holds): the model server imports them from
            # the same folder as the contract.
            # With optimize's record, and the exported fp32 model when a faster form is served,
            # kept for audit.
            extra_files=[
                str(model_dir / EXAMPLE_FILE),
                str(project.root / CONTRACT_FILE),
                *attached,
                *(str(p) for p in code),
                *(str(model_dir / n) for n in (OPTIMIZE_RECORD_FILE, FP32_FILE) if (model_dir / n).is_file()),
            ],
        )
