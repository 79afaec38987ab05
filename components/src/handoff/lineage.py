"""Where a model came from, as the registry records it and the readiness report checks it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from handoff.settings import IMAGE_ENV

# Set by the project image's build (its Dockerfile's GIT_SHA build argument): an image has no .git.
GIT_SHA_ENV = "HANDOFF_GIT_SHA"
# The sha256 of the training and validation data (handoff.data_hash), set by train on its MLflow
# run and copied by register onto the version.
DATA_TAG = "handoff.data_sha256"
# The sha256 of the held-out split a version was evaluated on (handoff.data_hash over its items),
# set by register from the evaluation. The relative gate compares a challenger with the champion
# only on the split this names: another split would score the champion on other items, perhaps
# on what it was trained on.
HELDOUT_TAG = "handoff.heldout_sha256"
# The image the pipeline's steps ran in (IMAGE_ENV, set by the compiled pipelines), "-" elsewhere.
IMAGE_TAG = "handoff.image"


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


def image_reference() -> str:
    """The image this step runs in, as the compiled pipeline named it (a digest when CI pinned
    one), or '-' outside a pipeline pod (local runs)."""
    return os.environ.get(IMAGE_ENV) or "-"
