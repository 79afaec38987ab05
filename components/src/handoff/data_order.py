"""The order training sees its data in: reproducible per epoch, split across ranks, resumable.

Each epoch is a permutation drawn from (seed, epoch) alone, cut into global batches of
``batch_size``; rank r of W takes every W-th item of each global batch, so W processes see
exactly the global batches one process would (DDP then averages their gradients). Starting at a
given step skips the batches a checkpoint already covers without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class EpochBatches(Sampler[list[int]]):
    """Batch sampler for one epoch (and one rank), starting at ``start_step`` within it."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def steps(self) -> int:
        """Global batches in the epoch (the same on every rank)."""
        return -(-self.size // self.batch_size)

    def __len__(self) -> int:
        return max(self.steps() - self.start_step, 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.size, self.seed, self.epoch).tolist()
        for step in range(self.start_step, self.steps()):
            global_batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield global_batch[self.rank :: self.world_size]
