"""evaluate: measure what will be served (the ONNX model in ONNX Runtime) and decide the gate.

The shared evaluation suite (task-aware metrics, per-class results, slices) and the researcher's
own ``metrics`` hook are computed over the whole held-out split, on ONNX Runtime's outputs, in one
pass that reads the split batch by batch and keeps running counts, never the split itself (its
inputs, its outputs): a split bigger than memory is scored in memory that does not grow with it.
Latency is measured at the contract's batch size. The gate holds every SLO in the contract and,
when the registry has a champion, compares against it on the same data: the held-out split's
fingerprint is recorded (register tags the version with it), a champion evaluated on another
split is not compared at all, and one evaluated on this split is scored in the same pass. The
readiness report (Markdown + self-contained HTML, with plots) lists the checklist with its
evidence.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from handoff import readiness
from handoff.artifacts import CONFIG_FILE, EXPORT_RECORD_FILE, ONNX_FILE
from handoff.contract_examples import example_arrays
from handoff.data_hash import data_sha256
from handoff.errors import HandoffError
from handoff.eval_suite import SuiteAccumulator
from handoff.files import read_json, sha256_of
from handoff.gates import Champion, Gate, absolute_checks, decide, relative_checks
from handoff.hooks import (
    MODEL_FILE,
    Scored,
    SplitMeans,
    call_hook,
    data_version,
    hook_batch,
    joined_chunks,
    scored_target,
    split_batch,
    user_code,
)
from handoff.lineage import HELDOUT_TAG
from handoff.onnx_io import check_arrays, open_session, run_session
from handoff.project import Project
from handoff.readiness import ReadinessItem
from handoff.residuals import ResidualSample

LATENCY_WARMUP = 20
LATENCY_RUNS = 300
BATCH = 256  # items per batch read from the held-out split


@dataclass(frozen=True)
class EvalResult:
    """What will be served, measured: metrics, latency, the gate, and the readiness checklist."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    slices: dict[str, dict[str, float]]
    latency_p50_ms: float
    latency_p99_ms: float
    latency_batch_size: int
    model_size_mb: float
    champion: Champion | None
    gate: Gate
    readiness: list[ReadinessItem]
    report: str  # the readiness report's folder ('' when none was written)
    samples: int
    # handoff.data_hash of the held-out split: register tags the version with it (HELDOUT_TAG), so
    # a later challenger is compared with this model only on these same items.
    heldout_sha256: str
    seconds: float


@dataclass(frozen=True)
class HeldOut:
    """The held-out split, read batch by batch each time it is scored (never held whole), for the
    challenger and the champion alike; ``sha256`` names its items (``handoff.data_hash``), so two
    evaluations can tell whether they saw the same. Map-style and iterable datasets alike."""

    dataset: Dataset[Any]
    sha256: str

    @classmethod
    def load(cls, project: Project, cfg: Any) -> HeldOut:
        _, val_set = call_hook(project.hooks, "build_datasets", cfg)
        with user_code(project.hooks, "loading the validation split"):
            empty = _length(val_set) == 0
        if empty:
            raise HandoffError("the validation dataset is empty", file=MODEL_FILE, field="build_datasets")
        with user_code(project.hooks, "hashing the validation split"):
            sha256 = data_sha256(val_set, version=data_version(project.hooks, cfg))
        return cls(val_set, sha256)

    def batches(self, project: Project) -> Iterator[tuple[tuple[torch.Tensor, ...], Any]]:
        """The split's batches, ``(inputs, target)``, read as they are asked for."""
        what = "loading the validation split"
        with user_code(project.hooks, what):
            loader = iter(DataLoader(self.dataset, batch_size=BATCH))
        while True:
            with user_code(project.hooks, what):
                batch = next(loader, None)
            if batch is None:
                return
            yield split_batch(batch)


def _length(dataset: Dataset[Any]) -> int | None:
    """Items in a map-style dataset; None for an iterable one (it may define no length)."""
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass(frozen=True)
class Scores:
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    slices: dict[str, dict[str, float]]
    samples: int  # held-out items scored
    # What the suite scored (the contract's task.output and its target), evenly sampled, for the
    # residual plot of a regression model; None for classification.
    residuals: ResidualSample | None


