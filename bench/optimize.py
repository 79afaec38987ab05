"""Benchmark: the forms `handoff optimize` can serve, against the exported fp32 model, on three models.

Each model is trained here on CPU on data that ships offline, exported to one self-contained ONNX
file with the export step's own exporter (``handoff.onnx_export.export_onnx``: dynamo, every -1 of
its contract dynamic), then every form of ``handoff.onnx_forms`` is made from it with
``make_form``, static int8 calibrated on 256 training items in batches of 32 (the step's
defaults). Per form: file size and its ratio to fp32, p50/p99 of one ``session.run`` at batch 1
in ONNX Runtime on the CPU (the serving session options of ``handoff.onnx_io.open_session``,
with one intra-op thread: the default predictor's one CPU, which the step times forms with),
accuracy on the held-out split and its drop from fp32's in points, and max |fp32 - form| over
the held-out logits. Forms are timed interleaved (rounds of runs, the order
rotated each round) so bursts of other work hit every form alike. ``handoff.form_choice.choose``
then picks as the step would for a contract allowing every form with ``max_metric_drop:
{accuracy: 0.005}`` and a generous latency SLO (parity judged, as the step does, on the first four
held-out items).

Two things beside the step's forms explain its results: "int8 kernels" counts the weight ops
(Conv, MatMul, Gemm) that ONNX Runtime runs with integer kernels in the graph it actually runs
(its own session optimizations applied), of all weight ops; and one row that is not a step form,
``int8_static_s8 (probe)``: the step's static int8 with int8 instead of uint8 activations (same
pre-processing, calibration items and per-channel int8 weights), never chosen: what the step's
choice of uint8 activations buys.

The models:

* **resnet**: ResNet-18's layout (a 3x3 stem, four stages of two basic blocks with BatchNorm,
  strides 1-2-2-2, global pooling, one linear layer) at a quarter of its width (16-32-64-128), on
  3x32x32 images: scikit-learn's bundled 8x8 digits upsampled bilinearly to 32x32 and repeated to
  three channels (1,797 real images, offline; CIFAR-10 would need a download), 40% held out (718
  items, so one item is 0.14 accuracy points).
* **transformer**: the text-classification starter's encoder and generated reviews (its
  ``model.py``, loaded as it is), made wider and deeper than the starter's default (dim 128, 4
  layers, 4 heads) so it is a small transformer rather than a toy; timed on one review of the
  starter's longest length (24 tokens); 4,000 reviews, a quarter held out (1,000 items).
* **default**: the default generated project (the image-classification starter, 1x8x8 digits),
  trained and exported by the train and export steps.

Then the step's own cost on the default example: ``handoff.steps.optimize.optimize`` beside the
train, export and evaluate steps, each called in this process (as bench/bare_steps.py does), in
pipeline order: train, export, optimize, evaluate (of the optimized folder). Its first call pays
its own first-use imports (ORT's quantization tools), as a step in a fresh process does; it is
then run twice more and the median is printed beside it. Last, the same project runs through
``handoff run --local`` (on a free port, its server stopped after), whose summary gives the
step's share of the whole local pipeline.

Usage: python bench/optimize.py [--quick] [--rounds 10] [--runs 60] [--workdir DIR]
(``--quick`` trains for a few steps only and times fewer runs: a smoke run of the script.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STARTERS = ROOT / "{{cookiecutter.project}}" / "starters"
CALIBRATION_SAMPLES = 256
THREADS = 1  # serving.kserve.cpu "1", the default predictor: optimize times forms with its CPUs
CALIBRATION_BATCH = 32
EVAL_BATCH = 256
EXAMPLE_ITEMS = 4  # the starters' example_inputs: the parity check the step runs
WARMUP = 30
# Weight ops in the graph ONNX Runtime runs: with integer kernels, and in float.
INTEGER_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
     "DynamicQuantizeMatMul", "QAttention"}
)  # fmt: skip
FLOAT_WEIGHT_OPS = frozenset({"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Attention"})
INT8_PROBE = "int8_static_s8 (probe)"
ALLOWED_DROP = 0.005  # accuracy, as a fraction: 0.5 points
# Published anchor: static QDQ int8 of ResNet-18 (ONNX Runtime's quantization, ImageNet).
ANCHOR = "static QDQ int8 ResNet-18: 3.95x smaller, 0.10-point accuracy loss (published)"


@dataclass
class Subject:
    """One trained model, exported, with what its forms are made and measured with."""

    name: str
    fp32: Path  # the exported model.onnx
    input_name: str
    train_inputs: np.ndarray  # calibration draws from these
    val_inputs: np.ndarray
    val_labels: np.ndarray
    one: np.ndarray  # the batch-1 input timed
    trained_seconds: float
    note: str = ""


@dataclass
class Measured:
    form: str
    path: Path | None = None
    reason: str = ""  # why it was not made
    size: int = 0
    timings: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    heldout_diff: float = 0.0  # max |fp32 - form| over the held-out logits
    example_diff: float = 0.0  # the same over the first EXAMPLE_ITEMS items (the step's parity)
    integer_ops: tuple[int, int] = (0, 0)  # weight ops ORT runs with integer kernels, of all weight ops
    probe: bool = False  # not a form the step makes: measured to explain a result, never chosen

    @property
    def p50(self) -> float:
        return float(np.percentile(self.timings, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.timings, 99))


# --- the models -------------------------------------------------------------------------------


def contract_for(name: str, input_spec: dict[str, Any], classes: int) -> Any:
    """A minimal contract for ``export_onnx`` (it reads the inputs' dynamic axes and the names)."""
    from handoff.contract import Contract

    return Contract.model_validate(
        {
            "name": name,
            "task": "classification",
            "inputs": [input_spec],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, classes]}],
            "slo": {"latency_p99_ms": 1000},
            "owners": {"research": "bench", "engineering": "bench"},
        }
    )


