"""Benchmark: evaluation's peak memory and throughput on a held-out split bigger than it should hold.

A held-out split of image-sized items (3x32x32 float32, 12 KiB each) is generated on disk as raw
shard files of 64 MiB, 1 GiB of them, and a 0.25 GiB split is the first quarter of the same
shards. The project's dataset reads one item at a time from the files (``os.pread``, no mmap, so
what a process holds is what it asked for) and lists its shards in ``data_manifest()``; the model
is one linear layer in ONNX Runtime, so what is measured is the data path, not the model.

Each run is its own process doing what the evaluate step does with the held-out split:
``HeldOut.load`` (the split's fingerprint) then ``score`` (the suite and model.py's loss and
metrics over ONNX Runtime's outputs); the rest of the step (latency, registry, report) does not
depend on the split. "today" runs the same two calls from the library as it was before streaming
evaluation (``--baseline``, a commit of this repository, extracted with ``git archive``):
every batch kept, inputs included, then joined and scored, and every item read again for the
fingerprint. "streaming" runs this checkout's; at the largest size also over the same items as an
iterable dataset, and as a dataset without ``data_manifest()`` (fingerprinted by reading every
item, as small data are). Peak RSS is the process's ``ru_maxrss`` (imports included; "after
imports" is what the process held before the split was touched).

Usage: python bench/eval_memory.py [--sizes 0.25 1] [--repeats 1] [--baseline REV | --baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The last commit before evaluation streamed its held-out split.
BASELINE = "e38aadb04fe606863486f4b05a028845a2074b31"
SHAPE = (3, 32, 32)
ITEM_BYTES = 4 * 3 * 32 * 32
PER_SHARD = (64 << 20) // ITEM_BYTES
CLASSES = 10

MODEL_PY = f'''
    """The evaluation memory bench's project: image-sized items in raw shard files, read one at a
    time, and a linear classifier."""

    import json
    import os
    from dataclasses import dataclass
    from pathlib import Path

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import Dataset, IterableDataset, TensorDataset

    SHAPE = {SHAPE}
    ITEM_BYTES = {ITEM_BYTES}


    @dataclass
    class Config:
        data_dir: str = ""
        dataset: str = "shards"  # or "stream" (iterable), "unlisted" (no manifest: hashed item by item)
        seed: int = 0


    class Shards(Dataset):
        def __init__(self, folder):
            meta = json.loads((Path(folder) / "meta.json").read_text())
            self.files = [(Path(folder) / name).resolve() for name in meta["shards"]]
            self.per_shard, self.items = meta["per_shard"], meta["items"]
            self.labels = np.load(Path(folder) / meta["labels"])[: self.items]  # 8 bytes an item
            self.fds = {{}}

        def __len__(self):
            return self.items

        def __getitem__(self, i):
            shard, row = divmod(i, self.per_shard)
            if shard not in self.fds:
                self.fds[shard] = os.open(self.files[shard], os.O_RDONLY)
            raw = bytearray(os.pread(self.fds[shard], ITEM_BYTES, row * ITEM_BYTES))
            image = torch.from_numpy(np.frombuffer(raw, np.float32).reshape(SHAPE))
            return image, torch.tensor(int(self.labels[i]))

        def data_manifest(self):
            return self.files


    class Unlisted(Shards):
        data_manifest = None


    class ShardStream(IterableDataset):
        """The same items as an iterable dataset (no length), as a stream of shards would be."""

        def __init__(self, folder):
            self.shards = Shards(folder)

        def __iter__(self):
            for i in range(len(self.shards)):
                yield self.shards[i]

        def data_manifest(self):
            return self.shards.data_manifest()


    def build_datasets(cfg):
        val = {{"shards": Shards, "stream": ShardStream, "unlisted": Unlisted}}[cfg.dataset](cfg.data_dir)
        return TensorDataset(torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long)), val


    def build_model(cfg):
        torch.manual_seed(cfg.seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(SHAPE)), {CLASSES}))


    def loss(outputs, batch):
        return F.cross_entropy(outputs, batch[1])


    def metrics(outputs, batch):
        return {{"accuracy_own": (outputs.argmax(dim=1) == batch[1]).float().mean().item()}}


    def example_inputs(cfg):
        return Shards(cfg.data_dir)[0][0][None]
'''


def write_project(folder: Path, version: str) -> None:
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(textwrap.dedent(MODEL_PY).lstrip())
    settings = {
        "project": "eval-bench",
        "template_version": version,
        "orchestrator": "kfp",
        "image": f"registry.example.com/ml/eval-bench:{version}",
        "namespace": "ml-models",
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "eval-bench"},
    }
    (folder / "handoff.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    contract = {
        "name": "eval-bench",
        "task": "classification",
        "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, *SHAPE]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, CLASSES]}],
        "slo": {"latency_p99_ms": 200, "min_metrics": {}, "parity_tolerance": 1e-4},
        "owners": {"research": "bench", "engineering": "platform-team"},
    }
    (folder / "contract.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))


def write_onnx(path: Path) -> None:
    """Flatten then one linear layer (Gemm), weights from a fixed seed: the model is not the point."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    features = int(np.prod(SHAPE))
    weight = (rng.standard_normal((CLASSES, features)) / np.sqrt(features)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"], transB=1),
        ],
        "eval-bench",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.zeros(CLASSES, np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def write_data(folder: Path, sizes: list[float]) -> dict[float, Path]:
    """Shards for the largest size; one folder per size whose meta.json lists a prefix of them."""
    shards = folder / "shards"
    shards.mkdir(parents=True)
    largest = round(max(sizes) * (1 << 30) / ITEM_BYTES)
    count = -(-largest // PER_SHARD)
    rng = np.random.default_rng(1)
    for i in range(count):
        rows = min(PER_SHARD, largest - i * PER_SHARD)
        rng.standard_normal((rows, ITEM_BYTES // 4), dtype=np.float32).tofile(shards / f"shard-{i:05d}.bin")
    np.save(shards / "labels.npy", rng.integers(0, CLASSES, largest))
    folders = {}
    for size in sizes:
        items = round(size * (1 << 30) / ITEM_BYTES)
        names = [f"../shards/shard-{i:05d}.bin" for i in range(-(-items // PER_SHARD))]
        split = folder / f"split-{size:g}GiB"
        split.mkdir()
        meta = {"shards": names, "per_shard": PER_SHARD, "items": items, "labels": "../shards/labels.npy"}
        (split / "meta.json").write_text(json.dumps(meta))
        folders[size] = split
    return folders


def baseline_source(revision: str, into: Path) -> Path:
    """``components/src`` as it was at ``revision`` (the library before streaming evaluation)."""
    archive = into / "baseline.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "components/src"],
            stdout=out,
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline" / "components" / "src"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(project: Path, onnx_path: Path, data: Path, dataset: str) -> None:
    """One run, in whatever ``handoff`` PYTHONPATH gives: the held-out split loaded and scored."""
    from handoff.onnx_io import open_session
    from handoff.project import Project
    from handoff.steps.evaluate import HeldOut, score

    loaded = Project.load(project)
    cfg = loaded.config({"data_dir": str(data), "dataset": dataset})
    session = open_session(onnx_path)
    imported = peak_mb()
    started = time.perf_counter()
    held = HeldOut.load(loaded, cfg)
    fingerprinted = time.perf_counter()
    scores = score(loaded, session, held)
    scored = time.perf_counter()
    samples = getattr(scores, "samples", None) or held.samples
    print(
        json.dumps(
            {
                "items": samples,
                "load_s": fingerprinted - started,
                "score_s": scored - fingerprinted,
                "imported_mb": imported,
                "peak_mb": peak_mb(),
                "metrics": scores.metrics,
            }
        )
    )


def run(source: Path, project: Path, onnx_path: Path, data: Path, dataset: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", str(project), str(onnx_path), str(data), dataset]
    result = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise SystemExit(f"run failed ({source}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0], help="held-out sizes in GiB")
    parser.add_argument("--baseline", default=BASELINE, help="commit of the library to compare with")
    parser.add_argument("--baseline-src", type=Path, help="a components/src folder instead of --baseline")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating (medians)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        project, onnx_path, data, dataset = args.child
        child(Path(project), Path(onnx_path), Path(data), dataset)
        return

    from handoff import __version__

    with tempfile.TemporaryDirectory(prefix="eval-memory-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        today = args.baseline_src or baseline_source(args.baseline, work)
        streaming = ROOT / "components" / "src"
        write_project(work / "project", __version__)
        write_onnx(work / "model.onnx")
        folders = write_data(work / "data", args.sizes)
        print(f"data written in {time.perf_counter() - started:.1f} s", flush=True)
        results: dict[tuple[float, str], list[dict[str, Any]]] = {}
        for _ in range(args.repeats):
            for size in sorted(args.sizes):
                runs = [("today", today, "shards"), ("streaming", streaming, "shards")]
                if size == max(args.sizes):
                    runs.append(("streaming, iterable", streaming, "stream"))
                    runs.append(("streaming, no manifest", streaming, "unlisted"))
                for name, source, dataset in runs:
                    result = run(source, work / "project", work / "model.onnx", folders[size], dataset)
                    results.setdefault((size, name), []).append(result)
                    shown = {k: v for k, v in result.items() if k != "metrics"}
                    print(f"{size:g} GiB {name}: {json.dumps(shown)}", flush=True)
        report([(size, name, combined(runs)) for (size, name), runs in results.items()])


def combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds and the highest peak over the repeats."""
    return {
        **runs[0],
        "load_s": statistics.median(r["load_s"] for r in runs),
        "score_s": statistics.median(r["score_s"] for r in runs),
        "peak_mb": max(r["peak_mb"] for r in runs),
        "imported_mb": max(r["imported_mb"] for r in runs),
    }


def report(rows: list[tuple[float, str, dict[str, Any]]]) -> None:
    print()
    print("| held-out | run | items | fingerprint s | score s | items/s | peak RSS MB | after imports MB |")
    print("|---|---|---|---|---|---|---|---|")
    for size, name, r in rows:
        rate = r["items"] / (r["load_s"] + r["score_s"])
        print(
            f"| {size:g} GiB | {name} | {r['items']} | {r['load_s']:.2f} | {r['score_s']:.2f} | {rate:,.0f} "
            f"| {r['peak_mb']:,.0f} | {r['imported_mb']:,.0f} |"
        )
    print()
    for size in sorted({size for size, _, _ in rows}):
        by = {name: r for s, name, r in rows if s == size}
        today, streaming = by["today"], by["streaming"]
        rate = [r["items"] / (r["load_s"] + r["score_s"]) for r in (today, streaming)]
        differences = {
            k: abs(today["metrics"][k] - streaming["metrics"][k])
            for k in today["metrics"]
            if k in streaming["metrics"]
        }
        worst = max(differences, key=lambda k: differences[k])
        print(
            f"{size:g} GiB: peak RSS today / streaming {today['peak_mb'] / streaming['peak_mb']:.2f}x; "
            f"held {today['peak_mb'] - today['imported_mb']:,.0f} MB vs "
            f"{streaming['peak_mb'] - streaming['imported_mb']:,.0f} MB beyond imports; "
            f"throughput streaming / today {rate[1] / rate[0]:.2f}x; "
            f"largest metric difference {differences[worst]:.2g} ({worst})"
        )
    grown = [r["peak_mb"] - r["imported_mb"] for _, name, r in rows if name == "streaming"]
    print(
        f"streaming, held beyond imports from the smallest to the largest split: "
        f"{grown[0]:,.0f} -> {grown[-1]:,.0f} MB"
    )


if __name__ == "__main__":
    main()
