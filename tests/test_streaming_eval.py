"""Data bigger than memory: the evaluation suite and the researcher's hooks over a split fed batch
by batch equal the same over the whole split in memory; evaluation and training's validation read
map-style and iterable datasets alike, once, holding one chunk at a time; the data fingerprint of
large data comes from its declared identity without reading items, and small data keep their
full-content hash (the values registered before this change)."""

from __future__ import annotations

import gc
import os
import textwrap
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from handoff import eval_suite, hooks
from handoff.data_hash import data_sha256
from handoff.errors import HandoffError
from handoff.eval_suite import SuiteAccumulator, evaluate_outputs
from handoff.plots import residuals_png
from handoff.project import Project
from handoff.residuals import MAX_POINTS, ResidualSample
from handoff.steps.evaluate import BATCH, HeldOut, RivalFailed, score, score_with_rival
from handoff.steps.train import evaluate_torch
from tests.test_hooks_any_model import SETTINGS

pytestmark = pytest.mark.unit

# Batch sizes that cut a split of 203 items evenly and not (a last partial batch), down to one item.
BATCH_SIZES = [1, 7, 64, 203, 500]
N = 203


def batched(size: int, *arrays: Any) -> Iterator[tuple[Any, ...]]:
    for start in range(0, len(arrays[0]), size):
        yield tuple(a[start : start + size] for a in arrays)


def streamed(task: str, size: int, predictions: np.ndarray, targets: np.ndarray, keys: Any = None) -> Any:
    suite = SuiteAccumulator(task)
    columns = (predictions, targets) if keys is None else (predictions, targets, np.asarray(keys))
    for part in batched(size, *columns):
        suite.update(part[0], part[1], None if keys is None else list(part[2]))
    return suite.result()


@pytest.fixture
def unrounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results to 15 decimals, so that 1e-12 comparisons see what rounding to 6 would hide."""
    monkeypatch.setattr(eval_suite, "DECIMALS", 15)


def assert_same(streamed_result: Any, whole: Any, tolerance: float = 1e-12) -> None:
    """Counts exactly; every float within ``tolerance``."""
    assert streamed_result.confusion == whole.confusion
    for name in ("metrics", "per_class", "slices"):
        got, want = getattr(streamed_result, name), getattr(whole, name)
        assert list(got) == list(want), name
        flat_got = got if name == "metrics" else {f"{k}.{m}": v for k, d in got.items() for m, v in d.items()}
        flat_want = (
            want if name == "metrics" else {f"{k}.{m}": v for k, d in want.items() for m, v in d.items()}
        )
        assert flat_got == pytest.approx(flat_want, abs=tolerance, rel=0), name


def classification_cases() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, N)
    targets[targets == 4] = 3  # class 4 never occurs: zero support, no slice
    yield "logits", (rng.normal(size=(N, 5)) * 3).astype(np.float32), targets
    yield "probabilities", rng.dirichlet(np.ones(5), size=N), targets
    yield "one-hot", np.eye(5)[rng.integers(0, 5, N)], targets


def test_scores_are_softmaxed_when_any_batch_is_not_probabilities() -> None:
    """The whole split's decision: probability rows first, logits in the last batch."""
    rng = np.random.default_rng(1)
    predictions = np.concatenate([rng.dirichlet(np.ones(3), size=100), rng.normal(size=(20, 3))])
    targets = rng.integers(0, 3, 120)
    whole = evaluate_outputs("classification", predictions, targets)
    assert streamed("classification", 50, predictions, targets) == whole
    assert streamed("classification", 200, predictions, targets) == whole


def regression_cases() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    truth = rng.normal(loc=1e3, scale=2.0, size=(N, 3))  # a large mean: naive variance would cancel
    yield "one-output", truth[:, 0] + rng.normal(size=N), truth[:, 0]
    yield "three-outputs", truth + rng.normal(size=(N, 3)), truth
    constant = truth.copy()
    constant[:, 1] = 5.0  # R² of a constant target: sklearn's force-finite rules
    predicted = constant + rng.normal(size=(N, 3))
    predicted[:, 2] = constant[:, 2]  # a perfect output
    yield "constant-and-perfect", predicted, constant


