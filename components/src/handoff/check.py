"""``handoff check``: does model.py satisfy the contract? Seconds, not a training run.

Runs each hook once and names the hook or contract field at fault, so that what ``check`` passes
the pipeline will not reject later: Config builds and is JSON-serialisable (checkpoints and
config.json hold it), datasets yield ``(inputs, target)`` items that match the contract, the
example passes a forward pass with the contract's output shapes and dtypes (integer values
within the contract's ranges), the evaluation suite can score the contract's output against the
chosen target over joined batches, ``metrics()`` returns numbers under names MLflow accepts and
every metric the contract gates on is one evaluation measures (the suite's for the task,
``val_loss``, or ``metrics()``'s), two optimizer steps on one batch lower a finite loss, and the
model survives an ONNX export round trip within the parity tolerance, at two sizes of every
dynamic (-1) axis.
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

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from handoff.config_fields import int_setting
from handoff.contract import CONTRACT_FILE
from handoff.contract_examples import example_arrays
from handoff.errors import HandoffError
from handoff.eval_suite import SUITE_METRICS, evaluate_outputs
from handoff.hooks import (
    MODEL_FILE,
    build_optimizer,
    call_hook,
    contract_outputs,
    hook_batch,
    items_in_batch,
    join_batches,
    map_leaves,
    metric_values,
    model_outputs,
    score_split,
    scored_target,
    split_batch,
    user_code,
)
from handoff.model_source import RAW_HOOKS
from handoff.onnx_export import check_parity, dynamic_axes, export_onnx, torch_outputs
from handoff.onnx_io import check_arrays
from handoff.project import Project
from handoff.raw_io import check_raw_hooks, has_raw_hooks, postprocess, preprocess, raw_request
from handoff.runtime import seed_everything

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
    sizes: list[str] = []
    for label, dataset in zip(("train", "val"), datasets, strict=True):
        try:
            sizes.append(str(len(dataset)))
        except TypeError:
            # Evaluation streams the val split, so a stream (an IterableDataset over shards) is
            # fine there; training shuffles and resumes by index, which needs a length.
            if label == "train" or not isinstance(dataset, IterableDataset):
                raise HandoffError(
                    f"the {label} dataset must define __len__"
                    + ("" if label == "train" else " or be a torch IterableDataset"),
                    file=MODEL_FILE,
                    field="build_datasets",
                ) from None
            sizes.append("?")
        if sizes[-1] == "0":
            raise HandoffError(f"the {label} dataset is empty", file=MODEL_FILE, field="build_datasets")
        with user_code(project.hooks, f"loading a batch of the {label} dataset"):
            first = next(iter(DataLoader(dataset, batch_size=2)), None)
        if first is None:
            raise HandoffError(f"the {label} dataset is empty", file=MODEL_FILE, field="build_datasets")
        inputs, _ = split_batch(first)
        check_arrays(
            project.contract.inputs,
            [t.detach().numpy() for t in inputs],
            what="inputs",
            source=f"the {label} dataset",
        )
    val = "val streamed (no length)" if sizes[1] == "?" else f"val {sizes[1]} items"
    return datasets[0], f"train {sizes[0]} items, {val}"


def _metrics(project: Project, model: torch.nn.Module, batch: Any) -> str:
    """metrics() on one batch: a dict of numbers under names MLflow accepts; and every metric the
    contract gates on is one evaluation will measure.

    Evaluation measures the suite's headline metrics for the contract's task, ``val_loss`` and
    whatever model.py ``metrics()`` returns. Check holds the contract to that same vocabulary,
    so every gate it passes is one evaluation can decide, and a misspelt name is caught here
    rather than as a failed gate after training.
    """
    own: set[str] = set()
    if hasattr(project.hooks, "metrics"):
        inputs, target = split_batch(batch)
        with torch.no_grad(), user_code(project.hooks, "the forward pass on a training batch"):
            outputs = model_outputs(model, inputs, project.contract)
        own = set(metric_values(call_hook(project.hooks, "metrics", outputs, hook_batch((inputs, target)))))
    bad = sorted(name for name in own if not METRIC_NAME.match(name))
    if bad:
        raise HandoffError(
            f"metric name(s) {bad} are not accepted by MLflow: use letters, digits and _ - . / or spaces",
            file=MODEL_FILE,
            field="metrics",
        )
    task = project.contract.task_type
    suite = SUITE_METRICS[task]
    if hasattr(project.hooks, "metrics"):
        returned = ", ".join(sorted(own)) or "nothing"
        available = f"model.py metrics() {returned}"
    else:
        returned = available = "model.py has no metrics()"
    slo = project.contract.slo
    for kind, bounds in (("min_metrics", slo.min_metrics), ("max_metrics", slo.max_metrics)):
        for name in bounds:
            if name not in {*suite, "val_loss", *own}:
                raise HandoffError(
                    f"no metric is called {name!r}; the gate can read the evaluation suite's {task} "
                    f"metrics ({', '.join(suite)}), val_loss and what model.py metrics() returns "
                    f"({returned}): gate on one of these, or return {name!r} from "
                    "metrics() in model.py",
                    file="contract.yaml",
                    field=f"slo.{kind}.{name}",
                )
    gated = ", ".join(sorted({*slo.min_metrics, *slo.max_metrics})) or "nothing"
    return f"gated: {gated}; available: evaluation suite ({task}) {', '.join(suite)}; val_loss; {available}"


def _suite(project: Project, model: torch.nn.Module, batch: Any) -> str:
    """The validation path on one batch cut in two: outputs, inputs and targets joined leaf by
    leaf (as training and evaluation join a split), loss() and metrics() on the whole, and the
    evaluation suite scoring the contract's output against the chosen target."""
    contract = project.contract
    inputs, target = split_batch(batch)
    half = max(1, items_in_batch(inputs) // 2)
    parts = [slice(0, half), slice(half, None)] if items_in_batch(inputs) > 1 else [slice(None)] * 2
    with user_code(project.hooks, "cutting a training batch in two"):
        pieces = [
            (tuple(x[part] for x in inputs), map_leaves(target, lambda t, part=part: t[part]))
            for part in parts
        ]
    outputs = []
    with torch.no_grad():
        for x, _ in pieces:
            with user_code(project.hooks, "the forward pass on a training batch"):
                value = model(*x)
            outputs.append(tuple(t.detach() for t in contract_outputs(value, contract)))
    score_split(project.hooks, outputs, [x for x, _ in pieces], [y for _, y in pieces], contract.output_names)
    with user_code(
        project.hooks,
        "joining two batches' targets",
        hint="targets must be tensors, or tuples or dicts of tensors, that torch.cat can join",
    ):
        joined = join_batches([y for _, y in pieces])
    scored = contract.scored_output
    name = contract.output_names[scored]
    truth, which = scored_target(joined, contract.task, name)
    predictions = torch.cat([o[scored] for o in outputs]).float().numpy()
    result = evaluate_outputs(contract.task_type, predictions, truth.numpy())
    shown = ", ".join(f"{k} {v:.3g}" for k, v in result.metrics.items())
    return f"{contract.task_type}: output '{name}' against {which} ({shown}, untrained)"


def _raw_hooks(project: Project, model: torch.nn.Module, cfg: Any, example: tuple[torch.Tensor, ...]) -> str:
    """raw_example -> preprocess -> the model -> postprocess, as the model server runs them, each
    result checked: preprocess's against ``inputs``, postprocess's against ``raw.outputs``."""
    contract, hooks = project.contract, project.hooks
    seen = []
    if hasattr(hooks, "preprocess"):
        raw = raw_request(hooks, contract, cfg)
        feeds = preprocess(hooks, contract, raw)
        example = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in feeds.values())
        seen.append(
            "preprocess: "
            + ", ".join(f"{k} {list(v.shape)}" for k, v in raw.items())
            + " -> "
            + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items())
        )
    outputs = torch_outputs(hooks, model, example, contract)
    check_arrays(contract.outputs, outputs, what="outputs", source="the model on preprocess()'s inputs")
    if hasattr(hooks, "postprocess"):
        answer = postprocess(hooks, contract, dict(zip(contract.output_names, outputs, strict=True)))
        seen.append("postprocess: -> " + ", ".join(f"{k} {list(v.shape)}" for k, v in answer.items()))
    return "; ".join(seen)


