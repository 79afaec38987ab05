"""A GRU over fixed-length two-channel time series: is the trend rising or falling?

Each series is 16 steps of a noisy line with a random slope in both channels; the label is the
sign of the slope. The last hidden state feeds a linear classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

STEPS, CHANNELS, CLASSES = 16, 2, 2


@dataclass
class Config:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-2  # AdamW learning rate
    hidden: int = 16
    train_items: int = 1000
    val_items: int = 200
    noise: float = 0.3
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=3, train_items=512, val_items=96)


class TrendClassifier(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.gru = nn.GRU(CHANNELS, cfg.hidden, batch_first=True)
        self.head = nn.Linear(cfg.hidden, CLASSES)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(series)  # last: (layers, batch, hidden)
        return self.head(last[-1])


def build_model(cfg: Config) -> nn.Module:
    return TrendClassifier(cfg)


def _series(n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    slope = (0.05 + 0.1 * torch.rand(n, 1, 1, generator=generator)) * (2 * labels.view(-1, 1, 1) - 1)
    t = torch.arange(STEPS, dtype=torch.float32).view(1, -1, 1)
    offset = torch.randn(n, 1, CHANNELS, generator=generator)
    series = offset + slope * t + noise * torch.randn(n, STEPS, CHANNELS, generator=generator)
    return series, labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic series (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train = _series(cfg.train_items, cfg.noise, generator)
    val = _series(cfg.val_items, cfg.noise, generator)
    return TensorDataset(*train), TensorDataset(*val)


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, target = batch
    return F.cross_entropy(outputs, target)


def metrics(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    _, target = batch
    return {"accuracy": (outputs.argmax(dim=1) == target).float().mean().item()}


def example_inputs(cfg: Config) -> torch.Tensor:
    _, val = build_datasets(cfg)
    return val.tensors[0][:4]