def cases() -> Iterator[Any]:
    for name, predictions, targets in classification_cases():
        yield pytest.param("classification", predictions, targets, id=f"classification-{name}")
    for name, predictions, targets in regression_cases():
        yield pytest.param("regression", predictions, targets, id=f"regression-{name}")


@pytest.mark.parametrize("size", BATCH_SIZES)
@pytest.mark.parametrize("sliced", [False, True], ids=["unsliced", "sliced"])
@pytest.mark.parametrize(("task", "predictions", "targets"), list(cases()))
def test_streamed_equals_whole_split(
    task: str, predictions: np.ndarray, targets: np.ndarray, sliced: bool, size: int, unrounded: None
) -> None:
    """Batches of one item, several with a last partial one, and one for all; without slice keys
    (classification is then sliced by class) and with them, out of order, one slice of one item
    (no R²)."""
    keys = ["single" if i == 100 else f"site={i % 3}" for i in range(N)] if sliced else None
    whole = evaluate_outputs(task, predictions, targets, keys)
    assert_same(streamed(task, size, predictions, targets, keys), whole)


def test_the_suite_keeps_counts_not_items() -> None:
    """What an accumulator holds does not grow with the items it has seen."""
    rng = np.random.default_rng(3)
    suite = SuiteAccumulator("classification")
    suite.update(rng.normal(size=(10, 4)), rng.integers(0, 4, 10))
    held = sorted(k for k, v in vars(suite).items() if v is not None)
    for _ in range(50):
        suite.update(rng.normal(size=(1000, 4)), rng.integers(0, 4, 1000))
    assert sorted(k for k, v in vars(suite).items() if v is not None) == held
    assert suite._softmaxed is not None and suite._softmaxed.confusion.shape == (4, 4)
    assert suite.items == 50_010 and int(suite._softmaxed.confusion.sum()) == 50_010


@pytest.mark.parametrize(
    ("task", "batches", "expected"),
    [
        (
            "classification",
            [(np.eye(3), np.arange(3), None), (np.eye(3), np.arange(3), list("abc"))],
            "every batch",
        ),
        (
            "classification",
            [(np.eye(3), np.arange(3), None), (np.eye(4), np.arange(4), None)],
            "same C classes",
        ),
        (
            "regression",
            [(np.zeros((2, 2)), np.zeros((2, 2)), None), (np.zeros(2), np.zeros(2), None)],
            "outputs per",
        ),
        ("regression", [], "no items to evaluate"),
    ],
    ids=["slice-keys-sometimes", "classes-change", "columns-change", "nothing-fed"],
)
def test_batches_that_do_not_fit_together_name_the_contract_field(
    task: str, batches: list, expected: str
) -> None:
    suite = SuiteAccumulator(task)
    with pytest.raises(HandoffError) as caught:
        for predictions, targets, keys in batches:
            suite.update(predictions, targets, keys)
        suite.result()
    assert caught.value.field == "task" and expected in str(caught.value)


# --- the researcher's hooks over chunks ---------------------------------------------------------


def fake_hooks(**extra: Any) -> Any:
    """A model.py stand-in: mean-reduced loss, a mean metric and a count metric."""

    def loss(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.double(), batch[1])

    def metrics(outputs: torch.Tensor, batch: Any) -> dict[str, float]:
        return {"hits": float((outputs.argmax(1) == batch[1]).double().mean())}

    return SimpleNamespace(__file__="model.py", loss=loss, metrics=metrics, **extra)


def split(items: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(items, 4, generator=g),
        torch.randn(items, 3, generator=g),
        torch.randint(0, 3, (items,), generator=g),
    )


@pytest.mark.parametrize("size", BATCH_SIZES)
def test_a_split_that_fits_one_chunk_is_scored_as_a_whole(size: int) -> None:
    x, logits, y = split()
    module = fake_hooks()
    parts = list(batched(size, x, logits, y))
    got = hooks.score_split(
        module, [(o,) for _, o, _ in parts], [(i,) for i, _, _ in parts], [t for *_, t in parts]
    )
    assert got == {"val_loss": float(module.loss(logits, (x, y))), **module.metrics(logits, (x, y))}


