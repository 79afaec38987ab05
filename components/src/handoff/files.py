"""Small file helpers shared by the steps: atomic writes, hashes, JSON records."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large models do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a reader never sees half a file (a crash leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any, *, sort_keys: bool = True) -> None:
    """Write JSON atomically; sorted keys by default so files diff cleanly between runs."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n").encode())


def read_json(path: Path) -> Any:
    """Parse a JSON file this library wrote."""
    return json.loads(path.read_text())
