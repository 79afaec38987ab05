"""{{ cookiecutter.project_name }}: the model, its data, loss and metrics in plain PyTorch.

Starter: image classification. A small CNN reads scikit-learn's bundled 8x8 handwritten digits
(offline) and names the digit.

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
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class Config:
    epochs: int = 12  # passes over the ~1,400 training images
    batch_size: int = 64
    lr: float = 3e-3  # AdamW learning rate
    channels: int = 16  # width of the first convolution
    val_fraction: float = 0.2  # share of the data held out for evaluation
    seed: int = 0  # seeds weights and batch order
    # Seeds the held-out split. Keep it fixed: the registry's champion is only compared on the
    # split it was evaluated on (another would score it on items it was trained on).
    split_seed: int = 0

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=1)


def build_model(cfg: Config) -> nn.Module:
    """A small CNN for 1x8x8 images: two convolutions, then a linear classifier."""
    c = cfg.channels
    return nn.Sequential(
        nn.Conv2d(1, c, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, 2 * c, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(2 * c * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (offline), scaled to [0, 1], split by a seeded permutation."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = int(len(labels) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, target = batch
    return F.cross_entropy(outputs, target)


def metrics(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Computed once over the whole held-out split, not averaged over batches. A split whose
    inputs and targets exceed 64 MiB is scored in chunks of about that size, and ``val_loss`` and
    these metrics are the chunks' values averaged weighted by items: exact for means like this
    accuracy, approximate for metrics that do not decompose (F1 or AUC computed here).

    The platform's evaluation suite adds macro-F1, calibration (ECE), per-class precision and
    recall and a confusion matrix for the contract's task. To see metrics per slice of your own
    (e.g. per writer or per source), add ``def slices(batch) -> list[str]``, one key per item.
    """
    _, target = batch
    return {"accuracy": (outputs.argmax(dim=1) == target).float().mean().item()}


def example_inputs(cfg: Config) -> torch.Tensor:
    """Four held-out digits: the export example and the serving smoke-test request."""
    _, val = build_datasets(cfg)
    return val.tensors[0][:4]
