"""{{ cookiecutter.project_name }}: the model, its data, loss and metrics in plain PyTorch.

Starter: tabular regression. A small MLP predicts diabetes progression one year on from ten
measurements at baseline, on scikit-learn's bundled diabetes data (offline). It takes the
measurements as they are recorded and answers in the target's units: the scaling is in the
model, so it travels with it to serving.

This is the one file a researcher edits: swap in any architecture, data or loss, as long as the
hooks below keep their contract with contract.yaml. The platform (`handoff`) trains the model,
exports it to ONNX, evaluates it, registers and serves it. The hooks (`make check` tests them all
in seconds; model.py imports nothing from the platform):

* ``Config``: a dataclass with a default for every field (handoff.yaml's ``training.overrides``
  changes them in pipeline runs); ``Config.tiny()``, optional, is a seconds-long smoke run.
* ``build_datasets(cfg) -> (train, val)``: torch Datasets whose items are ``(inputs, target)``.
  ``inputs``: a tensor, or a tuple of tensors in the order of contract.yaml ``inputs``.
  ``target``: a tensor, a tuple of tensors, or a dict of name -> tensor. ``val`` is the held-out
  split the evaluation suite and the gate score.
* ``build_model(cfg) -> nn.Module``: called as ``model(*inputs)``, one positional argument per
  contract input. It may return a tensor, a tuple of tensors in the order of contract.yaml
  ``outputs``, or a dict (a HuggingFace ``ModelOutput`` too) holding every output's name as a key.
* ``loss(outputs, batch)`` and, optional, ``metrics(outputs, batch) -> dict``: ``outputs`` as the
  model returned them (with one contract output: that tensor), ``batch`` is ``(inputs, target)``.
  On the held-out split they run once over the whole split; one whose inputs and targets exceed
  64 MiB is scored in chunks, and ``val_loss`` and metrics are the chunks' values averaged
  weighted by items: exact for means (this MSE), approximate for metrics that do not decompose
  (F1 or AUC computed in ``metrics``).
* ``example_inputs(cfg)``: a few real held-out items; export and the serving smoke test replay them.
* ``data_version(cfg) -> str``, optional: names the data's version (a snapshot id, a dataset
  commit); the platform then fingerprints the data by it instead of hashing every item, as data
  bigger than memory needs (or give the datasets a ``data_manifest()`` listing their files). It
  must change whenever the data or the split does, so put the split's parameters in it (here
  ``split_seed`` and ``val_fraction``): the same string must mean the same held-out items, or the
  champion could be scored on items it was trained on.

In contract.yaml every ``-1`` is a dynamic axis (the first one is the batch); an integer input may
declare ``range: [low, high]``, which check, evaluation and the model server enforce; ``task`` may
be ``{type, output, target}`` to say which output and which target the evaluation suite scores.
Packages model.py needs beyond the platform's go in requirements-model.txt; modules and files
beside model.py travel with it into the project image.

Run ``make check`` after each change, ``make test`` for the project's own tests, then ``make run``
for the whole pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import TensorDataset

# The columns of contract.yaml's `features` input, in order.
FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
# The target's spread in this data (its standard deviation, about 77): it scales the loss only.
TARGET_SCALE = 77.0


@dataclass
class Config:
    epochs: int = 15  # passes over the ~350 training rows
    batch_size: int = 32
    lr: float = 1e-2  # AdamW learning rate
    weight_decay: float = 1e-2
    hidden: int = 32  # width of the hidden layer
    val_fraction: float = 0.2  # share of the data held out for evaluation
    seed: int = 0  # seeds weights and batch order
    # Seeds the held-out split. Keep it fixed: the registry's champion is only compared on the
    # split it was evaluated on (another would score it on items it was trained on).
    split_seed: int = 0

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=2)


def _splits(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    data = load_diabetes(scaled=False)  # raw units: age in years, bmi, blood pressure, ...
    features = torch.tensor(data.data, dtype=torch.float32)
    target = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)  # (rows, 1)
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = int(len(target) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(features[train], target[train]), TensorDataset(features[val], target[val])


class Regressor(nn.Module):
    """Standardise the features, an MLP, then back to the target's units (statistics of the
    training split, kept as buffers so export and serving carry them)."""

    def __init__(self, cfg: Config, features: torch.Tensor, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x_mean", features.mean(dim=0))
        self.register_buffer("x_std", features.std(dim=0))
        self.register_buffer("y_mean", target.mean(dim=0))
        self.register_buffer("y_std", target.std(dim=0))
        self.net = nn.Sequential(
            nn.Linear(len(FEATURES), cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.x_mean) / self.x_std
        return self.net(z) * self.y_std + self.y_mean


def build_model(cfg: Config) -> nn.Module:
    train, _ = _splits(cfg)
    return Regressor(cfg, *train.tensors)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Optional hook (the default is AdamW at ``cfg.lr``): here with weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled diabetes data (442 patients), split by a seeded permutation."""
    return _splits(cfg)


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error in standardised target units (about 1 for a model that knows nothing)."""
    _, target = batch
    return F.mse_loss(outputs, target) / TARGET_SCALE**2


def example_inputs(cfg: Config) -> torch.Tensor:
    """Four held-out patients: the export example and the serving smoke-test request. The
    evaluation suite reports MAE, RMSE and R² for regression; no ``metrics`` hook is needed."""
    _, val = build_datasets(cfg)
    return val.tensors[0][:4]
