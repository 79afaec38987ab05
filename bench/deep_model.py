"""The deep, narrow MLP bench/serving.py serves both ways: 48 blocks of Linear(256) + LayerNorm +
GELU. At batch 1 its latency is set by the number of operators, not by arithmetic, as in small
transformers and tabular models; the ONNX export and the FastAPI + torch server build the same
weights from the same seed."""

from __future__ import annotations

import torch

NAME = "deep-mlp"
WIDTH, DEPTH, OUT = 256, 48, 16


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.LayerNorm(WIDTH), torch.nn.GELU()]
    layers.append(torch.nn.Linear(WIDTH, OUT))
    return torch.nn.Sequential(*layers).eval()
