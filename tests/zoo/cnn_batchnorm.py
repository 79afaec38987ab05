"""A CNN with BatchNorm: 1x12x12 images of a bar (horizontal, vertical or diagonal) in noise.

BatchNorm is the layer most likely to differ between training and serving (batch statistics vs.
running statistics): export must take the eval-mode graph, and parity proves it did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

SIZE = 12
CLASSES = 3  # horizontal, vertical, diagonal


@dataclass
class Config:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-2  # AdamW learning rate
    channels: int = 8  # width of the first convolution
    train_items: int = 600
    val_items: int = 150
    noise: float = 0.3  # std of the Gaussian noise under the bar
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=3, train_items=512, val_items=96)


def build_model(cfg: Config) -> nn.Module:
    """Two conv-BN-ReLU blocks, global average pooling, a linear classifier."""
    c = cfg.channels
    return nn.Sequential(
        nn.Conv2d(1, c, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 12x12 -> 6x6
        nn.Conv2d(c, 2 * c, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * c, CLASSES),
    )


def _bars(n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    images = noise * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    where = torch.randint(2, SIZE - 2, (n,), generator=generator)
    for i in range(n):
        k, label = int(where[i]), int(labels[i])
        if label == 0:
            images[i, 0, k, :] += 1.0
        elif label == 1:
            images[i, 0, :, k] += 1.0
        else:
            images[i, 0] += torch.eye(SIZE).roll(k, dims=1)
    return images, labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic bars (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train = _bars(cfg.train_items, cfg.noise, generator)
    val = _bars(cfg.val_items, cfg.noise, generator)
    return TensorDataset(*train), TensorDataset(*val)


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, target = batch
    return F.cross_entropy(outputs, target)


def metrics(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    _, target = batch
    return {"accuracy": (outputs.argmax(dim=1) == target).float().mean().item()}


def example_inputs(cfg: Config) -> torch.Tensor:
    """Four validation images: the export example and the serving smoke-test request."""
    _, val = build_datasets(cfg)
    return val.tensors[0][:4]
