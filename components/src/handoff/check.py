"""``handoff check``: does model.py satisfy the contract? Seconds, not a training run.

Runs each hook once and names the hook or contract field at fault, so that what ``check`` passes
the pipeline will not reject later: Config builds and is JSON-serialisable (checkpoints and
config.json hold it), datasets yield ``(inputs, target)`` items that match the contract, the
example passes a forward pass with the contract's output shapes and dtypes, ``metrics()`` returns
every metric the contract gates on under a name MLflow accepts, two optimizer steps on one batch
lower a finite loss, and the model survives an ONNX export round trip within the parity tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from handoff.errors import HandoffError
from handoff.hooks import (
    MODEL_FILE,
    as_tuple,
    build_optimizer,
    call_hook,
    hook_batch,
    hook_outputs,
    metric_values,
    split_batch,
    user_code,
)
from handoff.onnx_io import check_arrays
from handoff.project import Project
from handoff.runtime import seed_everything
from handoff.steps.export import check_parity, example_arrays, export_onnx, torch_outputs
from handoff.steps.train import int_setting

# What MLflow accepts as a metric name (letters, digits, and _ - . space /).
METRIC_NAME = re.compile(r"^[A-Za-z0-9_\-. /]+$")
OVERFIT_BATCH = 32


@dataclass
class CheckReport:
    """The checks that passed, in order, each with what it saw."""

    passed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _config(project: Project) -> tuple[Any, str]:
    cfg = project.config()
    try:
        json.dumps(dataclasses.asdict(cfg))
    except (TypeError, ValueError) as exc:
        raise HandoffError(
            f"Config values must be JSON values (numbers, strings, booleans, lists, "
            f"dicts) so checkpoints and config.json can hold them: {exc}",
            file=MODEL_FILE,
            field="Config",
        ) from None
    for name, default in (("seed", 0), ("batch_size", 64), ("epochs", 1)):
        int_setting(cfg, name, default)
    return cfg, f"{len(dataclasses.fields(cfg))} fields"


def _datasets(project: Project, cfg: Any) -> tuple[Dataset, str]:
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
        with user_code(project.hooks, f"loading a batch of the {label} dataset"):
            inputs, _ = split_batch(next(iter(DataLoader(dataset, batch_size=2))))
        check_arrays(
            project.contract.inputs,
            [t.detach().numpy() for t in inputs],
            what="inputs",
            source=f"the {label} dataset",
        )
    return datasets[0], f"train {sizes[0]} items, val {sizes[1]} items"


def _metrics(project: Project, model: torch.nn.Module, batch: Any) -> str:
    """metrics() on one batch: a dict of numbers, names MLflow accepts, every gated metric present."""
    if not hasattr(project.hooks, "metrics"):
        produced = {"val_loss"}
    else:
        inputs, target = split_batch(batch)
        with torch.no_grad(), user_code(project.hooks, "the forward pass on a training batch"):
            outputs = hook_outputs(as_tuple(model(*inputs)))
        produced = {
            "val_loss",
            *metric_values(call_hook(project.hooks, "metrics", outputs, hook_batch((inputs, target)))),
        }
    bad = sorted(name for name in produced if not METRIC_NAME.match(name))
    if bad:
        raise HandoffError(
            f"metric name(s) {bad} are not accepted by MLflow: use letters, digits and _ - . / or spaces",
            file=MODEL_FILE,
            field="metrics",
        )
    missing = sorted(set(project.contract.slo.min_metrics) - produced)
    if missing:
        raise HandoffError(
            f"the gate needs {missing}, which model.py metrics() does not "
            f"produce (it produces {sorted(produced)})",
            file="contract.yaml",
            field="slo.min_metrics",
        )
    return ", ".join(sorted(produced))


def _overfit(project: Project, model: torch.nn.Module, cfg: Any, batch: Any) -> str:
    """Two optimizer steps on one batch must lower a finite loss: gradients reach the weights."""
    inputs, target = split_batch(batch)
    optimizer = build_optimizer(project.hooks, model, cfg)
    model.train()

    def loss_now() -> torch.Tensor:
        with user_code(project.hooks, "the forward pass in training mode"):
            outputs = hook_outputs(as_tuple(model(*inputs)))
        loss = call_hook(project.hooks, "loss", outputs, hook_batch((inputs, target)))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise HandoffError(
                "loss(outputs, batch) must return a scalar tensor", file=MODEL_FILE, field="loss"
            )
        if not torch.isfinite(loss):
            raise HandoffError(
                f"loss() returned {loss.item()} on the first training batch", file=MODEL_FILE, field="loss"
            )
        return loss

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with user_code(
            project.hooks, "loss.backward()", hint="loss() must be computed from the model outputs"
        ):
            loss.backward()
        optimizer.step()

    first = loss_now()
    before = first.item()
    step(first)
    step(loss_now())
    after = loss_now().item()
    model.eval()
    if not after < before:
        raise HandoffError(
            f"two optimizer steps on one batch did not lower the loss ({before:.4f} -> "
            f"{after:.4f}); check that loss() depends on the model outputs and that the "
            "learning rate is sensible",
            file=MODEL_FILE,
            field="loss",
        )
    return f"loss {before:.4f} -> {after:.4f}"


def check(project_dir: Path | str, progress: Callable[[str, str], None] | None = None) -> CheckReport:
    """Validate contract.yaml, handoff.yaml and every model.py hook; raise on the first problem."""
    started = time.perf_counter()
    report = CheckReport()

    def passed(name: str, detail: str) -> None:
        report.passed.append((name, detail))
        if progress:
            progress(name, detail)

    project = Project.load(project_dir)
    contract = project.contract
    passed(
        "contract.yaml and handoff.yaml",
        f"{len(contract.inputs)} input(s), {len(contract.outputs)} output(s)",
    )
    cfg, detail = _config(project)  # imports model.py: syntax and missing hooks fail here
    passed(
        "model.py hooks",
        "Config, build_model, build_datasets, loss, example_inputs"
        + (", metrics" if hasattr(project.hooks, "metrics") else "")
        + f"; Config: {detail}",
    )
    seed_everything(int_setting(cfg, "seed", 0))
    train_set, detail = _datasets(project, cfg)
    passed("datasets", detail)
    model = call_hook(project.hooks, "build_model", cfg)
    if not isinstance(model, torch.nn.Module):
        raise HandoffError(
            f"build_model(cfg) must return a torch.nn.Module, got {type(model).__name__}",
            file=MODEL_FILE,
            field="build_model",
        )
    model.eval()
    example = example_arrays(project, cfg)
    outputs = torch_outputs(project.hooks, model, example)
    check_arrays(contract.outputs, outputs, what="outputs", source="the model")
    passed(
        "forward pass",
        ", ".join(
            f"{s.name} {list(o.shape)} {o.dtype}" for s, o in zip(contract.outputs, outputs, strict=True)
        ),
    )
    with user_code(project.hooks, "loading a training batch"):
        batch = next(iter(DataLoader(train_set, batch_size=OVERFIT_BATCH)))
    passed("metrics", _metrics(project, model, batch))
    passed("two-step overfit", _overfit(project, model, cfg, batch))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, contract, example, path)
        worst, _ = check_parity(model, project, path, example)
    passed(
        "ONNX export round trip",
        f"max |torch - onnxruntime| = {worst:.2g} (tolerance {contract.slo.parity_tolerance:g})",
    )
    report.seconds = round(time.perf_counter() - started, 2)
    return report
