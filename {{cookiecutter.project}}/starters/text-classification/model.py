"""{{ cookiecutter.project_name }}: the model, its data, loss and metrics in plain PyTorch.

Starter: text classification. A small Transformer encoder reads short reviews of any length
as token ids and says whether they are positive. The reviews are generated here (offline, in
milliseconds) from word lists: a review is positive when it holds more positive words than
negative ones. Replace ``build_datasets`` and the vocabulary with your corpus and tokenizer.

This is the one file a researcher edits: swap in any architecture, data or loss, as long as the
hooks below keep their contract with contract.yaml. The platform (`handoff`) trains the model,
exports it to ONNX, evaluates it, registers and serves it. The hooks (`make check` tests them all
in seconds; model.py imports nothing from the platform):

* ``Config``: a dataclass with a default for every field (handoff.yaml's ``training.overrides``
  changes them in pipeline runs); ``Config.tiny()``, optional, is a seconds-long smoke run.
* ``build_datasets(cfg) -> (train, val)``: torch Datasets whose items are ``(inputs, target)``.
  ``inputs``: a tensor, or a tuple of tensors in the order of contract.yaml ``inputs``.
  ``target``: a tensor, a tuple of tensors, or a dict of name -> tensor. ``val`` is the held-out
  split the evaluation suite and the gate score.
* ``build_model(cfg) -> nn.Module``: called as ``model(*inputs)``, one positional argument per
  contract input. It may return a tensor, a tuple of tensors in the order of contract.yaml
  ``outputs``, or a dict (a HuggingFace ``ModelOutput`` too) holding every output's name as a key.
* ``loss(outputs, batch)`` and, optional, ``metrics(outputs, batch) -> dict``: ``outputs`` as the
  model returned them (with one contract output: that tensor), ``batch`` is ``(inputs, target)``.
* ``example_inputs(cfg)``: a few real held-out items; export and the serving smoke test replay them.
* ``data_version(cfg) -> str``, optional: names the data's version (a snapshot id, a dataset
  commit); the platform then fingerprints the data by it instead of hashing every item, as data
  bigger than memory needs (or give the datasets a ``data_manifest()`` listing their files). It
  must change whenever the data or the split does, so put the split's parameters in it (here
  ``data_seed`` and ``val_fraction``): the same string must mean the same held-out items, or the
  champion could be scored on items it was trained on.

In contract.yaml every ``-1`` is a dynamic axis (the first one is the batch); an integer input may
declare ``range: [low, high]``, which check, evaluation and the model server enforce; ``task`` may
be ``{type, output, target}`` to say which output and which target the evaluation suite scores.
Packages model.py needs beyond the platform's go in requirements-model.txt; modules and files
beside model.py travel with it into the project image.

Run ``make check`` after each change, ``make test`` for the project's own tests, then ``make run``
for the whole pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

# The vocabulary: token id = position. Id 0 pads a review to the batch's length; contract.yaml's
# `range` on `tokens` is [0, len(VOCABULARY) - 1], so the server refuses ids the model never saw.
PAD = 0
POSITIVE = ("good", "great", "excellent", "lovely", "superb", "enjoyable", "brilliant", "fun")
NEGATIVE = ("bad", "awful", "boring", "poor", "dull", "terrible", "weak", "annoying")
NEUTRAL = (
    "the", "a", "film", "plot", "story", "acting", "was", "is", "and", "very",
    "quite", "it", "this", "music", "ending", "cast", "scenes", "of", "with", "really",
)  # fmt: skip
VOCABULARY = ("<pad>", *POSITIVE, *NEGATIVE, *NEUTRAL)
LABELS = ("negative", "positive")


@dataclass
class Config:
    epochs: int = 4  # passes over the training reviews
    batch_size: int = 64
    lr: float = 5e-3  # AdamW learning rate
    reviews: int = 1000  # generated reviews, training and held-out together
    min_words: int = 4  # review lengths vary between these two
    max_words: int = 24
    dim: int = 32  # width of the token embeddings and of each encoder layer
    heads: int = 4
    layers: int = 2
    val_fraction: float = 0.2  # share of the data held out for evaluation
    seed: int = 0  # seeds weights and batch order
    # Seeds the generated reviews and the held-out split. Keep it fixed: the registry's champion
    # is only compared on the split it was evaluated on (another would score it on items it was
    # trained on).
    data_seed: int = 0

    @classmethod
    def tiny(cls) -> Config:
        """A seconds-long run for smoke tests."""
        return cls(epochs=1)


def positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal position encodings for any length (nothing learned, nothing to outgrow)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    return torch.cat([(position * frequency).sin(), (position * frequency).cos()], dim=1)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, written out so every step is plain tensor arithmetic."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        # Padding is never attended to; the finite minimum (not -inf) keeps all-padding rows finite.
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class SentimentEncoder(nn.Module):
    """Token ids (batch, length) -> logits (batch, 2); any length, padding ignored."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCABULARY), cfg.dim, padding_idx=PAD)
        self.layers = nn.ModuleList(EncoderLayer(cfg.dim, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, len(LABELS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != PAD
        x = self.embed(tokens) + positions(tokens.shape[1], self.embed.embedding_dim, tokens.device)
        for layer in self.layers:
            x = layer(x, keep)
        x = self.norm(x) * keep.unsqueeze(-1)
        pooled = x.sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp(min=1)  # mean over real tokens
        return self.head(pooled)


def build_model(cfg: Config) -> nn.Module:
    return SentimentEncoder(cfg)


def generate_reviews(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to ``max_words`` (reviews, max_words) and labels (reviews,).

    Each review mixes neutral words with a few sentiment words, never as many positive as
    negative ones; its label is the side with more.
    """
    g = torch.Generator().manual_seed(cfg.data_seed)
    first = {
        "positive": 1,
        "negative": 1 + len(POSITIVE),
        "neutral": 1 + len(POSITIVE) + len(NEGATIVE),
    }
    tokens = torch.full((cfg.reviews, cfg.max_words), PAD, dtype=torch.int64)
    labels = torch.zeros(cfg.reviews, dtype=torch.int64)
    for row in range(cfg.reviews):
        length = int(torch.randint(cfg.min_words, cfg.max_words + 1, (1,), generator=g))
        n_pos, n_neg = torch.randint(0, 4, (2,), generator=g).tolist()
        if n_pos == n_neg:
            n_pos += 1
        length = max(length, n_pos + n_neg)  # room for every sentiment word
        words = torch.cat(
            [
                first["positive"] + torch.randint(0, len(POSITIVE), (n_pos,), generator=g),
                first["negative"] + torch.randint(0, len(NEGATIVE), (n_neg,), generator=g),
                first["neutral"]
                + torch.randint(0, len(NEUTRAL), (length - n_pos - n_neg,), generator=g),
            ]
        )
        tokens[row, :length] = words[torch.randperm(length, generator=g)]
        labels[row] = int(n_pos > n_neg)
    return tokens, labels


def build_datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Generated reviews (offline), split by a seeded permutation."""
    tokens, labels = generate_reviews(cfg)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.data_seed))
    n_val = int(len(labels) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(tokens[train], labels[train]), TensorDataset(tokens[val], labels[val])


def loss(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, target = batch
    return F.cross_entropy(outputs, target)


def metrics(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Computed once over the whole held-out split, not averaged over batches. A split whose
    inputs and targets exceed 64 MiB is scored in chunks of about that size, and ``val_loss`` and
    these metrics are the chunks' values averaged weighted by items: exact for means like this
    accuracy, approximate for metrics that do not decompose (F1 or AUC computed here).

    The platform's evaluation suite adds macro-F1, calibration (ECE), per-class precision and
    recall and a confusion matrix. To see metrics per slice of your own (e.g. short and long
    reviews), add ``def slices(batch) -> list[str]``, one key per item.
    """
    _, target = batch
    return {"accuracy": (outputs.argmax(dim=1) == target).float().mean().item()}


def example_inputs(cfg: Config) -> torch.Tensor:
    """Four held-out reviews, cut to the longest of them: the export example and the serving
    smoke-test request."""
    _, val = build_datasets(cfg)
    tokens = val.tensors[0][:4]
    longest = int((tokens != PAD).sum(dim=1).max())
    return tokens[:, :longest]