@pytest.mark.parametrize("size", [1, 7, 64])
def test_chunks_are_weighted_by_items(size: int) -> None:
    x, logits, y = split()
    module = fake_hooks()
    means = hooks.SplitMeans(module)
    batches = (((o,), (i,), t) for i, o, t in batched(size, x, logits, y))
    for chunk in hooks.joined_chunks(module, batches, chunk_bytes=500):
        means.add(chunk)
    assert means.chunks > 2 and means.items == N
    whole = {"val_loss": float(module.loss(logits, (x, y))), **module.metrics(logits, (x, y))}
    assert means.result() == pytest.approx(whole, abs=1e-12, rel=0)


def test_joined_chunks_hold_one_chunk_at_a_time() -> None:
    """While a chunk is scored, the inputs of every earlier chunk are gone."""
    x, logits, y = split()
    alive: list[weakref.ref[torch.Tensor]] = []
    leaks = []

    def loss(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        gc.collect()
        leaks.append(sum(ref() is not None for ref in alive))
        alive.append(weakref.ref(batch[0]))
        return outputs.sum()

    module = SimpleNamespace(__file__="model.py", loss=loss)
    means = hooks.SplitMeans(module)
    batches = (((o.clone(),), (i.clone(),), t) for i, o, t in batched(10, x, logits, y))
    for chunk in hooks.joined_chunks(module, batches, chunk_bytes=800):  # 33 items of 24 bytes
        means.add(chunk)
    assert len(leaks) > 5 and set(leaks) == {0}


@pytest.mark.parametrize("size", BATCH_SIZES)
def test_chunks_are_cut_at_the_same_items_whatever_the_batch_size_and_outputs(size: int) -> None:
    """A chunk holds as many items as fit in the bytes of inputs and targets (24 per item here),
    cut inside a batch where it ends: the same chunks at any batch size, and with a champion's
    outputs riding along (twice the outputs, the same chunks)."""
    x, logits, y = split()
    module = fake_hooks()
    for outputs in ((logits,), (logits, logits.clone())):
        batches = (((*o,), (i,), t) for i, t, *o in batched(size, x, y, *outputs))
        chunks = list(hooks.joined_chunks(module, batches, chunk_bytes=500))
        assert [hooks.items_in_batch(c[1]) for c in chunks] == [20] * 10 + [3]
        for k, (out, (i,), t) in enumerate(chunks):
            assert torch.equal(i, x[20 * k : 20 * k + 20]) and torch.equal(t, y[20 * k : 20 * k + 20])
            assert all(torch.equal(o, logits[20 * k : 20 * k + 20]) for o in out)


def test_an_empty_split_is_named() -> None:
    with pytest.raises(HandoffError, match="the validation dataset is empty"):
        hooks.SplitMeans(fake_hooks()).result()


class Stream(IterableDataset):
    """An iterable dataset (no length, like shards read from object storage) that counts passes."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors, self.passes = tensors, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.passes += 1
        yield from zip(*self.tensors, strict=True)


@pytest.mark.parametrize("chunk_bytes", [hooks.CHUNK_BYTES, 700])
def test_training_validation_reads_an_iterable_split_as_a_map_style_one(
    chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "CHUNK_BYTES", chunk_bytes)
    x, _, y = split()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    contract = SimpleNamespace(output_names=["logits"])
    stream = Stream(x, y)
    from_stream = evaluate_torch(fake_hooks(), model, DataLoader(stream, batch_size=64), contract)  # type: ignore[arg-type]
    mapped = evaluate_torch(fake_hooks(), model, DataLoader(TensorDataset(x, y), batch_size=64), contract)  # type: ignore[arg-type]
    assert from_stream == mapped and stream.passes == 1
    with torch.no_grad():
        whole = model(x)
    assert mapped["val_loss"] == pytest.approx(float(F.cross_entropy(whole.double(), y)), abs=1e-6)


# --- evaluation of a project ---------------------------------------------------------------------

MODEL_PY = """
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import IterableDataset, TensorDataset


    @dataclass
    class Config:
        seed: int = 0
        iterable: bool = False


    class Stream(IterableDataset):
        passes = 0

        def __init__(self, x, y):
            self.x, self.y = x, y

        def __iter__(self):
            Stream.passes += 1
            yield from zip(self.x, self.y)


    def _data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(700, 8, generator=g), torch.randint(0, 3, (700,), generator=g)


    def build_datasets(cfg):
        x, y = _data()
        return TensorDataset(x, y), (Stream(x, y) if cfg.iterable else TensorDataset(x, y))


    def build_model(cfg):
        torch.manual_seed(cfg.seed)
        return nn.Linear(8, 3)


    def loss(outputs, batch):
        return F.cross_entropy(outputs.double(), batch[1])


    def metrics(outputs, batch):
        return {"hits": float((outputs.argmax(1) == batch[1]).double().mean())}


    def slices(batch):
        return ["even" if int(v) % 2 == 0 else "odd" for v in batch[1]]


    def example_inputs(cfg):
        return _data()[0][:4]
"""


@pytest.fixture
def project(tmp_path: Path) -> Project:
    import yaml

    root = tmp_path / "any-model"
    root.mkdir()
    (root / "handoff.yaml").write_text(SETTINGS)
    (root / "model.py").write_text(textwrap.dedent(MODEL_PY).lstrip())
    contract = {
        "name": "any-model",
        "task": "classification",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 3]}],
        "slo": {"latency_p99_ms": 200, "min_metrics": {}, "parity_tolerance": 1e-4},
        "owners": {"research": "someone", "engineering": "platform-team"},
    }
    (root / "contract.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
    return Project.load(root)


class TorchSession:
    """What evaluate needs of an ONNX Runtime session (``run``), over a torch model."""

    def __init__(self, seed: int, fail_after: int | None = None):
        torch.manual_seed(seed)
        self.model, self.runs, self.fail_after = torch.nn.Linear(8, 3), 0, fail_after

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        if self.fail_after is not None and self.runs > self.fail_after:
            raise RuntimeError("input 'x' has the wrong shape")
        with torch.no_grad():
            return [self.model(torch.from_numpy(feeds["x"])).numpy()]


def in_memory(project: Project, session: TorchSession) -> dict[str, float]:
    """The definition before streaming: every batch's outputs kept, then scored as one split."""
    x, y = project.hooks._data()  # type: ignore[attr-defined]
    parts = [session.run(["logits"], {"x": part.numpy()})[0] for (part,) in batched(BATCH, x)]
    logits = torch.from_numpy(np.concatenate(parts))
    keys = project.hooks.slices((x, y))  # type: ignore[attr-defined]
    suite = evaluate_outputs("classification", logits.numpy(), y.numpy(), keys)
    own = {"val_loss": float(project.hooks.loss(logits, (x, y))), **project.hooks.metrics(logits, (x, y))}  # type: ignore[attr-defined]
    return {**own, **suite.metrics}


@pytest.mark.parametrize("iterable", [False, True], ids=["map-style", "iterable"])
@pytest.mark.parametrize("chunk_bytes", [hooks.CHUNK_BYTES, 4096], ids=["one-chunk", "many-chunks"])
def test_evaluation_scores_map_style_and_iterable_splits_as_the_whole_split(
    project: Project, iterable: bool, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "CHUNK_BYTES", chunk_bytes)
    cfg = project.config({"iterable": iterable})
    scores = score(project, TorchSession(0), HeldOut.load(project, cfg))
    expected = in_memory(project, TorchSession(0))
    assert scores.samples == 700 and list(scores.slices) == ["even", "odd"]
    if chunk_bytes == hooks.CHUNK_BYTES:
        assert scores.metrics == expected
    else:  # the suite's counts are exact; the hooks' chunk means agree to float64 rounding
        assert scores.metrics == pytest.approx(expected, abs=1e-12, rel=0)


def test_the_champion_is_scored_in_the_challengers_pass(project: Project) -> None:
    cfg = project.config({"iterable": True})
    data = HeldOut.load(project, cfg)
    stream = project.hooks.Stream  # type: ignore[attr-defined]
    before = stream.passes
    mine, theirs = score_with_rival(project, TorchSession(0), TorchSession(1), data)
    assert stream.passes == before + 1
    assert theirs is not None
    assert mine == score(project, TorchSession(0), data)
    assert theirs == score(project, TorchSession(1), data)


def test_gated_numbers_are_the_same_with_a_champion_and_in_training(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A split of several chunks: the challenger's val_loss and metrics() do not change when a
    champion is scored in the same pass, and training's validation (other batch sizes, torch
    outputs) cuts the chunks evaluation cuts. ``chunk`` reports a chunk's items, so its mean over
    chunks (weighted by items) tells the cuts apart."""
    monkeypatch.setattr(hooks, "CHUNK_BYTES", 15_000)  # 375 items of 40 bytes: chunks of 375, 325

    own = project.hooks.metrics  # type: ignore[attr-defined]

    def chunk_metrics(outputs: torch.Tensor, batch: Any) -> dict[str, float]:
        return {"chunk": float(len(batch[1])), **own(outputs, batch)}

    monkeypatch.setattr(project.hooks, "metrics", chunk_metrics)
    cfg = project.config({"iterable": True})
    data = HeldOut.load(project, cfg)
    alone = score(project, TorchSession(0), data).metrics
    assert alone["chunk"] == pytest.approx((375**2 + 325**2) / 700)
    mine, _ = score_with_rival(project, TorchSession(0), TorchSession(1), data)
    assert mine.metrics == alone
    names = ("val_loss", "chunk", "hits")
    for size in (64, 300, 700):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        loader = DataLoader(project.hooks.build_datasets(cfg)[1], batch_size=size)  # type: ignore[attr-defined]
        trained = evaluate_torch(project.hooks, model, loader, project.contract)
        assert trained["chunk"] == alone["chunk"]
        assert {n: trained[n] for n in names} == pytest.approx({n: alone[n] for n in names}, abs=1e-6)


def test_a_champion_that_fails_midway_is_told_apart_from_the_challenger(project: Project) -> None:
    data = HeldOut.load(project, project.config())
    with pytest.raises(RivalFailed, match="wrong shape"):
        score_with_rival(project, TorchSession(0), TorchSession(1, fail_after=1), data)
    with pytest.raises(RuntimeError, match="wrong shape"):
        score_with_rival(project, TorchSession(0, fail_after=1), TorchSession(1), data)


def test_residuals_of_a_big_split_are_an_even_sample_of_bounded_size() -> None:
    sample = ResidualSample()
    predictions = np.arange(1_000_003, dtype=np.float64)
    for part in batched(4099, predictions):
        sample.add(part[0], part[0] + 1)
    kept, truth = sample.arrays()
    assert sample.items == 1_000_003 and MAX_POINTS <= len(kept) <= 2 * MAX_POINTS
    assert np.all(np.diff(kept[:, 0]) == sample.stride) and kept[0, 0] == 0
    assert np.all(truth - kept == 1)


def test_residuals_of_a_split_that_fits_are_drawn_from_every_item() -> None:
    rng = np.random.default_rng(4)
    predictions, targets = rng.normal(size=(2 * MAX_POINTS, 2)), rng.normal(size=(2 * MAX_POINTS, 2))
    sample = ResidualSample()
    for part in batched(333, predictions, targets):
        sample.add(*part)
    assert residuals_png(*sample.arrays(), items=sample.items) == residuals_png(predictions, targets)


# --- the data fingerprint ----------------------------------------------------------------------------

X = torch.arange(24, dtype=torch.float32).reshape(6, 4)
Y = torch.tensor([0, 1, 2, 0, 1, 2])


class Items(Dataset):
    """A map-style dataset that is not a TensorDataset (read item by item)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> Any:
        return X[i], {"label": Y[i], "weight": float(i)}


class Unread(Dataset):
    """Fails when an item is read: a declared identity must spare the read."""

    def __init__(self, files: list[Any] | None = None, length: int = 10**9):
        self.files, self.length = files, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        raise AssertionError("an item was read")

    def data_manifest(self) -> list[Any]:
        assert self.files is not None
        return self.files


def test_small_data_keep_the_content_hash_registered_before() -> None:
    """The values HEAD computed for the same items: registered tags stay comparable."""
    assert (
        data_sha256(TensorDataset(X, Y)) == "a0558b62e19b4caf4237008e653dc5f50cacdcb34a215c34c6edc48dc1dfa829"
    )
    assert data_sha256(TensorDataset(X, Y), Items()) == (
        "0061a6cc074643bb6c34e84dfe2bdb0d9a593e08c5d42c03075f44078cfb5c61"
    )


def test_an_iterable_split_is_hashed_by_its_items() -> None:
    first = data_sha256(Stream(X, Y))
    assert data_sha256(Stream(X, Y)) == first
    assert data_sha256(Stream(X[:5], Y[:5])) != first
    changed = X.clone()
    changed[3, 2] = -1
    assert data_sha256(Stream(changed, Y)) != first


def test_a_declared_data_version_is_the_fingerprint_and_reads_nothing() -> None:
    v1 = data_sha256(Unread(), Unread(), version="imagenet@2024-05")
    assert v1 == data_sha256(Unread(), Unread(), version="imagenet@2024-05")
    assert v1 != data_sha256(Unread(), Unread(), version="imagenet@2024-06")
    assert v1 != data_sha256(Unread(), version="imagenet@2024-05")  # the held-out split's own


def test_a_data_version_fingerprint_names_which_split_and_its_length() -> None:
    """The same version string over another split (a changed fraction: another length; the held-out
    split in another place) is other data; an iterable split adds nothing, and is not read."""
    version = "imagenet@2024-05"
    held_out = data_sha256(Unread(length=200), version=version)
    assert held_out == data_sha256(Unread(length=200), version=version)
    assert held_out != data_sha256(Unread(length=300), version=version)
    both = data_sha256(Unread(length=800), Unread(length=200), version=version)
    assert both != data_sha256(Unread(length=200), Unread(length=800), version=version)
    assert both != data_sha256(Unread(length=700), Unread(length=300), version=version)
    stream = Stream(X, Y)
    assert data_sha256(stream, version=version) == data_sha256(Stream(X[:5], Y[:5]), version=version)
    assert data_sha256(stream, version=version) not in (held_out, data_sha256(Unread(), version=version))
    assert stream.passes == 0


def test_data_version_must_name_a_version() -> None:
    for bad in ("", None, 3):
        module = SimpleNamespace(__file__="model.py", data_version=lambda cfg, bad=bad: bad)
        with pytest.raises(HandoffError) as caught:
            hooks.data_version(module, None)  # type: ignore[arg-type]
        assert caught.value.field == "data_version"
    assert hooks.data_version(SimpleNamespace(__file__="model.py"), None) is None  # type: ignore[arg-type]


def test_a_manifest_names_and_sizes_its_files_and_reads_no_item(tmp_path: Path) -> None:
    """Names relative to the files' folder and sizes, not times: the same shards downloaded again
    (or copied elsewhere) are the same data; a file of another size, or one file fewer, is not."""
    shards = tmp_path / "data"
    shards.mkdir()
    files = []
    for i in range(3):
        files.append(shards / f"shard-{i:05d}.npy")
        files[-1].write_bytes(bytes(100 + i))
        os.utime(files[-1], ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    first = data_sha256(Unread(files))
    assert data_sha256(Unread([str(f) for f in files])) == first

    moved = tmp_path / "elsewhere"
    (shards).rename(moved)  # the same files in another folder: the same data
    files = [moved / f.name for f in files]
    assert data_sha256(Unread(files)) == first

    for f in files:  # downloaded again: the same bytes, new modification times
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(1_800_000_000_000_000_000, 1_800_000_000_000_000_000))
    assert data_sha256(Unread(files)) == first
    files[2].write_bytes(bytes(7))
    resized = data_sha256(Unread(files))
    assert resized != first
    assert data_sha256(Unread(files[:2])) not in (first, resized)
    renamed = files[1].rename(moved / "shard-renamed.npy")
    assert data_sha256(Unread([files[0], renamed, files[2]])) not in (first, resized)


def test_a_manifest_of_remote_entries_and_its_mistakes(tmp_path: Path) -> None:
    listing = [("s3://bucket/shard-0.tar", 1 << 30, "etag-a"), ("s3://bucket/shard-1.tar", 1 << 30, "etag-b")]
    first = data_sha256(Unread(listing))
    assert first == data_sha256(Unread(list(listing)))
    assert first != data_sha256(Unread([listing[0], (*listing[1][:2], "etag-c")]))
    with pytest.raises(HandoffError, match="cannot be read") as missing:
        data_sha256(Unread([tmp_path / "gone.npy"]))
    assert "gone.npy" in str(missing.value) and missing.value.field == "build_datasets"
    with pytest.raises(HandoffError, match="local file paths or tuples of plain values"):
        data_sha256(Unread([{"url": "s3://bucket/a"}]))
