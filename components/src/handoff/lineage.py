"""Where a model came from, as the registry records it and the readiness report checks it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_sha(path: Path) -> str:
    """The project's commit, for lineage; 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
