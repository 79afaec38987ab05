"""``handoff check``: does model.py satisfy the contract? Seconds, not a training run.

Runs each hook once and names the hook or contract field at fault: Config builds, datasets
yield ``(inputs, target)`` items that match the contract, the example passes a forward pass with
the contract's output shapes and dtypes, two optimizer steps on one batch lower a finite loss,
and the model survives an ONNX export round trip within the parity tolerance.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from handoff.errors import HandoffError
from handoff.hooks import MODEL_FILE, build_optimizer, call_hook, hook_batch, split_batch
from handoff.onnx_io import check_arrays
from handoff.project import Project
from handoff.runtime import seed_everything
from handoff.steps.export import check_parity, example_arrays, export_onnx, torch_outputs


@dataclass
class CheckReport:
    passed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _datasets(project: Project, cfg: Any) -> str:
    datasets = call_hook(project.hooks, "build_datasets", cfg)
    if not isinstance(datasets, (tuple, list)) or len(datasets) != 2:
        raise HandoffError(
            "build_datasets(cfg) must return (train_dataset, val_dataset)",
            file=MODEL_FILE,
            field="build_datasets",
        )
    sizes = []
    for label, dataset in zip(("train", "val"), datasets, strict=True):
        try:
            sizes.append(len(dataset))
        except TypeError:
            raise HandoffError(
                f"the {label} dataset must define __len__", file=MODEL_FILE, field="build_datasets"
            ) from None
        if not sizes[-1]:
            raise HandoffError(f"the {label} dataset is empty", file=MODEL_FILE, field="build_datasets")
        inputs, _ = split_batch(next(iter(DataLoader(dataset, batch_size=2))))
        check_arrays(
            project.contract.inputs, [t.numpy() for t in inputs], what="inputs", source=f"the {label} dataset"
        )
    return f"train {sizes[0]} items, val {sizes[1]} items"


def _overfit(project: Project, model: torch.nn.Module, cfg: Any) -> str:
    """Two optimizer steps on one batch must lower a finite loss: gradients reach the weights."""
    train_set, _ = call_hook(project.hooks, "build_datasets", cfg)
    batch = next(iter(DataLoader(train_set, batch_size=min(32, len(train_set)))))
    inputs, target = split_batch(batch)
    optimizer = build_optimizer(project.hooks, model, cfg)
    model.train()
    losses = []
    for _ in range(3):  # loss before, after step 1, after step 2
        loss = call_hook(project.hooks, "loss", model(*inputs), hook_batch((inputs, target)))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise HandoffError(
                "loss(outputs, batch) must return a scalar tensor", file=MODEL_FILE, field="loss"
            )
        if not torch.isfinite(loss):
            raise HandoffError(
                f"loss() returned {loss.item()} on the first training batch", file=MODEL_FILE, field="loss"
            )
        losses.append(loss.item())
        if len(losses) == 3:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if not losses[2] < losses[0]:
        raise HandoffError(
            f"two optimizer steps on one batch did not lower the loss "
            f"({losses[0]:.4f} -> {losses[2]:.4f}); check that loss() depends on the "
            "model outputs and that the learning rate is sensible",
            file=MODEL_FILE,
            field="loss",
        )
    model.eval()
    return f"loss {losses[0]:.4f} -> {losses[2]:.4f}"


def check(project_dir: Path | str, progress: Callable[[str, str], None] | None = None) -> CheckReport:
    """Validate contract.yaml, handoff.yaml and every model.py hook; raise on the first problem."""
    started = time.perf_counter()
    report = CheckReport()

    def passed(name: str, detail: str) -> None:
        report.passed.append((name, detail))
        if progress:
            progress(name, detail)

    project = Project.load(project_dir)
    passed(
        "contract.yaml and handoff.yaml",
        f"{len(project.contract.inputs)} input(s), {len(project.contract.outputs)} output(s)",
    )
    cfg = project.config()  # imports model.py: syntax and missing hooks fail here
    seed_everything(int(getattr(cfg, "seed", 0)))
    passed(
        "model.py hooks",
        "Config, build_model, build_datasets, loss, example_inputs"
        + (", metrics" if hasattr(project.hooks, "metrics") else ""),
    )
    passed("datasets", _datasets(project, cfg))
    model = call_hook(project.hooks, "build_model", cfg)
    if not isinstance(model, torch.nn.Module):
        raise HandoffError(
            f"build_model(cfg) must return a torch.nn.Module, got {type(model).__name__}",
            file=MODEL_FILE,
            field="build_model",
        )
    model.eval()
    example = example_arrays(project, cfg)
    outputs = torch_outputs(model, example)
    check_arrays(project.contract.outputs, outputs, what="outputs", source="the model")
    passed(
        "forward pass",
        ", ".join(
            f"{s.name} {list(o.shape)} {o.dtype}"
            for s, o in zip(project.contract.outputs, outputs, strict=True)
        ),
    )
    passed("two-step overfit", _overfit(project, model, cfg))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, project.contract, example, path)
        worst, _ = check_parity(model, project, path, example)
    passed(
        "ONNX export round trip",
        f"max |torch - onnxruntime| = {worst:.2g} (tolerance {project.contract.slo.parity_tolerance:g})",
    )
    report.seconds = round(time.perf_counter() - started, 2)
    return report
