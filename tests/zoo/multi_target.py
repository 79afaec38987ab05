"""A multi-task model with dict targets: which segment holds the bump (class) and how tall it is.

Each item is a 1x32 signal with one bump in one of four segments. The target is a dict,
``{"label": class id, "height": bump height}``; the model returns a dict of two heads and the
loss adds cross-entropy and a weighted MSE. The contract scores ``logits`` against the ``label``
target (``task.output``, ``task.target``); the height head is served beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

LENGTH, SEGMENTS = 32, 4
HEIGHT_WEIGHT = 0.5  # the height loss against the class loss (loss() sees no Config)
Targets = dict[str, torch.Tensor]


@dataclass
class Config:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-2  # AdamW learning rate
    channels: int = 8
    train_items: int = 1000
    val_items: int = 200
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=4, train_items=512, val_items=96)


class BumpNet(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        c = cfg.channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2), nn.ReLU(), nn.Conv1d(c, c, 5, padding=2), nn.ReLU()
        )
        self.classify = nn.Linear(c * SEGMENTS, SEGMENTS)
        self.measure = nn.Linear(c * SEGMENTS, 1)

    def forward(self, signal: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = F.adaptive_max_pool1d(self.features(signal), SEGMENTS).flatten(1)
        return {"logits": self.classify(pooled), "height": self.measure(pooled)}


def build_model(cfg: Config) -> nn.Module:
    return BumpNet(cfg)


class Bumps(Dataset):
    """Items are (signal, {"label": class id, "height": (1,) float})."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.labels = torch.randint(0, SEGMENTS, (n,), generator=generator)
        self.heights = 0.5 + torch.rand(n, 1, generator=generator)
        width = LENGTH // SEGMENTS
        centres = self.labels * width + torch.randint(2, width - 2, (n,), generator=generator)
        x = torch.arange(LENGTH, dtype=torch.float32).view(1, -1)
        bumps = self.heights * torch.exp(-((x - centres.view(-1, 1)) ** 2) / 2.0)
        self.signals = (bumps + 0.1 * torch.randn(n, LENGTH, generator=generator)).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Targets]:
        return self.signals[i], {"label": self.labels[i], "height": self.heights[i]}


def build_datasets(cfg: Config) -> tuple[Bumps, Bumps]:
    """Synthetic bumps (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return Bumps(cfg.train_items, generator), Bumps(cfg.val_items, generator)


def loss(outputs: dict[str, torch.Tensor], batch: tuple[torch.Tensor, Targets]) -> torch.Tensor:
    _, target = batch
    classes = F.cross_entropy(outputs["logits"], target["label"])
    return classes + HEIGHT_WEIGHT * F.mse_loss(outputs["height"], target["height"])


def metrics(outputs: dict[str, torch.Tensor], batch: tuple[torch.Tensor, Targets]) -> dict[str, float]:
    _, target = batch
    return {
        "accuracy": (outputs["logits"].argmax(dim=1) == target["label"]).float().mean().item(),
        "height_mae": (outputs["height"] - target["height"]).abs().mean().item(),
    }


def example_inputs(cfg: Config) -> torch.Tensor:
    _, val = build_datasets(cfg)
    return val.signals[:4]
