"""A tabular regressor: an MLP that predicts a house-price-like number from eight features.

The target is a fixed nonlinear function of the features plus noise, standardised; the contract's
task is ``regression``, so the evaluation suite scores MAE, RMSE and R² on the one output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

FEATURES = 8


@dataclass
class Config:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-2  # AdamW learning rate
    hidden: int = 32
    train_items: int = 2000
    val_items: int = 400
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=5, train_items=512, val_items=128)


def build_model(cfg: Config) -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, cfg.hidden),
        nn.LayerNorm(cfg.hidden),
        nn.GELU(),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.GELU(),
        nn.Linear(cfg.hidden, 1),
    )


def _rows(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, FEATURES, generator=generator)
    weights = torch.linspace(-1.0, 1.0, FEATURES)
    y = x @ weights + 0.5 * x[:, 0] * x[:, 1] + 0.1 * torch.randn(n, generator=generator)
    return x, (y / 1.5).unsqueeze(1)


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic rows (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return TensorDataset(*_rows(cfg.train_items, generator)), TensorDataset(*_rows(cfg.val_items, generator))


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, target = batch
    return F.mse_loss(outputs, target)


def example_inputs(cfg: Config) -> torch.Tensor:
    _, val = build_datasets(cfg)
    return val.tensors[0][:4]
