"""train: fit model.py's model on its training data, log to MLflow, write a checkpoint.

Seeded, with a progress bar, a NaN guard (a non-finite loss stops training with the epoch and
step), validation metrics every epoch, and an atomic checkpoint so a crash never leaves half a
file where export expects a model. Resumable state is saved every N steps and at each epoch end;
given the pipeline run's key, it is also kept in the MLflow run's artifacts, where a retried
step's new pod finds it (``handoff.resume_store``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlflow
import torch
import torch.distributed as dist
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from handoff import __version__, distributed
from handoff.artifact_store import check_before_training
from handoff.checkpoints import latest_state, newest_state_step, save_checkpoint, save_state, state_step
from handoff.config_fields import int_setting
from handoff.contract import Contract
from handoff.data_hash import data_sha256
from handoff.data_order import EpochBatches
from handoff.errors import HandoffError
from handoff.hooks import (
    MODEL_FILE,
    ModelModule,
    Scored,
    SplitMeans,
    build_optimizer,
    call_hook,
    contract_outputs,
    data_version,
    hook_batch,
    items_in_batch,
    joined_chunks,
    map_leaves,
    model_outputs,
    split_batch,
    user_code,
)
from handoff.lineage import DATA_TAG
from handoff.precision import Precision, allow_fast_kernels, choose_precision
from handoff.project import Project
from handoff.resume_store import RUN_KEY_TAG, RemoteStates, Uploader, check_run_key, find_run
from handoff.runtime import seed_everything
from handoff.tracking import use_tracking

# EX_TEMPFAIL: "temporary failure, try again". Retry policies (KFP, Argo retryStrategy) key on it.
PREEMPTED_EXIT_CODE = 75


@dataclass(frozen=True)
class TrainResult:
    """What training produced; ``mlflow_run_id`` ties later steps to the same MLflow run."""

    checkpoint: str
    mlflow_run_id: str
    epochs: int
    steps: int
    train_loss: float
    val_metrics: dict[str, float]
    world_size: int
    resumed_from_step: int
    samples: int
    loop_seconds: float
    seconds: float


def evaluate_torch(
    hooks: ModelModule, model: torch.nn.Module, loader: DataLoader, contract: Contract
) -> dict[str, float]:
    """Loss and researcher metrics over a whole split with the torch model, as evaluation computes
    them: each epoch reads the split once, batch by batch, and holds one chunk of it at a time
    (``handoff.hooks.SplitMeans``), so a split bigger than memory validates too. The chunks are
    evaluation's, item for item, whatever ``loader``'s batch size (``handoff.hooks.joined_chunks``):
    the numbers watched in training are the ones the gate judges."""
    device = next(model.parameters()).device
    means = SplitMeans(hooks, contract.output_names)

    def batches() -> Iterator[Scored]:
        for batch in loader:
            x, y = split_batch(batch)
            value = model(*(t.to(device) for t in x))
            yield tuple(t.cpu() for t in contract_outputs(value, contract)), x, y

    model.eval()
    with torch.no_grad(), user_code(hooks, "the forward pass on the validation split"):
        for chunk in joined_chunks(hooks, batches()):
            means.add(chunk)
    model.train()
    return means.result()


class Preempted(SystemExit):
    """SIGTERM (preemption, eviction): state was saved; exit with a code that asks for a retry."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message


@contextlib.contextmanager
def sigterm_requested() -> Iterator[list[bool]]:
    """A flag set by SIGTERM, checked between optimizer steps (a step is never cut in half)."""
    flag = [False]

    def handle(signum: int, frame: Any) -> None:
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def state_dir_for(checkpoint: Path | str) -> Path:
    """Where resumable state lives: beside the final checkpoint, so a retried step finds it."""
    return Path(f"{checkpoint}.state")


def train(
    project_dir: Path | str,
    checkpoint: Path | str,
    *,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
    state_dir: Path | str | None = None,
    run_key: str = "",
) -> TrainResult:
    """Train the project's model and write ``checkpoint`` (state dict + the Config used).

    Resumes from the newest complete state in ``state_dir`` (default ``<checkpoint>.state/``)
    unless ``fresh``; runs data parallel when started by torchrun. With a ``run_key`` (the
    pipeline run's id, the same for every attempt) the MLflow run is tagged with it and every
    state is also stored in its artifacts: an attempt whose disk is new (a retried pod) resumes
    from there, in the same MLflow run. SIGTERM is honoured from the first line on: one that
    arrives while data and model are still being built stops training after its first step,
    with that step's state saved.
    """
    states = Path(state_dir) if state_dir is not None else state_dir_for(checkpoint)
    if run_key:
        check_run_key(run_key)
    with sigterm_requested() as stop:
        return _train(project_dir, checkpoint, overrides, fresh, states, run_key, stop)


