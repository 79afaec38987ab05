"""train: fit model.py's model on its training data, log to MLflow, write a checkpoint.

Seeded, with a progress bar, a NaN guard (a non-finite loss stops training with the epoch and
step), validation metrics every epoch, and an atomic checkpoint so a crash never leaves half a
file where export expects a model.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from torch.utils.data import DataLoader
from tqdm import tqdm

from handoff import __version__
from handoff.checkpoints import save_checkpoint
from handoff.errors import HandoffError
from handoff.hooks import (
    MODEL_FILE,
    ModelModule,
    as_tuple,
    build_optimizer,
    call_hook,
    hook_batch,
    score_split,
    split_batch,
    user_code,
)
from handoff.project import Project
from handoff.runtime import pick_device, seed_everything
from handoff.tracking import use_tracking


@dataclass(frozen=True)
class TrainResult:
    """What training produced; ``mlflow_run_id`` ties later steps to the same MLflow run."""

    checkpoint: str
    mlflow_run_id: str
    epochs: int
    steps: int
    train_loss: float
    val_metrics: dict[str, float]
    seconds: float


def int_setting(cfg: Any, name: str, default: int) -> int:
    """A Config field the trainer reads (epochs, batch_size, seed), checked to be a whole number."""
    value = getattr(cfg, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HandoffError(
            f"Config.{name} must be an integer, got {value!r}", file=MODEL_FILE, field="Config"
        )
    return value


def evaluate_torch(hooks: ModelModule, model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Loss and researcher metrics over a whole split with the torch model."""
    outputs, inputs, targets = [], [], []
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), user_code(hooks, "the forward pass on the validation split"):
        for batch in loader:
            x, y = split_batch(batch)
            outputs.append(tuple(t.cpu() for t in as_tuple(model(*(t.to(device) for t in x)))))
            inputs.append(x)
            targets.append(y)
    model.train()
    return score_split(hooks, outputs, inputs, targets)


def train(
    project_dir: Path | str, checkpoint: Path | str, *, overrides: dict[str, Any] | None = None
) -> TrainResult:
    """Train the project's model and write ``checkpoint`` (state dict + the Config used)."""
    started = time.perf_counter()
    project = Project.load(project_dir)
    hooks = project.hooks
    cfg = project.config(overrides)
    seed, batch_size, epochs = (
        int_setting(cfg, "seed", 0),
        int_setting(cfg, "batch_size", 64),
        int_setting(cfg, "epochs", 1),
    )
    generator = seed_everything(seed)
    device = pick_device()

    train_set, val_set = call_hook(hooks, "build_datasets", cfg)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)
    val_loader = DataLoader(val_set, batch_size=max(batch_size, 256))
    model = call_hook(hooks, "build_model", cfg).to(device)
    optimizer = build_optimizer(hooks, model, cfg)

    use_tracking(project)
    run = mlflow.start_run(run_name=f"{project.settings.project}-train")
    step, last_loss, val_metrics = 0, math.nan, {}
    try:
        mlflow.set_tags(
            {
                "handoff.template_version": __version__,
                "handoff.step": "train",
                "handoff.contract_sha256": project.contract.sha256,
            }
        )
        mlflow.log_params(dataclasses.asdict(cfg))
        for epoch in range(1, epochs + 1):
            bar = tqdm(
                train_loader,
                desc=f"epoch {epoch}/{epochs}",
                file=sys.stdout,
                disable=None,
                leave=False,
                mininterval=1.0,
            )
            running, seen = 0.0, 0
            with user_code(hooks, f"training (epoch {epoch})"):
                for batch in bar:
                    inputs, target = split_batch(batch)
                    inputs = tuple(x.to(device) for x in inputs)
                    target = target.to(device) if isinstance(target, torch.Tensor) else target
                    loss = call_hook(hooks, "loss", model(*inputs), hook_batch((inputs, target)))
                    if not torch.isfinite(loss):
                        raise HandoffError(
                            f"loss() returned {loss.item()} at epoch {epoch}, step {step + 1}; training "
                            "stopped and nothing was exported or registered (lower the learning rate "
                            "or check the data and loss for divide-by-zero / log(0))",
                            file=MODEL_FILE,
                            field="loss",
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    running += loss.item() * len(target)
                    seen += len(target)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            last_loss = running / max(seen, 1)
            val_metrics = evaluate_torch(hooks, model, val_loader)
            mlflow.log_metrics({"train_loss": last_loss, **val_metrics}, step=epoch)
            shown = ", ".join(f"{k}={v:.4f}" for k, v in val_metrics.items())
            print(f"epoch {epoch}/{epochs}: train_loss={last_loss:.4f} {shown}", flush=True)
        save_checkpoint(
            checkpoint,
            {
                "model": model.state_dict(),
                "config": dataclasses.asdict(cfg),
                "epochs": epochs,
                "steps": step,
                "template_version": __version__,
            },
        )
    except MlflowException as exc:
        mlflow.end_run(status="FAILED")
        raise HandoffError(
            f"MLflow rejected what training logged: {exc.message}", file=MODEL_FILE, field="Config/metrics"
        ) from None
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()
    return TrainResult(
        checkpoint=str(checkpoint),
        mlflow_run_id=run.info.run_id,
        epochs=epochs,
        steps=step,
        train_loss=last_loss,
        val_metrics=val_metrics,
        seconds=round(time.perf_counter() - started, 3),
    )
