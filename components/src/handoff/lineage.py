"""Where a model came from, as the registry records it and the readiness report checks it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Set by the project image's build (its Dockerfile's GIT_SHA build argument): an image has no .git.
GIT_SHA_ENV = "HANDOFF_GIT_SHA"


def git_sha(path: Path) -> str:
    """The project's commit, for lineage: the checkout's HEAD, else the image's build argument,
    else 'unknown'."""
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
