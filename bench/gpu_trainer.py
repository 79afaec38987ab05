"""GPU check for the trainer: samples/s and GPU utilisation vs a bare loop, bf16 and torch.compile.

Prepared to run in one go on a machine with a CUDA GPU (under 8 minutes on one data-centre GPU):

1. the default example (small CNN on digits), trainer vs a bare bf16 loop;
2. a larger CNN on synthetic 3x64x64 images with bf16 + torch.compile, trainer vs a bare loop
   compiled the same way;
3. ``torchrun --nproc-per-node 1`` on CUDA (the data-parallel path with NCCL, one process);
4. ``training.gpus: N`` (N = the GPUs this machine has, at least 2): ``handoff train`` runs N
   processes under torchrun inside the step (NCCL), against one process on one GPU, on the
   larger CNN; skipped, saying why, with one GPU. ``--device cpu`` runs it with N = 2 on gloo.

Both loops see the same model, data and batch size; the trainer is timed over its step loop
(``loop_seconds``). GPU utilisation is sampled with nvidia-smi while each loop runs. Figures go
to stdout and, as JSON, to ``--out``. ``--device cpu --quick`` runs the same code paths on a CPU
(fp32, no compile) to check the script itself.

Usage: python bench/gpu_trainer.py [--out gpu.json] [--device cuda|cpu] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from cookiecutter.main import cookiecutter
from torch.utils.data import DataLoader

from handoff.hooks import build_optimizer
from handoff.project import Project
from handoff.steps.train import train

ROOT = Path(__file__).resolve().parents[1]

# A model.py for the larger case: a ResNet-style CNN on synthetic 64x64 RGB images.
LARGER_MODEL = """
from __future__ import annotations
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Config:
    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-3
    items: int = 20000
    seed: int = 0


def _block(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.MaxPool2d(2))


