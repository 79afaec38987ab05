"""Image references: which strings a runtime can pull, and how a pod should pull the project's image.

A digest names one build forever, so a node that has it never needs the registry again
(``IfNotPresent``). A tag can be pushed again (a developer's ``make image`` and push of
handoff.yaml's tag, before CI's digest-pinned compile): with ``IfNotPresent`` a node that pulled
it earlier would keep running the old build while a fresh node runs the new one. ``Always``
makes the kubelet resolve the tag to its current digest at each start (layers it has are not
downloaded again), so every pod of a run starts from the build the tag names then.
"""

from __future__ import annotations

import re

# An image reference as `docker pull` reads it (the distribution/reference grammar):
# [host[:port]/]path[:tag][@algorithm:hex], e.g. registry.example.com/ml/name@sha256:<64 hex>.
_HOST_PART = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE = re.compile(
    rf"(?P<name>(?:{_HOST}/)?{_PATH_PART}(?:/{_PATH_PART})*)(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)


def is_image_reference(image: str) -> bool:
    """Whether ``image`` is a reference a container runtime can pull (by tag or by digest)."""
    match = IMAGE_REFERENCE.fullmatch(image)
    return match is not None and len(match["name"]) <= 255


def pinned(image: str) -> bool:
    """Whether ``image`` names its build by digest (``REPOSITORY@sha256:…``)."""
    match = IMAGE_REFERENCE.fullmatch(image)
    return match is not None and match["digest"] is not None


def pull_policy(image: str) -> str:
    """``IfNotPresent`` for a digest, ``Always`` for a tag (see the module docstring)."""
    return "IfNotPresent" if pinned(image) else "Always"


def floating_image_warning(image: str) -> str | None:
    """What to say about an image a cluster cannot pin: no tag, or ``:latest``, and no digest.

    Such a reference is resolved again each time a pod starts, so a retried step or another node
    may run a different build than the first pod did. A moving release tag is the platform's
    choice; these two are almost always a mistake.
    """
    match = IMAGE_REFERENCE.fullmatch(image)
    if match is None or match["digest"] or match["tag"] not in (None, "latest"):
        return None
    said = "has no tag" if match["tag"] is None else "is tagged :latest"
    return (
        f"image {image} {said}: every pod pulls whatever it points at when it starts, so a retried step "
        "or a training node may run another build; pass --image REPOSITORY@sha256:<digest> (the digest "
        "CI pushed)"
    )
