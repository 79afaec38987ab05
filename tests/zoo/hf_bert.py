"""A HuggingFace BERT classifier built from a config (no download): two inputs, a ModelOutput.

``BertForSequenceClassification`` is called as ``model(input_ids, attention_mask)`` and returns a
``SequenceClassifierOutput`` (a dict subclass holding ``logits``), which the platform maps onto the
contract's one output by name. Data: padded sequences of a 32-token vocabulary, each with its own
length; class 1 when most real tokens come from the upper half of the vocabulary. The sequence
axis is dynamic and both inputs carry a ``range``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 32  # ids 0..31; 0 is [PAD], 1 is [CLS]
PAD, CLS = 0, 1
CLASSES = 2
Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Config:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-3  # AdamW learning rate
    hidden: int = 32
    heads: int = 2
    layers: int = 2
    seq_len: int = 12  # padded length of the training sequences
    train_items: int = 1000
    val_items: int = 200
    seed: int = 0  # seeds weights, data and batch order

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=3, layers=1, train_items=512, val_items=96)


def build_model(cfg: Config) -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=2 * cfg.hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
        num_labels=CLASSES,
    )
    return BertForSequenceClassification(config)


def _sequences(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    half = VOCAB // 2
    own = torch.randint(2, half, (n, length), generator=generator) + labels.view(-1, 1) * (half - 2)
    anywhere = torch.randint(2, VOCAB, (n, length), generator=generator)
    ids = torch.where(torch.rand(n, length, generator=generator) < 0.8, own, anywhere)
    ids[:, 0] = CLS
    lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
    mask = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).long()
    return ids.masked_fill(mask == 0, PAD).long(), mask, labels


class PairedDataset(TensorDataset):
    """TensorDataset whose items are ((input_ids, attention_mask), label)."""

    def __getitem__(self, index: Any) -> Any:
        ids, mask, label = super().__getitem__(index)
        return (ids, mask), label


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic padded sequences (offline, seeded); items are ((input_ids, attention_mask), label)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    train = _sequences(cfg.train_items, cfg.seq_len, generator)
    val = _sequences(cfg.val_items, cfg.seq_len, generator)
    return PairedDataset(*train), PairedDataset(*val)


def loss(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    _, target = batch
    return F.cross_entropy(outputs, target)


def metrics(outputs: torch.Tensor, batch: Batch) -> dict[str, float]:
    _, target = batch
    return {"accuracy": (outputs.argmax(dim=1) == target).float().mean().item()}


def example_inputs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    _, val = build_datasets(cfg)
    return val.tensors[0][:4], val.tensors[1][:4]
