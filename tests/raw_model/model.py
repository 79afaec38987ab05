"""A bag-of-words sentiment model whose clients send text: preprocess tokenizes the strings of a
raw request into ids, postprocess turns the logits into a label, both in the model server."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from vocab import SIZE, tokenize

LABELS = np.array([b"negative", b"positive"], dtype=object)
POSITIVE, NEGATIVE = ["good", "great", "fine", "love"], ["bad", "awful", "poor", "hate"]


@dataclass
class Config:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-2
    dim: int = 8
    items: int = 64
    seed: int = 0


class BagOfWords(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(SIZE, cfg.dim)
        self.head = nn.Linear(cfg.dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


def build_model(cfg: Config) -> nn.Module:
    return BagOfWords(cfg)


def _texts(n: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    labels = torch.randint(0, 2, (n,), generator=generator)
    texts = []
    for label in labels.tolist():
        words = POSITIVE if label else NEGATIVE
        picks = torch.randint(0, len(words), (3,), generator=generator).tolist()
        texts.append("the film " + " ".join(words[p] for p in picks))
    return texts, labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(cfg.seed)
    splits = []
    for _ in range(2):
        texts, labels = _texts(cfg.items, generator)
        splits.append(TensorDataset(torch.from_numpy(tokenize(texts)), labels))
    return splits[0], splits[1]


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(outputs, batch[1])


def example_inputs(cfg: Config) -> torch.Tensor:
    return torch.from_numpy(preprocess(raw_example(cfg))["ids"])


def raw_example(cfg: Config) -> dict[str, np.ndarray]:
    # bytes, as preprocess receives them (example_inputs feeds this to preprocess directly)
    return {"text": np.array([b"a great film, love it", b"awful plot", b"the film"], dtype=object)}


def preprocess(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    texts = [item.decode("utf-8") for item in raw["text"]]
    for row, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"text [{row}] is empty: send at least one word")
    return {"ids": tokenize(texts)}


def postprocess(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"label": LABELS[outputs["logits"].argmax(axis=1)]}
