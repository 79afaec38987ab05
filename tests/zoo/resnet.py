"""A small ResNet, hand-written: residual blocks with BatchNorm and a strided 1x1 shortcut.

Data: 3x16x16 colour images with one bright square in one of the four quadrants, in noise; the
class is the quadrant. The skip connections (an Add the exporter must keep) and the projection
shortcut where the shape changes are what this architecture adds over a plain CNN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

SIZE = 16
CLASSES = 4  # top-left, top-right, bottom-left, bottom-right


@dataclass
class Config:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 5e-3  # AdamW learning rate
    width: int = 8  # channels of the stem; each stage doubles them
    blocks: int = 1  # residual blocks per stage
    train_items: int = 1000
    val_items: int = 200
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=3, train_items=512, val_items=96)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (projected by a strided 1x1 conv when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        stages: list[nn.Module] = []
        channels = w
        for stage in range(2):
            out = w * 2**stage
            for block in range(cfg.blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out, stride))
                channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels * 4, CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(image))
        # Pooled to 2x2, not to 1x1: which quadrant lit up is a matter of position.
        return self.head(F.adaptive_avg_pool2d(features, 2).flatten(1))


def build_model(cfg: Config) -> nn.Module:
    return ResNet(cfg)


def _squares(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    colours = torch.rand(n, 3, generator=generator) + 0.5
    half = SIZE // 2
    for i in range(n):
        row, col = divmod(int(labels[i]), 2)
        top = row * half + int(torch.randint(0, half - 3, (1,), generator=generator))
        left = col * half + int(torch.randint(0, half - 3, (1,), generator=generator))
        images[i, :, top : top + 3, left : left + 3] += colours[i].view(3, 1, 1)
    return images, labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic squares (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return TensorDataset(*_squares(cfg.train_items, generator)), TensorDataset(
        *_squares(cfg.val_items, generator)
    )


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, target = batch
    return F.cross_entropy(outputs, target)


def metrics(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    _, target = batch
    return {"accuracy": (outputs.argmax(dim=1) == target).float().mean().item()}


def example_inputs(cfg: Config) -> torch.Tensor:
    _, val = build_datasets(cfg)
    return val.tensors[0][:4]