def build_model(cfg: Config) -> nn.Module:
    return nn.Sequential(_block(3, 64), _block(64, 128), _block(128, 256), _block(256, 256),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def build_datasets(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(cfg.items, 3, 64, 64, generator=g)
    y = (x.mean(dim=(1, 2, 3)) * 1000).long() % 10
    cut = cfg.items * 9 // 10
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def loss(outputs, batch):
    return F.cross_entropy(outputs, batch[1])


def metrics(outputs, batch):
    return {"accuracy": (outputs.argmax(1) == batch[1]).float().mean().item()}


def example_inputs(cfg: Config):
    return torch.rand(4, 3, 64, 64)
"""


class GpuSampler:
    """nvidia-smi utilisation every 200 ms while a block runs (empty on machines without it)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    @contextlib.contextmanager
    def sampling(self) -> Any:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def bare_loop(project: Project, device: str, compile_: bool, epochs: int) -> float:
    """The loop a researcher writes: bf16 autocast on CUDA, optional torch.compile. Seconds."""
    cfg = project.config({"epochs": epochs})
    torch.manual_seed(cfg.seed)
    train_set, _ = project.hooks.build_datasets(cfg)
    model = project.hooks.build_model(cfg).to(device)
    optimizer = build_optimizer(project.hooks, model, cfg)
    step_model = torch.compile(model) if compile_ else model
    pin = device == "cuda"
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, pin_memory=pin, num_workers=2 if pin else 0
    )
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    seconds = 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        for inputs, target in loader:
            inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast:
                loss = project.hooks.loss(step_model(inputs), (inputs, target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
    return seconds


def set_training(project_dir: Path, **values: Any) -> None:
    path = project_dir / "handoff.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["training"].update(values)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def trainer_loop(project_dir: Path, epochs: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        result = train(project_dir, Path(tmp) / "c.pt", fresh=True, overrides={"epochs": epochs})
    return result.loop_seconds, result.samples


def compare(name: str, project_dir: Path, device: str, compile_: bool, epochs: int) -> dict[str, Any]:
    set_training(project_dir, compile=compile_, mixed_precision=True, checkpoint_every_steps=0)
    project = Project.load(project_dir)
    trainer_loop(project_dir, 1)  # warm-up: kernels, compile caches, MLflow database
    bare_loop(project, device, compile_, 1)
    with GpuSampler().sampling() as bare_gpu:
        bare_s = bare_loop(project, device, compile_, epochs)
    with GpuSampler().sampling() as trainer_gpu:
        trainer_s, samples = trainer_loop(project_dir, epochs)
    row = {
        "case": name,
        "compile": compile_,
        "samples": samples,
        "bare_samples_per_s": round(samples / bare_s),
        "trainer_samples_per_s": round(samples / trainer_s),
        "trainer_vs_bare": round(bare_s / trainer_s, 3),
        "gpu_util_bare_pct": bare_gpu.mean,
        "gpu_util_trainer_pct": trainer_gpu.mean,
    }
    print(json.dumps(row), flush=True)
    return row


def torchrun_one_process(project_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         "-m", "handoff", "train", "--checkpoint", "ddp.pt", "--fresh", "--set", "epochs=2"],
        cwd=project_dir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    row = {
        "case": "torchrun --nproc-per-node 1",
        "returncode": result.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "tail": (result.stdout + result.stderr)[-600:] if result.returncode else "",
    }
    print(json.dumps(row), flush=True)
    return row


def handoff_train(project_dir: Path, checkpoint: str, epochs: int) -> tuple[dict[str, Any], int, float]:
    """``handoff train`` as the pipeline's step runs it: its record, exit code and wall seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "handoff", "train", "--checkpoint", checkpoint, "--fresh",
         "--set", f"epochs={epochs}", "--record", f"{checkpoint}.json"],
        cwd=project_dir, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    seconds = round(time.perf_counter() - started, 1)
    if result.returncode:
        return {"tail": (result.stdout + result.stderr)[-600:]}, result.returncode, seconds
    return json.loads((project_dir / f"{checkpoint}.json").read_text()), 0, seconds


def gpus_in_the_step(project_dir: Path, device: str, epochs: int) -> dict[str, Any]:
    """training.gpus = N: N torchrun processes inside the step vs one, the same global batch."""
    processes = torch.cuda.device_count() if device == "cuda" else 2
    row: dict[str, Any] = {"case": f"training.gpus = {processes} (torchrun in the step)"}
    if processes < 2:
        row["skipped"] = f"{processes} CUDA device: gpus > 1 needs as many GPUs (NCCL, one per process)"
        print(json.dumps(row), flush=True)
        return row
    set_training(project_dir, gpus=0, compile=False, checkpoint_every_steps=0)
    one, one_code, one_s = handoff_train(project_dir, "one.pt", epochs)
    set_training(project_dir, gpus=processes)
    many, many_code, many_s = handoff_train(project_dir, "many.pt", epochs)
    row |= {"returncode": many_code or one_code, "seconds_one": one_s, "seconds_many": many_s}
    if many_code or one_code:
        row["tail"] = many.get("tail") or one.get("tail")
    else:
        # samples and loop_seconds are rank 0's; every rank runs as many steps on as many items.
        one_rate = one["samples"] / one["loop_seconds"]
        many_rate = many["samples"] * many["world_size"] / many["loop_seconds"]
        row |= {
            "world_size": many["world_size"],
            "samples_per_s_one": round(one_rate),
            "samples_per_s_many": round(many_rate),
            "speedup": round(many_rate / one_rate, 2),
            "same_steps": many["steps"] == one["steps"],
        }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="one epoch, small data: checks the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --quick to check the script")
    epochs = 1 if args.quick else 3
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        default = Path(cookiecutter(str(ROOT), no_input=True, output_dir=tmp))
        rows.append(compare("default example (bf16)", default, args.device, False, epochs * 4))
        larger = Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(Path(tmp) / "larger")))
        (larger / "model.py").write_text(LARGER_MODEL.replace("items: int = 20000", "items: int = 600")
                                         if args.quick else LARGER_MODEL)  # fmt: skip
        contract = yaml.safe_load((larger / "contract.yaml").read_text())
        contract["inputs"][0]["shape"] = [-1, 3, 64, 64]
        (larger / "contract.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
        use_compile = args.device == "cuda"
        rows.append(compare("larger CNN (bf16 + compile)", larger, args.device, use_compile, epochs))
        rows.append(torchrun_one_process(default))
        rows.append(gpus_in_the_step(larger, args.device, epochs))
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