def fit(model: Any, inputs: Any, labels: Any, epochs: int, lr: float, max_steps: int | None) -> None:
    """A plain AdamW loop with a cosine schedule, batch 64, seeded order."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    steps_per_epoch = (len(labels) + 63) // 64
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == total:
                break
    model.eval()


def resnet(work: Path, quick: bool) -> Subject:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from handoff.onnx_export import export_onnx

    class Block(nn.Module):
        """ResNet's basic block: two 3x3 convolutions with BatchNorm, and the shortcut."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    widths = (16, 32, 64, 128)
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for i, width in enumerate(widths):
        layers += [Block(cin, width, 1 if i == 0 else 2), Block(width, width, 1)]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    torch.manual_seed(0)
    model = nn.Sequential(*layers)

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = len(labels) * 2 // 5  # 718 held-out items: one item is 0.14 points
    val, train = order[:n_val], order[n_val:]
    started = time.perf_counter()
    fit(model, images[train], labels[train], epochs=5, lr=3e-3, max_steps=20 if quick else None)
    trained = time.perf_counter() - started
    spec = {"name": "image", "dtype": "float32", "shape": [-1, 3, 32, 32]}
    path = work / "resnet" / "model.onnx"
    export_onnx(model, contract_for("resnet", spec, 10), (images[val[:2]],), path)
    params = sum(p.numel() for p in model.parameters())
    return Subject(
        "resnet",
        path,
        "image",
        images[train].numpy(),
        images[val].numpy(),
        labels[val].numpy(),
        images[val[:1]].numpy(),
        trained,
        f"ResNet-18 layout at widths {widths}, {params / 1e6:.2f} M parameters, 3x32x32",
    )


