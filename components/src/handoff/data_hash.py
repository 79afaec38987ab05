"""A fingerprint of the data a model was trained on, and of the held-out split it was judged on.

train fingerprints what model.py's ``build_datasets`` returned, once per run, and tags its MLflow
run with it; register copies it onto the version (``handoff.data_sha256``); evaluate fingerprints
the held-out split, so a champion is only compared with a challenger on the same items. Two
models with the same fingerprint saw the same data; a changed file, split or preprocessing step
changes it.

How a fingerprint is taken depends on what the data declares, cheapest first:

1. ``data_version(cfg)`` in model.py (a snapshot id, a dataset commit, a table version): the
   fingerprint is the hash of that string, of which split each dataset is (its place: train then
   validation, or the held-out split alone) and of its length (a map-style dataset's ``len``; an
   iterable one adds nothing, since its length is only known by reading it). No item is read. It
   is the researcher's promise that the same string means the same items, split and
   preprocessing, so the string must change when the data or the split does: put the split's
   parameters in it (e.g. ``f"reviews@v3 split_seed={cfg.split_seed} val={cfg.val_fraction}"``);
   the length alone catches a changed fraction, not a changed seed.
2. A dataset with a ``data_manifest()`` method (shards in a folder or in object storage): the hash
   of its entries, and no item is read. An entry is a local file path (its name relative to the
   files' common folder and its size are hashed, not its modification time: a pod that downloads
   the same shards again gets the same fingerprint) or a tuple of plain values hashed as given,
   e.g. ``(url, size, etag)`` from an object store's listing, which is how a manifest says
   content identity (an etag or a checksum changes when a file is rewritten at the same size);
   add the split's seed to the entries when the split is cut in code.
3. Anything else (small data, the starters): the sha256 of every item, as the DataLoader hands
   training: each item's tensors (dtype, shape, bytes) and any other values. A ``TensorDataset``
   is hashed tensor by tensor (milliseconds); any other dataset, map-style or iterable, is read
   once, in batches of ``BATCH`` (memory does not grow with it). Random augmentation inside
   ``__getitem__`` is drawn from a fixed seed here, and the caller's random state is left as it
   was, so hashing changes neither the hash from run to run nor what training does. When that
   read takes long, a hint names the two declarations above.

Nothing is cached, anywhere: each run computes its fingerprint afresh, on a fresh cluster pod as
on a laptop that ran before. No cache is needed because 1 and 2 read no item (a string, a listing
of names and sizes), so their cost does not grow with the data; 3 reads every item and is meant
for data small enough to read each run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from handoff.errors import HandoffError
from handoff.model_source import MODEL_FILE

# Items per read for datasets that are hashed item by item.
BATCH = 256
# Reading the items for longer than this prints the hint to declare an identity instead.
SLOW_SECONDS = 30.0
PLAIN = (str, int, float, bool, type(None))


def data_sha256(*splits: Dataset[Any], version: str | None = None) -> str:
    """Hex sha256 naming ``splits`` (e.g. train, validation): from ``version`` (model.py's
    ``data_version``) when given, else per split from its manifest or its items."""
    digest = hashlib.sha256()
    if version is not None:
        digest.update(f"data_version of {len(splits)} split(s)\n{version}\n".encode())
        for place, split in enumerate(splits):  # which split, and how long when that costs no read
            length = _length(split)
            digest.update(f"split {place}: {'iterable' if length is None else length}\n".encode())
        return digest.hexdigest()
    started, items = time.perf_counter(), 0
    with _random_state_kept():
        for split in splits:
            manifest = getattr(split, "data_manifest", None)
            if callable(manifest):
                _update_manifest(digest, manifest())
            elif isinstance(split, TensorDataset):
                digest.update(f"split of {len(split)}\n".encode())
                for tensor in split.tensors:
                    _update(digest, tensor)
            else:
                items += _update_items(digest, split)
    seconds = time.perf_counter() - started
    if seconds > SLOW_SECONDS:
        print(
            f"handoff: fingerprinting the data read {items} items in {seconds:.0f} s; declare "
            f"data_version(cfg) in {MODEL_FILE}, or give the datasets a data_manifest() method, "
            "and no item is read (see handoff.data_hash)",
            file=sys.stderr,
            flush=True,
        )
    return digest.hexdigest()


def _length(split: Dataset[Any]) -> int | None:
    """A map-style dataset's length; None for an iterable one (its ``len``, if any, is a hint)."""
    if isinstance(split, IterableDataset):
        return None
    try:
        return len(split)  # type: ignore[arg-type]
    except TypeError:
        return None


def _update_items(digest: Any, split: Dataset[Any]) -> int:
    """Every item of ``split``, in order, in batches; returns how many there were."""
    iterable = isinstance(split, IterableDataset)
    if not iterable:
        digest.update(f"split of {len(split)}\n".encode())  # type: ignore[arg-type]
    else:
        digest.update(b"iterable split\n")
    items = 0
    for batch in DataLoader(split, batch_size=BATCH, shuffle=False):
        _update(digest, batch)
        items += _batch_items(batch)
    if iterable:  # its length is only known now
        digest.update(f"{items} items\n".encode())
    return items


def _batch_items(batch: Any) -> int:
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        return _batch_items(next(iter(first.values())))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _update_manifest(digest: Any, entries: Any) -> None:
    """Names (relative to the files' common folder) and sizes of local files, not their times: the
    same shards downloaded again are the same data. Tuples of plain values are hashed as given."""
    entries = list(entries)
    files = [Path(e).resolve() for e in entries if isinstance(e, (str, os.PathLike))]
    root = os.path.commonpath([str(f.parent) for f in files]) if files else ""
    digest.update(f"manifest of {len(entries)}\n".encode())
    for entry in entries:
        if isinstance(entry, (str, os.PathLike)):
            path = Path(entry).resolve()
            try:
                stat = path.stat()
            except OSError as exc:
                raise HandoffError(
                    f"data_manifest() names {str(entry)!r}, which cannot be read: {exc.strerror}",
                    file=MODEL_FILE,
                    field="build_datasets",
                ) from None
            name = path.relative_to(root).as_posix()
            digest.update(f"file {name!r} {stat.st_size}\n".encode())
        elif isinstance(entry, tuple) and all(isinstance(v, PLAIN) for v in entry):
            digest.update(f"entry {entry!r}\n".encode())
        else:
            raise HandoffError(
                "data_manifest() entries must be local file paths or tuples of plain values "
                f"(e.g. (url, size, etag)); got {type(entry).__name__} {entry!r}",
                file=MODEL_FILE,
                field="build_datasets",
            )


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
