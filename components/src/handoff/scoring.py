"""Scoring ONNX Runtime sessions on the held-out split, and timing them: what evaluate decides the
gate with and optimize compares its candidate forms with, so both read the same numbers. Also the
training items spread over the split that optimize calibrates on and the reference profile
describes (``training_feeds``).

The split is read batch by batch and never held whole (its inputs, its outputs): a split bigger
than memory is scored in memory that does not grow with it, and any number of sessions are scored
in one pass over it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from handoff.data_hash import data_sha256
from handoff.errors import HandoffError
from handoff.eval_suite import SuiteAccumulator
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
from handoff.onnx_io import check_arrays, run_session
from handoff.project import Project
from handoff.residuals import ResidualSample

LATENCY_WARMUP = 20
LATENCY_RUNS = 300
BATCH = 256  # items per batch read from the held-out split


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


def training_feeds(
    project: Project, cfg: Any, samples: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Up to ``samples`` training items, spread evenly over the split (an iterable split: its first
    items), as feeds of the contract's inputs, checked against the contract as they are read."""
    train_set, _ = call_hook(project.hooks, "build_datasets", cfg)
    picked: Dataset[Any] = train_set
    with user_code(project.hooks, "loading the training split"):
        length = _length(train_set)
        if length == 0:
            raise HandoffError("the training dataset is empty", file=MODEL_FILE, field="build_datasets")
        if length is not None:
            indices = np.linspace(0, length - 1, num=min(samples, length)).round().astype(int)
            picked = Subset(train_set, sorted(set(indices.tolist())))
        loader = iter(DataLoader(picked, batch_size=batch_size))
    names = project.contract.input_names
    seen = 0
    while seen < samples:
        with user_code(project.hooks, "loading the training split"):
            batch = next(loader, None)
        if batch is None:
            return
        inputs, _ = split_batch(batch)
        arrays = [t.numpy() for t in inputs]
        check_arrays(project.contract.inputs, arrays, what="inputs", source="the training dataset")
        seen += len(arrays[0])
        yield dict(zip(names, arrays, strict=True))


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
    """Scoring a rival session (the champion, or an optimized form, scored in the same pass as the
    first) failed with ``error``; ``index`` is its place among the sessions scored."""

    def __init__(self, error: Exception, index: int = 1):
        super().__init__(str(error))
        self.error = error
        self.index = index


@contextlib.contextmanager
def _blamed(index: int) -> Iterator[None]:
    """Errors raised while the outputs of session ``index`` > 0 (a rival) are handled become
    ``RivalFailed``; the first session's pass through as they are."""
    if index == 0:
        yield
        return
    try:
        yield
    except RivalFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - HandoffError, or onnxruntime's own untyped errors
        raise RivalFailed(exc, index) from None


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
    split (``score_all``). What fails on the rival's outputs raises ``RivalFailed``."""
    if rival is None:
        return score_all(project, [session], data)[0], None
    mine, theirs = score_all(project, [session, rival], data)
    return mine, theirs


def score_all(project: Project, sessions: Sequence[Any], data: HeldOut) -> list[Scores]:
    """``score`` for every session in one pass over the split: each batch is read once, run
    through each session, and dropped once its chunk is scored (``handoff.hooks.joined_chunks``;
    its chunks are cut by inputs and targets only, so a session's numbers are the same whatever
    is scored beside it). What fails on the outputs of any session but the first raises
    ``RivalFailed`` naming it; the first's errors pass through as they are."""
    contract = project.contract
    width, scored = len(contract.output_names), contract.scored_output
    runs = [_Running.start(project) for _ in sessions]

    def batches() -> Iterator[Scored]:
        for x, y in data.batches(project):
            arrays = [t.numpy() for t in x]
            check_arrays(contract.inputs, arrays, what="inputs", source="the validation dataset")
            outputs: list[torch.Tensor] = []
            for i, each in enumerate(sessions):
                with _blamed(i):
                    outputs.extend(torch.from_numpy(a) for a in run_session(each, contract, arrays))
            yield tuple(outputs), x, y

    for merged, joined, target in joined_chunks(project.hooks, batches()):
        for i, run in enumerate(runs):
            with _blamed(i):
                run.means.add((merged[i * width : (i + 1) * width], joined, target))
        truth, _ = scored_target(target, contract.task, contract.output_names[scored])
        keys = None
        if hasattr(project.hooks, "slices"):
            keys = [str(k) for k in call_hook(project.hooks, "slices", hook_batch((joined, target)))]
        expected = truth.numpy()
        for i, run in enumerate(runs):
            with _blamed(i):
                run.add(merged[i * width + scored].numpy(), expected, keys)
    scores = []
    for i, run in enumerate(runs):
        with _blamed(i):
            scores.append(run.scores())
    return scores


def measure_latency(
    project: Project, session: Any, example: list[np.ndarray], runs: int = LATENCY_RUNS
) -> np.ndarray:
    """Milliseconds per ``session.run`` at the contract's latency batch size, after a warm-up."""
    size = project.contract.slo.latency_batch_size
    inputs = [np.resize(a, (size, *a.shape[1:])).astype(a.dtype) for a in example]
    for _ in range(LATENCY_WARMUP):
        run_session(session, project.contract, inputs)
    timings = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run_session(session, project.contract, inputs)
        timings[i] = (time.perf_counter() - start) * 1000
    return timings


def measure_latencies(
    project: Project, sessions: Sequence[Any], example: list[np.ndarray], rounds: int = 3
) -> list[list[np.ndarray]]:
    """``measure_latency`` for several sessions, in ``rounds`` interleaved rounds of
    LATENCY_RUNS / rounds runs each (per session, its timings of each round): a burst of other
    work on the machine then lands on every session alike, and a comparison can ask that it holds
    in every round instead of trusting one sequence of runs."""
    per_round = max(1, LATENCY_RUNS // rounds)
    timings: list[list[np.ndarray]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            timings[i].append(measure_latency(project, session, example, runs=per_round))
    return timings