def load_starter(name: str) -> Any:
    """A starter's model.py as a module (its only template text is in the docstring)."""
    spec = importlib.util.spec_from_file_location(
        f"starter_{name.replace('-', '_')}", STARTERS / name / "model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building Config
    spec.loader.exec_module(module)
    return module


def transformer(work: Path, quick: bool) -> Subject:
    import torch

    from handoff.onnx_export import export_onnx

    starter = load_starter("text-classification")
    cfg = starter.Config(dim=128, heads=4, layers=4, reviews=4000, epochs=3, lr=1e-3, val_fraction=0.25)
    train_set, val_set = starter.build_datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = starter.build_model(cfg)
    (x_train, y_train), (x_val, y_val) = train_set.tensors, val_set.tensors
    started = time.perf_counter()
    fit(model, x_train, y_train, epochs=cfg.epochs, lr=cfg.lr, max_steps=20 if quick else None)
    trained = time.perf_counter() - started
    spec = {"name": "tokens", "dtype": "int64", "shape": [-1, -1], "range": [0, len(starter.VOCABULARY) - 1]}
    path = work / "transformer" / "model.onnx"
    export_onnx(model, contract_for("transformer", spec, len(starter.LABELS)), (x_val[:4, :12],), path)
    params = sum(p.numel() for p in model.parameters())
    longest = x_val[(x_val != starter.PAD).sum(dim=1).argmax()][None]  # one review of 24 tokens
    return Subject(
        "transformer",
        path,
        "tokens",
        x_train.numpy(),
        x_val.numpy(),
        y_val.numpy(),
        longest.numpy(),
        trained,
        f"text-classification starter's encoder, dim {cfg.dim}, {cfg.layers} layers, {cfg.heads} heads, "
        f"{params / 1e6:.2f} M parameters, reviews padded to {cfg.max_words} tokens",
    )


@dataclass
class StepCost:
    seconds: dict[str, float]  # train, export, optimize (first call), evaluate
    optimize_again: list[float]  # later calls, same process
    chosen: str  # the form the step served, and why
    pipeline: dict[str, float]  # `handoff run --local`'s step_seconds and total_seconds


def default_example(work: Path, quick: bool) -> tuple[Subject, StepCost]:
    """Generate the default project, run train, export, optimize and evaluate on it in this
    process (pipeline order), and hand its exported model on to be measured like the others."""
    from cookiecutter.main import cookiecutter

    from handoff.files import read_json
    from handoff.project import Project
    from handoff.steps.evaluate import evaluate
    from handoff.steps.export import export
    from handoff.steps.optimize import optimize
    from handoff.steps.train import train

    home = work / "cookiecutter-home"  # replay files stay out of $HOME
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(f"cookiecutters_dir: {home / 'dirs'}\nreplay_dir: {home / 'replay'}\n")
    os.environ["COOKIECUTTER_CONFIG"] = str(home / "config.yaml")
    os.environ.setdefault("HANDOFF_STATE_DIR", str(work / "state"))
    project = Path(
        cookiecutter(str(ROOT), no_input=True, output_dir=str(work / "gen"), overwrite_if_exists=True)
    )
    overrides = {"epochs": 1} if quick else None
    seconds: dict[str, float] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # progress bars and one-line notes
            result = call()
        seconds[name] = time.perf_counter() - started
        return result

    checkpoint, onnx_dir, optimized = work / "checkpoint.pt", work / "onnx", work / "optimized"
    trained = timed("train", lambda: train(project, checkpoint, overrides=overrides, fresh=True))
    timed("export", lambda: export(project, checkpoint, onnx_dir))
    result = timed("optimize", lambda: optimize(project, onnx_dir, optimized))
    timed(
        "evaluate",
        lambda: evaluate(
            project, optimized, report_dir=work / "report", training_run_id=trained.mlflow_run_id
        ),
    )
    again = []
    for i in range(2):
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            optimize(project, onnx_dir, work / f"optimized-{i}")
        again.append(time.perf_counter() - started)

    loaded = Project.load(project)
    cfg = loaded.config_from_dict(read_json(onnx_dir / "config.json"))
    train_set, val_set = loaded.hooks.build_datasets(cfg)
    (x_train, _), (x_val, y_val) = train_set.tensors, val_set.tensors
    subject = Subject(
        "default",
        onnx_dir / "model.onnx",
        "image",
        x_train.numpy(),
        x_val.numpy(),
        y_val.numpy(),
        x_val[:1].numpy(),
        trained.seconds,
        "the default generated project (image-classification starter: a small CNN on 1x8x8 digits)",
    )
    return subject, StepCost(seconds, again, result.reason, whole_pipeline(project))


def whole_pipeline(project: Path) -> dict[str, float]:
    """The step's share where it runs: the local pipeline (kfp.local, its fork server, MLflow, the
    model server, the smoke test) on the same project, on a free port; its server is stopped."""
    settings = project / "handoff.yaml"
    settings.write_text(settings.read_text().replace("port: 8080", "port: 0"))
    handoff = str(Path(sys.executable).with_name("handoff"))
    done = subprocess.run([handoff, "run", "--local"], cwd=project, capture_output=True, text=True)
    subprocess.run([handoff, "stop"], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"handoff run --local failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    summary = json.loads((project / "runs" / "latest" / "summary.json").read_text())
    return {**summary["step_seconds"], "total": summary["total_seconds"]}


# --- measuring --------------------------------------------------------------------------------


def calibration(subject: Subject) -> Iterator[dict[str, np.ndarray]]:
    """CALIBRATION_SAMPLES training items spread evenly over the split, as the step picks them."""
    items = subject.train_inputs
    picked = np.unique(
        np.linspace(0, len(items) - 1, num=min(CALIBRATION_SAMPLES, len(items))).round().astype(int)
    )
    for start in range(0, len(picked), CALIBRATION_BATCH):
        yield {subject.input_name: items[picked[start : start + CALIBRATION_BATCH]]}


class Reader:
    """ORT's ``CalibrationDataReader`` protocol over calibration feeds."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def int8_activations_static(subject: Subject, out: Path) -> Path:
    """The step's static int8 (same pre-processing, calibration items, per-channel int8 weights, QDQ)
    but with int8 activations: ONNX Runtime's x86 CPU kernels fuse a QDQ Conv into QLinearConv for
    uint8 activations only, so this shows what the step's uint8 activations buy."""
    import logging

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".pre.onnx")
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # ORT's tools log every node they skip
    try:
        quant_pre_process(str(subject.fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Reader(calibration(subject)),  # type: ignore[arg-type]  # ORT only calls get_next
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        logging.disable(previous)
    return out


def integer_share(path: Path, optimized: Path) -> tuple[int, int]:
    """(weight ops run by integer kernels, all weight ops) in the graph ONNX Runtime actually runs
    (the session's own optimizations applied, as serving's session applies them)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    integer = sum(op in INTEGER_OPS for op in ops)
    return integer, integer + sum(op in FLOAT_WEIGHT_OPS for op in ops)


def logits(session: Any, subject: Subject, inputs: np.ndarray) -> np.ndarray:
    parts = [
        session.run(None, {subject.input_name: inputs[i : i + EVAL_BATCH]})[0]
        for i in range(0, len(inputs), EVAL_BATCH)
    ]
    return np.concatenate(parts)


def measure(subject: Subject, work: Path, rounds: int, runs: int) -> list[Measured]:
    from handoff.contract import OPTIMIZE_FORMS
    from handoff.onnx_forms import FormNotMade, make_form
    from handoff.onnx_io import open_session

    folder = work / subject.name
    folder.mkdir(parents=True, exist_ok=True)
    measured: list[Measured] = []
    for form in OPTIMIZE_FORMS:
        try:
            path = make_form(form, subject.fp32, folder / f"{form}.onnx", calibration(subject))
            measured.append(Measured(form, path, size=path.stat().st_size))
        except FormNotMade as exc:
            measured.append(Measured(form, reason=str(exc)))
    probe = int8_activations_static(subject, folder / "int8_static_s8.onnx")
    measured.append(Measured(INT8_PROBE, probe, size=probe.stat().st_size, probe=True))
    made = [m for m in measured if m.path is not None]
    for m in made:
        assert m.path is not None
        m.integer_ops = integer_share(m.path, m.path.with_suffix(".ort.onnx"))
    # One intra-op thread, as the step times forms for the default predictor (serving.kserve.cpu "1").
    sessions = {m.form: open_session(m.path, threads=THREADS) for m in made}  # type: ignore[arg-type]
    reference = logits(sessions["fp32"], subject, subject.val_inputs)
    for m in made:
        out = logits(sessions[m.form], subject, subject.val_inputs)
        m.accuracy = float((out.argmax(axis=1) == subject.val_labels).mean())
        diff = np.abs(out.astype(np.float64) - reference)
        m.heldout_diff = float(diff.max())
        m.example_diff = float(diff[:EXAMPLE_ITEMS].max())
    feed = {subject.input_name: subject.one}
    for m in made:
        for _ in range(WARMUP):
            sessions[m.form].run(None, feed)
    for r in range(rounds):
        order = made[r % len(made) :] + made[: r % len(made)]
        for m in order:
            run = sessions[m.form].run
            for _ in range(runs):
                start = time.perf_counter()
                run(None, feed)
                m.timings.append((time.perf_counter() - start) * 1000)
    return measured


def choice(measured: list[Measured]) -> str:
    """What ``form_choice.choose`` serves for a contract that allows every form."""
    from handoff.contract import OPTIMIZE_FORMS, Slo
    from handoff.form_choice import Candidate, choose

    slo = Slo.model_validate(
        {
            "latency_p99_ms": 1000,
            "min_metrics": {"accuracy": 0.0},
            "optimize": {"forms": list(OPTIMIZE_FORMS), "max_metric_drop": {"accuracy": ALLOWED_DROP}},
        }
    )
    candidates = [
        Candidate(m.form, made=False, reason=m.reason)
        if m.path is None
        else Candidate(
            m.form,
            made=True,
            size_bytes=m.size,
            parity_max_abs_diff=m.example_diff,
            parity_tolerance=slo.optimizing.parity(m.form),
            latency_p50_ms=m.p50,
            latency_p99_ms=m.p99,
            metrics={"accuracy": m.accuracy},
        )
        for m in measured
        if not m.probe
    ]
    return choose(slo, candidates).reason


def table(subject: Subject, measured: list[Measured]) -> None:
    (fp32,) = [m for m in measured if m.form == "fp32"]
    print(f"\n### {subject.name}: {subject.note}\n")
    print(
        f"trained {subject.trained_seconds:.1f} s; held-out {len(subject.val_labels)} items; "
        f"{len(fp32.timings)} timed runs a form at batch 1\n"
    )
    print(
        "| form | size MB | smaller | p50 ms | speedup | p99 ms | accuracy | drop (points) "
        "| max abs diff | int8 kernels |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in measured:
        if m.path is None:
            print(f"| {m.form} | not made: {m.reason} ||||||||| ")
            continue
        print(
            f"| {m.form} | {m.size / 1e6:.3f} | {fp32.size / m.size:.2f}x | {m.p50:.4f} | "
            f"{fp32.p50 / m.p50:.2f}x | {m.p99:.4f} | {m.accuracy * 100:.2f}% | "
            f"{(fp32.accuracy - m.accuracy) * 100:+.2f} | {m.heldout_diff:.3g} | "
            f"{m.integer_ops[0]}/{m.integer_ops[1]} |"
        )
    print(
        f"\nchoose (every form allowed, accuracy may drop {ALLOWED_DROP * 100:g} points): {choice(measured)}"
    )


def goals(resnet_forms: list[Measured], cost: StepCost) -> None:
    """The issue's goals, measured: int8 on the ResNet-style CNN, and the step's share."""
    by = {m.form: m for m in resnet_forms}
    fp32, int8 = by["fp32"], by["int8_static"]
    print("\n### goals\n")
    print(f"anchor: {ANCHOR}")
    if int8.path is None:
        print(f"resnet int8_static not made: {int8.reason}")
    else:
        speed, small = fp32.p50 / int8.p50, fp32.size / int8.size
        drop = (fp32.accuracy - int8.accuracy) * 100
        print(f"resnet int8_static >= 1.5x faster at batch 1: {speed:.2f}x ({verdict(speed >= 1.5)})")
        print(f"resnet int8_static >= 3.5x smaller: {small:.2f}x ({verdict(small >= 3.5)})")
        print(f"resnet int8_static drop <= 0.5 point: {drop:+.2f} ({verdict(drop <= 0.5)})")
    total = sum(cost.seconds.values())
    share = cost.seconds["optimize"] / total
    print(
        "default example, optimize / (train + export + optimize + evaluate): "
        f"{cost.seconds['optimize']:.2f} / {total:.2f} s = {share:.1%} ({verdict(share < 0.2)}, goal < 20%)"
    )
    step, whole = cost.pipeline["optimize"], cost.pipeline["total"]
    print(
        f"default example, optimize / `handoff run --local`: {step:.2f} / {whole:.2f} s = "
        f"{step / whole:.1%} ({verdict(step / whole < 0.2)}, goal < 20%)"
    )


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="train 20 steps (1 epoch for the default), time less"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timing rounds, forms rotated (default 10; 3 quick)"
    )
    parser.add_argument("--runs", type=int, default=None, help="runs a form per round (default 60; 20 quick)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the projects and models here")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    runs = args.runs or (20 if args.quick else 60)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-optimize-")))
        else:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        run(work, args.quick, rounds, runs)


def run(work: Path, quick: bool, rounds: int, runs: int) -> None:
    import onnxruntime as ort
    import torch

    started = time.perf_counter()
    cores = os.cpu_count()
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {cores} CPU cores", flush=True)
    # The step's cost first, so its first call pays its own first-use imports.
    print("default example: train, export, optimize, evaluate ...", flush=True)
    default, cost = default_example(work, quick)
    subjects = [default]
    print("resnet: training ...", flush=True)
    subjects.insert(0, resnet(work, quick))
    print("transformer: training ...", flush=True)
    subjects.insert(1, transformer(work, quick))
    results = {}
    for subject in subjects:
        print(f"{subject.name}: making and timing forms ...", flush=True)
        results[subject.name] = measure(subject, work, rounds, runs)
    for subject in subjects:
        table(subject, results[subject.name])

    print("\n### step cost, default example (each step called in this process, pipeline order)\n")
    print("| step | seconds |")
    print("|---|---|")
    for name, seconds in cost.seconds.items():
        print(f"| {name} | {seconds:.2f} |")
    again = statistics.median(cost.optimize_again)
    print(f"| optimize, called again (median of {len(cost.optimize_again)}) | {again:.2f} |")
    print(f"\nthe step served {cost.chosen}")
    print("\n### the same project through `handoff run --local`\n")
    print("| step | seconds |")
    print("|---|---|")
    for name, seconds in cost.pipeline.items():
        print(f"| {name} | {seconds:.2f} |")
    goals(results["resnet"], cost)
    print(f"\nwhole bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
