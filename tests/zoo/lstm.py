"""An LSTM over three-channel sequences of any length: which channel runs highest?

Sequences are noise around a per-channel level; the class is the channel with the highest level.
Hidden states are averaged over time, so the model reads a sequence of any length; the time axis
is dynamic in the contract (-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

CHANNELS = CLASSES = 3


@dataclass
class Config:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-2  # AdamW learning rate
    hidden: int = 16
    layers: int = 2
    steps: int = 10  # length of the training sequences (any length is served)
    train_items: int = 1000
    val_items: int = 200
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=3, layers=1, train_items=512, val_items=96)


class LevelClassifier(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.lstm = nn.LSTM(CHANNELS, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden, CLASSES)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(sequence)  # (batch, time, hidden)
        return self.head(hidden.mean(dim=1))


def build_model(cfg: Config) -> nn.Module:
    return LevelClassifier(cfg)


def _sequences(n: int, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    levels = torch.rand(n, CHANNELS, generator=generator)
    levels[torch.arange(n), labels] += 1.0
    sequences = levels.view(n, 1, CHANNELS) + 0.3 * torch.randn(n, steps, CHANNELS, generator=generator)
    return sequences, labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic sequences (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train = _sequences(cfg.train_items, cfg.steps, generator)
    val = _sequences(cfg.val_items, cfg.steps, generator)
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
