"""A Transformer encoder over token ids of any length (nn.TransformerEncoder).

Data: sequences of ids from a 32-token vocabulary; class 1 when most tokens come from the upper
half of the vocabulary. The sequence axis is dynamic in the contract (-1): the served model must
answer a 12-token request and a 7-token one alike, and the ids carry a ``range`` so the server
refuses an id the embedding table has no row for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

VOCAB = 32  # ids 0..31; 0 is never drawn (reserved for padding)
CLASSES = 2


@dataclass
class Config:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-3  # AdamW learning rate
    d_model: int = 32
    heads: int = 4
    layers: int = 2
    max_len: int = 64  # longest sequence the position table covers
    seq_len: int = 12  # length of the training sequences (any length up to max_len is served)
    train_items: int = 1000
    val_items: int = 200
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=3, layers=1, train_items=512, val_items=96)


class Encoder(nn.Module):
    """Token + learned position embeddings, a Transformer encoder, mean pooling, a linear head."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.heads, dim_feedforward=2 * cfg.d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.head = nn.Linear(cfg.d_model, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.encoder(self.tokens(ids) + self.positions(positions))
        return self.head(hidden.mean(dim=1))


def build_model(cfg: Config) -> nn.Module:
    return Encoder(cfg)


def _sequences(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    half = VOCAB // 2
    # 80% of the tokens come from the label's half of the vocabulary, the rest from anywhere.
    own = torch.randint(1, half, (n, length), generator=generator) + labels.view(-1, 1) * (half - 1)
    anywhere = torch.randint(1, VOCAB, (n, length), generator=generator)
    ids = torch.where(torch.rand(n, length, generator=generator) < 0.8, own, anywhere)
    return ids.long(), labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic sequences (offline, seeded): train and validation drawn independently."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train = _sequences(cfg.train_items, cfg.seq_len, generator)
    val = _sequences(cfg.val_items, cfg.seq_len, generator)
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
