"""A classifier that also serves its embedding: two outputs, [embedding, logits], as a tuple.

A retrieval service reads the unit-length embedding, a classifier reads the logits; the contract
lists both and says (``task.output: logits``) which one the evaluation suite scores. Data: three
Gaussian clusters in six dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

FEATURES, EMBEDDING, CLASSES = 6, 8, 3
Outputs = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Config:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-2  # AdamW learning rate
    hidden: int = 32
    train_items: int = 1000
    val_items: int = 200
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=3, train_items=512, val_items=96)


class EmbedAndClassify(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(FEATURES, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, EMBEDDING)
        )
        self.classifier = nn.Linear(EMBEDDING, CLASSES)

    def forward(self, features: torch.Tensor) -> Outputs:
        embedding = F.normalize(self.encoder(features), dim=1)
        # Scaled: unit-length embeddings give logits too small for a confident softmax.
        return embedding, self.classifier(4.0 * embedding)


def build_model(cfg: Config) -> nn.Module:
    return EmbedAndClassify(cfg)


def _clusters(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = 2.0 * torch.eye(CLASSES, FEATURES)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return centres[labels] + 0.6 * torch.randn(n, FEATURES, generator=generator), labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic clusters (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train = _clusters(cfg.train_items, generator)
    val = _clusters(cfg.val_items, generator)
    return TensorDataset(*train), TensorDataset(*val)


def loss(outputs: Outputs, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, logits = outputs
    _, target = batch
    return F.cross_entropy(logits, target)


def metrics(outputs: Outputs, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    embedding, logits = outputs
    _, target = batch
    return {
        "accuracy": (logits.argmax(dim=1) == target).float().mean().item(),
        "embedding_norm": embedding.norm(dim=1).mean().item(),
    }


def example_inputs(cfg: Config) -> torch.Tensor:
    _, val = build_datasets(cfg)
    return val.tensors[0][:4]
