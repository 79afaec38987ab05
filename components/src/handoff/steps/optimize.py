"""optimize: serve the fastest form of the exported model that keeps the contract.

From export's fp32 ``model.onnx`` it makes each form ``slo.optimize`` allows with ONNX Runtime's
own tools (``handoff.onnx_forms``: graph-optimized fp32, static QDQ int8 calibrated on training
items, dynamic int8, fp16 with float32 inputs and outputs), then measures each as evaluate
measures the model it gates: outputs checked against the contract and compared with fp32 on the
contract example at every size export checked, the shared suite's metrics on the held-out split
(all forms in one pass over it), latency at the contract's batch size. ``handoff.form_choice``
picks the fastest that keeps every SLO and allowed metric drop; fp32 is the fallback, and a form
that cannot be made or measured falls back with one line saying why, never a failed run.

The output folder is export's, for the chosen model (what evaluate, register and deploy read):
``model.onnx`` (the chosen form), ``example.json`` (the smoke test's expected outputs, from the
chosen form), ``config.json``, ``export.json`` (export's record, for the chosen file), ``triton/``
(its Triton repository, with the GPU precision that matches the form), plus ``model.fp32.onnx``
(the exported model, kept beside a quantized one for audit) and ``optimize.json`` (every
candidate's size, latency, metrics and the reason for the choice).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from handoff.artifacts import (
    CONFIG_FILE,
    EXAMPLE_FILE,
    EXPORT_RECORD_FILE,
    FP32_FILE,
    ONNX_FILE,
    OPTIMIZE_RECORD_FILE,
)
from handoff.contract import CONTRACT_FILE, OPTIMIZE_FORMS
from handoff.contract_examples import example_arrays, example_payload, served_example
from handoff.errors import HandoffError
from handoff.files import read_json, sha256_of, write_json
from handoff.form_choice import Candidate, Choice, choose
from handoff.onnx_export import at_other_sizes, dynamic_axes
from handoff.onnx_forms import FormNotMade, make_form
from handoff.onnx_io import check_arrays, open_session, run_session
from handoff.project import Project
from handoff.raw_io import has_raw_hooks, served_code
from handoff.scoring import HeldOut, RivalFailed, measure_latencies, score_all, training_feeds
from handoff.triton import write_layout

CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class OptimizeResult:
    """The form served, why, and every candidate as measured (``form_choice.Candidate`` fields, with
    ``kept`` and ``why_not``)."""

    model_dir: str
    triton_repository: str
    form: str
    reason: str
    onnx_sha256: str  # of the chosen model.onnx: what evaluate scores and deploy serves
    fp32_sha256: str  # of the exported fp32 model
    execution_provider: str  # where the candidates were timed
    # TensorRT's precision in the Triton config (FP16 for fp16 on a GPU predictor), else None.
    triton_precision: str | None
    candidates: list[dict[str, Any]]
    seconds: float


def optimize(project_dir: Path | str, model_dir: Path | str, out_dir: Path | str) -> OptimizeResult:
    """Write the chosen form of ``model_dir`` (export's folder) to ``out_dir``, laid out as export's."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    source, out = Path(model_dir), Path(out_dir)
    fp32 = source / ONNX_FILE
    reads = "optimize reads the folder `handoff export` wrote"
    if not fp32.is_file():
        raise HandoffError(f"no {ONNX_FILE} here: {reads}", file=source)
    if (source / OPTIMIZE_RECORD_FILE).is_file():
        # Its model.onnx may be int8 already: optimizing it again would call that fp32.
        raise HandoffError(f"this is a folder `handoff optimize` wrote: {reads}", file=source)
    if out.resolve() == source.resolve():
        raise HandoffError(
            "--out is the folder optimize reads: write the chosen form to another folder, so "
            "export's fp32 model stays as it was",
            file=out,
        )
    cfg = project.config_from_dict(read_json(source / CONFIG_FILE))
    out.mkdir(parents=True, exist_ok=True)
    provider, wanted = _provider(project), _wanted_provider(project)
    with tempfile.TemporaryDirectory(dir=out, prefix=".candidates-") as scratch:
        made = _make_candidates(project, cfg, fp32, Path(scratch))
        candidates = _measure(project, cfg, made, provider)
        choice = choose(project.contract.slo, candidates)
        if provider != wanted:
            # CPU timings do not rank forms on a GPU: serve what needs no measurement.
            why = (
                f"fp32: a GPU predictor's latency cannot be measured here ({wanted} is not available "
                f"where optimize ran), so no form replaces fp32; on the CPU, {choice.reason}"
            )
            choice = Choice("fp32", why, choice.judged)
        chosen = made[choice.form]
        assert isinstance(chosen, Path)
        _write(project, cfg, source, out, chosen, choice)
    for judged in choice.judged:
        if not judged.candidate.made:
            form, why = judged.candidate.form, judged.why_not[0]
            print(f"handoff: optimize: {form} not made: {why}", file=sys.stderr)
    print(f"handoff: optimize: serving {choice.reason}", file=sys.stderr, flush=True)
    note = "" if provider == wanted else f" ({wanted} is not available here)"
    note += f", {predictor_threads(project)} thread(s) as serving.kserve.cpu allows"
    result = OptimizeResult(
        model_dir=str(out),
        triton_repository=str(out / "triton"),
        form=choice.form,
        reason=choice.reason,
        onnx_sha256=sha256_of(out / ONNX_FILE),
        fp32_sha256=sha256_of(fp32),
        execution_provider=provider + note,
        triton_precision=_precision(project, choice.form),
        candidates=[
            {**dataclasses.asdict(j.candidate), "kept": j.kept, "why_not": j.why_not} for j in choice.judged
        ],
        seconds=round(time.perf_counter() - started, 3),
    )
    write_json(out / OPTIMIZE_RECORD_FILE, dataclasses.asdict(result))
    return result


# What a GPU predictor (Triton with serving.kserve.gpus) runs as intended: the fp32 graph on CUDA
# and fp16 as TensorRT FP16 engines. The int8 forms here are CPU forms (uint8 activations, integer
# CPU kernels), and the graph-optimized file holds fusions made for the CPU provider.
GPU_FORMS = ("fp32", "fp16")


def _on_gpu(project: Project) -> bool:
    """Whether the predictor serves on a GPU: Triton with GPUs (handoff-onnx serves on the CPU)."""
    kserve = project.settings.serving.kserve
    return bool(kserve.gpus) and kserve.runtime == "triton"


def predictor_threads(project: Project) -> int:
    """The CPUs a predictor replica may use (``serving.kserve.cpu``, rounded up): the threads the
    candidates are timed with, so a form wins where it will serve, not on this machine's cores."""
    from kubernetes.utils.quantity import parse_quantity

    return max(1, math.ceil(parse_quantity(project.settings.serving.kserve.cpu)))


def _wanted_provider(project: Project) -> str:
    """The serving runtime's execution provider: CUDA for a GPU predictor, else the CPU."""
    return "CUDAExecutionProvider" if _on_gpu(project) else "CPUExecutionProvider"


def _provider(project: Project) -> str:
    wanted = _wanted_provider(project)
    return wanted if wanted in ort.get_available_providers() else "CPUExecutionProvider"


def _make_candidates(project: Project, cfg: Any, fp32: Path, scratch: Path) -> dict[str, Path | str]:
    """Each allowed form's file, or the sentence saying why it could not be made."""
    allowed = project.contract.slo.optimizing
    method = project.settings.optimize.calibration_method
    made: dict[str, Path | str] = {}
    for form in OPTIMIZE_FORMS:
        if not allowed.allows(form):
            continue
        if _on_gpu(project) and form not in GPU_FORMS:
            made[form] = (
                "made for CPU predictors; a GPU predictor (serving.kserve.gpus) is offered "
                f"{' and '.join(GPU_FORMS)} only"
            )
            continue
        calibration = _calibration_feeds(project, cfg) if form == "int8_static" else iter(())
        try:
            made[form] = make_form(form, fp32, scratch / f"{form}.onnx", calibration, method)
        except FormNotMade as exc:
            made[form] = str(exc)
    return made


def _calibration_feeds(project: Project, cfg: Any) -> Iterator[dict[str, np.ndarray]]:
    """``optimize.calibration_samples`` training items, spread evenly over the split, as feeds of
    the contract's inputs (what ORT's calibrator runs the model on to measure activation ranges)."""
    return training_feeds(project, cfg, project.settings.optimize.calibration_samples, CALIBRATION_BATCH)


def _example_runs(project: Project, cfg: Any) -> list[list[np.ndarray]]:
    """The inputs export checked parity on: the example, a 3x batch of it, every dynamic axis at a
    second size."""
    example = example_arrays(project, cfg)
    runs = [example, tuple(torch.cat([t, t, t]) for t in example)]
    axes = dynamic_axes(project.contract, example)
    if axes:
        runs.append(at_other_sizes(example, axes))
    return [[t.detach().numpy() for t in run] for run in runs]


def _parity(project: Project, reference: Any, session: Any, runs: list[list[np.ndarray]]) -> float:
    """max |reference - session| over ``runs``; raises HandoffError when the outputs break the contract."""
    contract = project.contract
    worst = 0.0
    for inputs in runs:
        expected = run_session(reference, contract, inputs)
        got = run_session(session, contract, inputs)
        check_arrays(contract.outputs, got, what="outputs", source="this form")
        for e, g in zip(expected, got, strict=True):
            diff = np.abs(e.astype(np.float64) - g.astype(np.float64))
            worst = max(worst, float(np.max(diff, initial=0.0)))
    return worst


def _measure(project: Project, cfg: Any, made: dict[str, Path | str], provider: str) -> list[Candidate]:
    """Each made form's parity with fp32, held-out metrics (one pass for all) and latency."""
    slo = project.contract.slo.optimizing
    runs = _example_runs(project, cfg)
    # The reference runs where the candidates run: fp32 against itself is 0 by definition, and a
    # form is compared with fp32 on the same execution provider, not across two. Both get the
    # predictor's CPUs as threads: int8 kernels gain most where fp32 cannot spread over cores.
    threads = predictor_threads(project)
    reference = open_session(made["fp32"], provider=provider, threads=threads)  # type: ignore[arg-type]
    sessions: dict[str, Any] = {}
    parity: dict[str, float] = {}
    failed: dict[str, str] = {form: why for form, why in made.items() if isinstance(why, str)}
    for form, path in made.items():
        if isinstance(path, str):
            continue
        try:
            session = reference if form == "fp32" else open_session(path, provider=provider, threads=threads)
            parity[form] = _parity(project, reference, session, runs)
        except HandoffError as exc:
            failed[form] = f"ONNX Runtime could not run it as the contract asks: {exc.detail}"
            continue
        sessions[form] = session
    data = HeldOut.load(project, cfg)
    while True:
        forms = list(sessions)
        try:
            scored = dict(zip(forms, score_all(project, list(sessions.values()), data), strict=True))
            break
        except RivalFailed as broke:
            form = forms[broke.index]
            failed[form] = f"failed on the held-out split: {broke.error}"
            del sessions[form]
    example = [t.numpy() for t in example_arrays(project, cfg)]
    rounds = dict(zip(sessions, measure_latencies(project, list(sessions.values()), example), strict=True))
    candidates = []
    for form, path in made.items():
        if form in failed:
            candidates.append(Candidate(form, made=False, reason=failed[form]))
            continue
        assert isinstance(path, Path)
        timings = np.concatenate(rounds[form])
        candidates.append(
            Candidate(
                form,
                made=True,
                size_bytes=path.stat().st_size,
                sha256=sha256_of(path),
                parity_max_abs_diff=parity[form],
                parity_tolerance=slo.parity(form),
                latency_p50_ms=round(float(np.percentile(timings, 50)), 4),
                latency_p99_ms=round(float(np.percentile(timings, 99)), 4),
                round_p50_ms=[round(float(np.percentile(r, 50)), 4) for r in rounds[form]],
                metrics=scored[form].metrics,
            )
        )
    return candidates


def _write(project: Project, cfg: Any, source: Path, out: Path, chosen: Path, choice: Choice) -> None:
    """Export's layout in ``out`` for ``chosen``; the fp32 model beside it when another form won."""
    for name in (ONNX_FILE, FP32_FILE, EXAMPLE_FILE, EXPORT_RECORD_FILE, OPTIMIZE_RECORD_FILE):
        (out / name).unlink(missing_ok=True)  # a rerun into the same folder leaves nothing stale
    shutil.copyfile(chosen, out / ONNX_FILE)
    if choice.form != "fp32":
        shutil.copyfile(source / ONNX_FILE, out / FP32_FILE)
    shutil.copyfile(source / CONFIG_FILE, out / CONFIG_FILE)
    contract = project.contract
    example = example_arrays(project, cfg)
    # The smoke test's expected answer, from the chosen form where it is served.
    served = open_session(out / ONNX_FILE, provider=_provider(project))
    outputs = run_session(served, contract, [t.numpy() for t in example])
    raw = has_raw_hooks(contract)
    payload = (
        served_example(project, cfg, out / ONNX_FILE, example, outputs)
        if raw
        else example_payload(contract, example, outputs)
    )
    write_json(out / EXAMPLE_FILE, payload)
    exported = read_json(source / EXPORT_RECORD_FILE) if (source / EXPORT_RECORD_FILE).is_file() else None
    if exported is not None:
        (judged,) = [j.candidate for j in choice.judged if j.candidate.form == choice.form]
        # Export's checks (two batch sizes, every dynamic axis, parity with torch) ran on the fp32
        # file; optimize ran the same inputs through the chosen form and compared it with fp32.
        record = {
            **exported,
            "onnx_sha256": sha256_of(out / ONNX_FILE),
            "onnx_bytes": (out / ONNX_FILE).stat().st_size,
            "form": choice.form,
            "fp32_sha256": exported["onnx_sha256"],
            "form_parity_max_abs_diff": judged.parity_max_abs_diff,
            "form_parity_tolerance": judged.parity_tolerance,
        }
        write_json(out / EXPORT_RECORD_FILE, record)
    code = served_code(project.root) if raw else []
    precision = _precision(project, choice.form)
    write_layout(contract, project.root / CONTRACT_FILE, out / ONNX_FILE, out, code=code, precision=precision)


def _precision(project: Project, form: str) -> str | None:
    """TensorRT's precision for fp16 on a GPU predictor; None otherwise (an fp32 graph runs on
    Triton's default CUDA provider, as before optimize existed, and the CPU runs any graph as is)."""
    return "FP16" if form == "fp16" and _on_gpu(project) else None
