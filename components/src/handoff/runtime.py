"""Process-level choices every step makes the same way: seeds, device, threads."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a generator for data order that nothing else shares."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device() -> torch.device:
    """CUDA when present, else CPU: the same code runs on a laptop and on a GPU node."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
