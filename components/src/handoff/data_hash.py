"""A fingerprint of the data a model was trained on: the sha256 of every item of its datasets.

train hashes what model.py's ``build_datasets`` returned, in index order, once per run, and tags
its MLflow run with it; register copies it onto the version (``handoff.data_sha256``). Two models
with the same hash saw the same items; a changed file, split or preprocessing step changes it.

What is hashed is what the DataLoader hands training: each item's tensors (dtype, shape, bytes)
and any other values. A ``TensorDataset`` is hashed tensor by tensor (milliseconds); any other
dataset is read once, in batches, as training reads it. Random augmentation inside
``__getitem__`` is drawn from a fixed seed here, and the caller's random state is left as it was,
so hashing changes neither the hash from run to run nor what training does.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

# Items per read for datasets that are not TensorDatasets.
BATCH = 256


def data_sha256(*splits: Dataset[Any]) -> str:
    """Hex sha256 over ``splits`` (e.g. train, validation), each item in index order."""
    digest = hashlib.sha256()
    with _random_state_kept():
        for split in splits:
            digest.update(f"split of {len(split)}\n".encode())  # type: ignore[arg-type]
            if isinstance(split, TensorDataset):
                for tensor in split.tensors:
                    _update(digest, tensor)
            else:
                for batch in DataLoader(split, batch_size=BATCH, shuffle=False):
                    _update(digest, batch)
    return digest.hexdigest()


def _update(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} of {len(value)}\n".encode())
        for item in value:
            _update(digest, item)
    elif isinstance(value, dict):
        digest.update(f"dict of {len(value)}\n".encode())
        for key in sorted(value, key=str):
            digest.update(f"{key!s}\n".encode())
            _update(digest, value[key])
    else:
        digest.update(f"{type(value).__name__} {value!r}\n".encode())


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Seed Python, numpy and torch (CPU) for the block; restore what they were afterwards."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