def _restore(remote: RemoteStates, states: Path) -> None:
    """Fetch the remote state when it is newer than any here (a retried pod has none here)."""
    names = remote.names()
    if names and state_step(names[0]) > newest_state_step(states):
        remote.download(names[0], states)
        print(f"handoff: fetched training state {names[0]} from {remote.where}", file=sys.stderr, flush=True)


def _rng_states(ctx: distributed.Dist) -> list[dict[str, torch.Tensor]]:
    """Every rank's random number generator states (CPU, and CUDA where used), gathered on each
    rank: a resumed rank continues its own sequence (dropout, augmentation), not rank 0's."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if not ctx.enabled:
        return [mine]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    return [{name: tensor.cpu() for name, tensor in states.items()} for states in gathered]


def _set_rng_states(ctx: distributed.Dist, state: dict[str, Any]) -> None:
    ranks = state.get("rng_ranks")
    if not ranks or len(ranks) != ctx.world_size:  # an older state, or another world size
        torch.set_rng_state(state["rng"])
        return
    torch.set_rng_state(ranks[ctx.rank]["cpu"])
    if "cuda" in ranks[ctx.rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ranks[ctx.rank]["cuda"])


def _logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    """Epochs an earlier attempt of this MLflow run already logged (it may have logged an epoch
    whose state it did not live to store): they are not logged twice."""
    history = client.get_metric_history(run_id, "train_loss")
    return {metric.step for metric in history}


def _train(
    project_dir: Path | str,
    checkpoint: Path | str,
    overrides: dict[str, Any] | None,
    fresh: bool,
    states: Path,
    run_key: str,
    stop: list[bool],
) -> TrainResult:
    started = time.perf_counter()
    project = Project.load(project_dir)
    check_before_training(project)  # a cluster run whose registry KServe cannot read stops here
    hooks = project.hooks
    cfg = project.config(overrides)
    seed, batch_size, epochs = (
        int_setting(cfg, "seed", 0),
        int_setting(cfg, "batch_size", 64),
        int_setting(cfg, "epochs", 1),
    )
    ctx = distributed.init_from_env()
    if batch_size % ctx.world_size:
        raise HandoffError(
            f"Config.batch_size {batch_size} is the global batch and must divide evenly over "
            f"{ctx.world_size} processes",
            file=MODEL_FILE,
            field="Config.batch_size",
        )
    seed_everything(seed)
    device = ctx.device()
    train_set, val_set = call_hook(hooks, "build_datasets", cfg)
    model = call_hook(hooks, "build_model", cfg).to(device)
    optimizer = build_optimizer(hooks, model, cfg)
    every = project.settings.training.checkpoint_every_steps

    if fresh and ctx.is_main:
        shutil.rmtree(states, ignore_errors=True)
    earlier_run = ""  # this pipeline run's MLflow run, from an earlier attempt of the step
    if ctx.is_main and run_key:
        client = use_tracking(project)
        experiment = client.get_experiment_by_name(project.settings.mlflow.experiment)
        assert experiment is not None  # use_tracking made sure it exists
        earlier_run = "" if fresh else find_run(client, experiment.experiment_id, run_key) or ""
        if earlier_run:
            _restore(RemoteStates(client, earlier_run), states)
    ctx.barrier()
    states.mkdir(parents=True, exist_ok=True)
    state = latest_state(states)
    epoch0, step_in_epoch, step, run_id, sums = 1, 0, 0, earlier_run, [0.0, 0.0]
    last_loss, val_metrics = math.nan, {}
    loop_seconds, samples = 0.0, 0  # the optimizer-step loop alone (throughput), this process
    if state is not None:
        if state["config"] != dataclasses.asdict(cfg):
            raise HandoffError(
                f"the saved training state {state['path']} was written with a different "
                "Config; start over with `handoff train --fresh`",
                file=MODEL_FILE,
                field="Config",
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_states(ctx, state)
        epoch0, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        run_id, sums = state["mlflow_run_id"] or run_id, list(state["loss_sums"])
        last_loss, val_metrics = state["last"]["train_loss"], dict(state["last"]["val_metrics"])
        if ctx.is_main:
            print(f"resuming from {state['path']}: epoch {epoch0}, step {step}", flush=True)
    training = project.settings.training
    precision = choose_precision(device, mixed=training.mixed_precision)
    allow_fast_kernels(device)
    scaler = precision.scaler(device)
    if state is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained: torch.nn.Module = DistributedDataParallel(model) if ctx.enabled else model
    if training.compile:
        trained = cast(torch.nn.Module, torch.compile(trained))
    stepper = Stepper(
        hooks, project.contract, trained, optimizer, device, precision, scaler, training.channels_last
    )
    loading = loader_options(device, ctx.world_size)

    uploader: Uploader | None = None

    def snapshot(epoch: int, in_epoch: int) -> None:
        rng = _rng_states(ctx)  # a collective: every rank takes part
        if ctx.is_main:
            saved = save_state(
                states,
                step,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng[0]["cpu"],
                    "rng_ranks": rng,
                    "scaler": scaler.state_dict(),
                    "config": dataclasses.asdict(cfg),
                    "epoch": epoch,
                    "step_in_epoch": in_epoch,
                    "step": step,
                    "mlflow_run_id": run_id,
                    "loss_sums": sums,
                    "last": {"train_loss": last_loss, "val_metrics": val_metrics},
                },
            )
            if uploader is not None:
                uploader.offer(saved)
        ctx.barrier()

    logged: set[int] = set()  # epochs an earlier attempt already logged in this MLflow run
    if ctx.is_main:
        client = use_tracking(project)
        resumed_run = bool(run_id)
        run_id = mlflow.start_run(
            run_id=run_id or None,
            run_name=f"{project.settings.project}-train",
            tags={RUN_KEY_TAG: run_key} if run_key else None,
        ).info.run_id
        if resumed_run:
            logged = _logged_epochs(client, run_id)
        if run_key:
            uploader = Uploader(RemoteStates(client, run_id), states / ".upload")
    try:
        if ctx.is_main and state is None:
            with user_code(hooks, "reading the datasets' items to hash them"):
                # register copies it onto the version; model.py's data_version() spares the read
                data = data_sha256(train_set, val_set, version=data_version(hooks, cfg))
            mlflow.set_tags(
                {
                    "handoff.template_version": __version__,
                    "handoff.step": "train",
                    "handoff.contract_sha256": project.contract.sha256,
                    "handoff.world_size": str(ctx.world_size),
                    "handoff.precision": precision.name,
                    DATA_TAG: data,
                }
            )
            mlflow.log_params(dataclasses.asdict(cfg))
        val_loader = DataLoader(val_set, batch_size=max(batch_size, 256))
        for epoch in range(epoch0, epochs + 1):
            sampler = EpochBatches(
                len(train_set),
                batch_size,
                seed=seed,
                epoch=epoch,
                rank=ctx.rank,
                world_size=ctx.world_size,
                start_step=step_in_epoch,
            )
            bar = tqdm(
                DataLoader(train_set, batch_sampler=sampler, **loading),
                desc=f"epoch {epoch}/{epochs}",
                file=sys.stdout,
                disable=None if ctx.is_main else True,
                leave=False,
                mininterval=1.0,
            )
            loop_started = time.perf_counter()
            with user_code(hooks, f"training (epoch {epoch})"):
                for batch in bar:
                    loss, size = stepper(batch, epoch, step)
                    step += 1
                    step_in_epoch += 1
                    sums[0] += loss * size
                    sums[1] += size
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    if ctx.any(stop[0]):
                        snapshot(epoch, step_in_epoch)
                        raise Preempted(
                            f"SIGTERM at epoch {epoch}, step {step}: state saved in {states}; "
                            f"run the step again to resume (exit code {PREEMPTED_EXIT_CODE})"
                        )
                    if every and step % every == 0:
                        snapshot(epoch, step_in_epoch)
            loop_seconds += time.perf_counter() - loop_started
            samples += int(sums[1])
            total, seen = ctx.sum(sums)
            last_loss, step_in_epoch, sums = total / max(seen, 1), 0, [0.0, 0.0]
            if ctx.is_main:
                val_metrics = evaluate_torch(hooks, model, val_loader, project.contract)
            snapshot(epoch + 1, 0)  # saved before logging: a resume never logs an epoch twice
            if ctx.is_main:
                if epoch not in logged:
                    mlflow.log_metrics({"train_loss": last_loss, **val_metrics}, step=epoch)
                shown = ", ".join(f"{k}={v:.4f}" for k, v in val_metrics.items())
                print(f"epoch {epoch}/{epochs}: train_loss={last_loss:.4f} {shown}", flush=True)
        if ctx.is_main:
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
        ctx.barrier()
    except Preempted as exc:
        if ctx.is_main:
            mlflow.end_run(status="KILLED")
            print(f"handoff: train preempted: {exc.message}", file=sys.stderr, flush=True)
        raise
    except MlflowException as exc:
        mlflow.end_run(status="FAILED")
        raise HandoffError(
            f"MLflow rejected what training logged: {exc.message}", file=MODEL_FILE, field="Config/metrics"
        ) from None
    except BaseException:
        if ctx.is_main:
            mlflow.end_run(status="FAILED")
        raise
    finally:
        if uploader is not None:
            uploader.close()  # the last state (the final one, or SIGTERM's) is stored before the step ends
        distributed.shutdown(ctx)
    if ctx.is_main:
        mlflow.end_run()
    return TrainResult(
        checkpoint=str(checkpoint),
        mlflow_run_id=run_id,
        epochs=epochs,
        steps=step,
        train_loss=last_loss,
        val_metrics=val_metrics,
        world_size=ctx.world_size,
        resumed_from_step=int(state["step"]) if state else 0,
        samples=samples,
        loop_seconds=round(loop_seconds, 4),
        seconds=round(time.perf_counter() - started, 3),
    )


@dataclass
class Stepper:
    """One optimizer step with the run's device, precision and memory format decided once.

    This runs once per batch, a few milliseconds each on a CPU, so its own Python work is kept
    small: where a tensor is already on the right device and format, it is not touched; the loss
    comes to the host once per step (``.item()``), for both the NaN guard and the running sum;
    and the loss hook is a plain call, wrapped for error reporting only when it raises.
    """

    hooks: ModelModule
    contract: Contract
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler
    channels_last: bool
    moves: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        # DataLoader batches are CPU tensors in the default (contiguous) format.
        self.moves = self.device.type != "cpu" or self.channels_last

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _loss(self, outputs: Any, batch: tuple[Any, Any]) -> torch.Tensor:
        """model.py's ``loss()``, failing as ``call_hook`` reports it.

        ``call_hook`` sets up its error context on every call, which cost ~35 µs (about 1%) a
        step here; this enters the same context only once ``loss()`` has raised, so the message
        (what ran, model.py's line) is the same.
        """
        try:
            loss: torch.Tensor = self.hooks.loss(outputs, batch)
        except Exception:
            with user_code(self.hooks, "loss()"):  # re-raised as call_hook's HandoffError
                raise
        return loss

    def __call__(self, batch: Any, epoch: int, step: int) -> tuple[float, int]:
        """Returns the loss and the number of items, after the NaN guard."""
        inputs, target = split_batch(batch)
        if self.moves:
            inputs = tuple(self._move(x) for x in inputs)
            target = map_leaves(target, lambda t: t.to(self.device, non_blocking=True))
        with self.precision.autocast(self.device):
            outputs = model_outputs(self.model, inputs, self.contract)
            loss = self._loss(outputs, hook_batch((inputs, target)))
        # The step's one host sync (on a GPU it waits for the forward pass only; backward and
        # the update are then queued without waiting), before the update so a bad step is
        # never applied.
        value = loss.item()
        if not math.isfinite(value):
            raise HandoffError(
                f"loss() returned {value} at epoch {epoch}, step {step + 1}; training stopped and "
                "nothing was exported or registered (lower the learning rate or check the data and loss "
                "for divide-by-zero / log(0))",
                file=MODEL_FILE,
                field="loss",
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value, items_in_batch(inputs)


def loader_options(device: torch.device, world_size: int) -> dict[str, Any]:
    """Worker processes and pinned memory where they pay: feeding a GPU, not competing with a CPU."""
    if device.type != "cuda":
        return {}
    workers = max(1, min(8, (os.cpu_count() or 2) // max(1, torch.cuda.device_count() or world_size) - 1))
    return {"num_workers": workers, "pin_memory": True, "prefetch_factor": 4}