def _overfit(project: Project, model: torch.nn.Module, cfg: Any, batch: Any) -> str:
    """Two optimizer steps on one batch must lower a finite loss: gradients reach the weights."""
    inputs, target = split_batch(batch)
    optimizer = build_optimizer(project.hooks, model, cfg)
    model.train()

    def loss_now() -> torch.Tensor:
        with user_code(project.hooks, "the forward pass in training mode"):
            outputs = model_outputs(model, inputs, project.contract)
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
    check_raw_hooks(project.hooks, contract, project.root / CONTRACT_FILE)
    optional = [h for h in ("metrics", *RAW_HOOKS) if hasattr(project.hooks, h)]
    passed(
        "model.py hooks",
        "Config, build_model, build_datasets, loss, example_inputs"
        + "".join(f", {h}" for h in optional)
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
    outputs = torch_outputs(project.hooks, model, example, contract)
    check_arrays(contract.outputs, outputs, what="outputs", source="the model")
    passed(
        "forward pass",
        ", ".join(
            f"{s.name} {list(o.shape)} {o.dtype}" for s, o in zip(contract.outputs, outputs, strict=True)
        ),
    )
    if has_raw_hooks(contract):
        passed("raw request hooks", _raw_hooks(project, model, cfg, example))
    with user_code(project.hooks, "loading a training batch"):
        batch = next(iter(DataLoader(train_set, batch_size=OVERFIT_BATCH)))
    passed("metrics", _metrics(project, model, batch))
    passed("evaluation suite", _suite(project, model, batch))
    passed("two-step overfit", _overfit(project, model, cfg, batch))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, contract, example, path)
        worst, _ = check_parity(model, project, path, example)
    sizes = "".join(
        f"; {a.name} axis {a.axis} at {a.size} and {a.other}" for a in dynamic_axes(contract, example)
    )
    passed(
        "ONNX export round trip",
        f"max |torch - onnxruntime| = {worst:.2g} (tolerance {contract.slo.parity_tolerance:g}){sizes}",
    )
    report.seconds = round(time.perf_counter() - started, 2)
    return report
