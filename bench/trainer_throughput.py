"""Benchmark: the handoff trainer vs a bare hand-written PyTorch loop, same model, data and batches.

Both train the default generated project's model for the same number of epochs in this process
(alternating order, medians), timed over their optimizer-step loops only. For the trainer that is
``TrainResult.loop_seconds``: batches in EpochBatches order, forward, loss, backward, step, NaN
guard (one ``loss.item()`` a step, also feeding the epoch's train_loss), SIGTERM check, progress
bar, periodic checkpoints; not its per-epoch validation, epoch-end state or MLflow logging,
which the bare loop does not do. The bare loop is what a researcher writes by hand: a
``DataLoader(shuffle=True)``, then forward, loss, ``zero_grad``, backward, step. It reads no loss
value back, so it is a lower bound that does strictly less than any loop that logs its loss.

Reports seconds (median, and the range over the repeats) and samples/s of each, their ratio, and
what resumable checkpoints cost as a share of the trainer's time (checkpoints every N steps vs
only at epoch ends).

Usage: python bench/trainer_throughput.py [--epochs 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from cookiecutter.main import cookiecutter
from torch.utils.data import DataLoader

from handoff.hooks import build_optimizer
from handoff.project import Project
from handoff.steps.train import train

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(project: Project, epochs: int, batch_size: int) -> float:
    """What a researcher writes by hand: shuffle, forward, loss, backward, step. Returns seconds.

    Same seed, datasets, model and optimizer (model.py's hooks) as the trainer; timed from the
    first batch to the last step.
    """
    cfg = project.config({"epochs": epochs, "batch_size": batch_size})
    torch.manual_seed(cfg.seed)
    train_set, _ = project.hooks.build_datasets(cfg)
    model = project.hooks.build_model(cfg)
    optimizer = build_optimizer(project.hooks, model, cfg)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    started = time.perf_counter()
    for _ in range(epochs):
        for inputs, target in loader:
            loss = project.hooks.loss(model(inputs), (inputs, target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def trainer(project_dir: Path, epochs: int, batch_size: int, every: int) -> float:
    """``train()`` on the project with checkpoints every ``every`` steps; its step-loop seconds."""
    settings = yaml.safe_load((project_dir / "handoff.yaml").read_text())
    settings["training"]["checkpoint_every_steps"] = every
    (project_dir / "handoff.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        result = train(
            project_dir,
            Path(tmp) / "checkpoint.pt",
            fresh=True,
            overrides={"epochs": epochs, "batch_size": batch_size},
        )
    return result.loop_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=50, help="checkpoint_every_steps for the trainer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        project_dir = Path(cookiecutter(str(ROOT), no_input=True, output_dir=tmp))
        project = Project.load(project_dir)
        items = len(project.hooks.build_datasets(project.config())[0]) * args.epochs
        times: dict[str, list[float]] = {"bare": [], "trainer": [], "trainer, epoch-end state only": []}
        trainer(project_dir, 1, args.batch_size, 0)  # warm-up: first-use imports, MLflow database
        for i in range(args.repeats):
            kinds = list(times) if i % 2 == 0 else list(reversed(times))
            for kind in kinds:
                if kind == "bare":
                    times[kind].append(bare_loop(project, args.epochs, args.batch_size))
                else:
                    every = args.every if kind == "trainer" else 0
                    times[kind].append(trainer(project_dir, args.epochs, args.batch_size, every))
        shutil.rmtree(project_dir / "mlartifacts", ignore_errors=True)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    print(
        f"\nepochs {args.epochs}, batch {args.batch_size}, {items} samples per run, "
        f"medians of {args.repeats}\n"
    )
    print("| loop | seconds | range | samples/s |")
    print("|---|---|---|---|")
    for kind, seconds in medians.items():
        spread = f"{min(times[kind]):.2f}–{max(times[kind]):.2f}"
        print(f"| {kind} | {seconds:.2f} | {spread} | {items / seconds:,.0f} |")
    every = medians["bare"] / medians["trainer"]
    print(f"\ntrainer / bare throughput, checkpoints every {args.every} steps: {every:.2f}")
    epoch_end = medians["bare"] / medians["trainer, epoch-end state only"]
    print(f"trainer / bare throughput, epoch-end state only: {epoch_end:.2f}")
    cost = (medians["trainer"] - medians["trainer, epoch-end state only"]) / medians["trainer"]
    print(f"checkpoints every {args.every} steps: {cost:+.1%} of the trainer's time")


if __name__ == "__main__":
    main()