class RivalFailed(Exception):
    """Scoring the rival session (the champion, scored in the same pass) failed with ``error``."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _blamed(rival: bool) -> Iterator[None]:
    """Errors raised while a rival's outputs are handled become ``RivalFailed``; the challenger's
    pass through as they are."""
    if not rival:
        yield
        return
    try:
        yield
    except RivalFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - HandoffError, or onnxruntime's own untyped errors
        raise RivalFailed(exc) from None


@dataclass
class _Running:
    """One model's running scores over the split: its hooks' values, the suite, the residuals."""

    means: SplitMeans
    suite: SuiteAccumulator
    residuals: ResidualSample | None

    @classmethod
    def start(cls, project: Project) -> _Running:
        contract = project.contract
        regression = contract.task_type == "regression"
        return cls(
            SplitMeans(project.hooks, contract.output_names),
            SuiteAccumulator(contract.task_type),
            ResidualSample() if regression else None,
        )

    def add(self, predicted: np.ndarray, expected: np.ndarray, keys: list[str] | None) -> None:
        self.suite.update(predicted, expected, keys)
        if self.residuals is not None:
            self.residuals.add(predicted, expected)

    def scores(self) -> Scores:
        own = self.means.result()
        suite = self.suite.result()
        return Scores(
            {**own, **suite.metrics},
            suite.per_class,
            suite.confusion,
            suite.slices,
            self.means.items,
            self.residuals,
        )


def score(project: Project, session: Any, data: HeldOut) -> Scores:
    """The suite's metrics and the researcher's additions (the suite's win a name clash, so every
    project's gate reads the same definition of accuracy, F1 and RMSE).

    The suite scores the contract's ``task.output`` against the target ``task.target`` picks.
    """
    return score_with_rival(project, session, None, data)[0]


def score_with_rival(
    project: Project, session: Any, rival: Any, data: HeldOut
) -> tuple[Scores, Scores | None]:
    """``score`` for ``session`` and, when given, ``rival`` (the champion), in one pass over the
    split: each batch is read once, run through both, and dropped once its chunk is scored
    (``handoff.hooks.joined_chunks``; its chunks are cut by inputs and targets only, so the
    challenger's numbers are the same with a rival as without). What fails on the rival's outputs
    raises ``RivalFailed``."""
    contract = project.contract
    width, scored = len(contract.output_names), contract.scored_output
    sessions = [session] if rival is None else [session, rival]
    runs = [_Running.start(project) for _ in sessions]

    def batches() -> Iterator[Scored]:
        for x, y in data.batches(project):
            arrays = [t.numpy() for t in x]
            check_arrays(contract.inputs, arrays, what="inputs", source="the validation dataset")
            outputs: list[torch.Tensor] = []
            for i, each in enumerate(sessions):
                with _blamed(i > 0):
                    outputs.extend(torch.from_numpy(a) for a in run_session(each, contract, arrays))
            yield tuple(outputs), x, y

    for merged, joined, target in joined_chunks(project.hooks, batches()):
        for i, run in enumerate(runs):
            with _blamed(i > 0):
                run.means.add((merged[i * width : (i + 1) * width], joined, target))
        truth, _ = scored_target(target, contract.task, contract.output_names[scored])
        keys = None
        if hasattr(project.hooks, "slices"):
            keys = [str(k) for k in call_hook(project.hooks, "slices", hook_batch((joined, target)))]
        expected = truth.numpy()
        for i, run in enumerate(runs):
            with _blamed(i > 0):
                run.add(merged[i * width + scored].numpy(), expected, keys)
    mine, theirs = runs[0].scores(), None
    if rival is not None:
        with _blamed(True):
            theirs = runs[1].scores()
    return mine, theirs


def measure_latency(project: Project, session: Any, example: list[np.ndarray]) -> np.ndarray:
    """Milliseconds per ``session.run`` at the contract's latency batch size, after a warm-up."""
    size = project.contract.slo.latency_batch_size
    inputs = [np.resize(a, (size, *a.shape[1:])).astype(a.dtype) for a in example]
    for _ in range(LATENCY_WARMUP):
        run_session(session, project.contract, inputs)
    timings = np.empty(LATENCY_RUNS)
    for i in range(LATENCY_RUNS):
        start = time.perf_counter()
        run_session(session, project.contract, inputs)
        timings[i] = (time.perf_counter() - start) * 1000
    return timings


def find_champion(project: Project, data: HeldOut) -> tuple[Champion | None, Any]:
    """The registry's champion (None when there is none yet) and, when it is to be scored on
    ``data``, an ONNX Runtime session of it (scored in the challenger's pass over the split).

    A champion evaluated on another held-out split (its ``handoff.heldout_sha256`` tag) is not
    scored: these items may be ones it was trained on, and the gate says so.
    """
    from handoff.registry import fetch_model
    from handoff.tracking import CHAMPION, alias_version, use_tracking

    name = project.contract.name
    client = use_tracking(project)
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None, None  # no such model or alias yet: the first model bootstraps
    split = client.get_model_version(name, version).tags.get(HELDOUT_TAG)
    found = Champion(name, version, {}, split)
    if split is not None and split != data.sha256:
        return found, None
    local = fetch_model(project, name, version)
    try:
        return found, open_session(local / ONNX_FILE)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own untyped errors
        raise not_comparable(found, exc) from None


def not_comparable(champion: Champion, error: Exception) -> HandoffError:
    """A champion that cannot be scored on this data (its contract's inputs differ) is reported as
    not comparable rather than silently passed: the error names the version."""
    from handoff.tracking import CHAMPION

    name, version = champion.name, champion.version
    return HandoffError(
        f"the champion {name} v{version} could not be scored on this held-out data, so the "
        f"relative gate cannot compare ({error}); if the contract changed on purpose, remove "
        f"the alias first: MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r})"
    )


def evaluate(
    project_dir: Path | str,
    model_dir: Path | str,
    *,
    report_dir: Path | str | None = None,
    training_run_id: str = "",
) -> EvalResult:
    """Evaluate ``model_dir/model.onnx`` on the held-out split, decide the gate, write the report."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    model_dir = Path(model_dir)
    cfg = project.config_from_dict(read_json(model_dir / CONFIG_FILE))
    session = open_session(model_dir / ONNX_FILE)
    watched = readiness.ContractWatch(session, project.contract)  # what "Contract satisfied" reports
    data = HeldOut.load(project, cfg)
    champion, rival = find_champion(project, data)
    try:
        scores, rival_scores = score_with_rival(project, watched, rival, data)
    except RivalFailed as failed:
        assert champion is not None
        raise not_comparable(champion, failed.error) from None
    if champion is not None and rival_scores is not None:
        champion = Champion(champion.name, champion.version, rival_scores.metrics, champion.heldout_sha256)
    timings = measure_latency(project, session, [t.numpy() for t in example_arrays(project, cfg)])
    p50, p99 = float(np.percentile(timings, 50)), float(np.percentile(timings, 99))
    size_mb = (model_dir / ONNX_FILE).stat().st_size / 1e6
    slo = project.contract.slo
    export_record = model_dir / EXPORT_RECORD_FILE
    export = read_json(export_record) if export_record.is_file() else None
    onnx_sha256 = sha256_of(model_dir / ONNX_FILE)
    # Every scored batch passed the input check (score_with_rival raises on the first that fails).
    contract_checks = (readiness.heldout_inputs_check(scores.samples), *watched.checks())
    gate = decide(
        [
            readiness.contract_gate(export, onnx_sha256, contract_checks),
            *absolute_checks(slo, scores.metrics, p99, size_mb),
            *relative_checks(slo, scores.metrics, champion, data.sha256),
        ]
    )
    evidence = readiness.Evidence(
        project=project,
        metrics=scores.metrics,
        gate=gate,
        export=export,
        onnx_sha256=onnx_sha256,
        contract_checks=contract_checks,
        training_run_id=training_run_id,
        cfg=cfg,
    )
    items = readiness.assess(evidence)
    report = ""
    if report_dir is not None:
        pictures = readiness.pictures(
            project,
            scores.confusion,
            timings,
            slo.latency_p99_ms,
            training_run_id,
            scores.residuals.arrays() if scores.residuals else None,
            scores.samples,
        )
        readiness.write_report(Path(report_dir), evidence, items, pictures, scores.per_class, scores.slices)
        report = str(report_dir)
    return EvalResult(
        metrics=scores.metrics,
        per_class=scores.per_class,
        confusion=scores.confusion,
        slices=scores.slices,
        latency_p50_ms=round(p50, 4),
        latency_p99_ms=round(p99, 4),
        latency_batch_size=slo.latency_batch_size,
        model_size_mb=round(size_mb, 4),
        champion=champion,
        gate=gate,
        readiness=items,
        report=report,
        samples=scores.samples,
        heldout_sha256=data.sha256,
        seconds=round(time.perf_counter() - started, 3),
    )
