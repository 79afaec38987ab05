"""Rename and move keys in a project's YAML files, keeping every comment, quote and blank line.

Migrations (``vX_Y_Z.py`` beside this file) use these to carry a project's ``handoff.yaml`` and
``contract.yaml`` across a release that renamed or moved a key. ruamel.yaml's round trip keeps
what the researcher and platform users wrote around the key; a file with no change is not
rewritten at all. Every function is safe to run twice: a key already renamed is left alone.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

MARKERS = ("<<<<<<< ", ">>>>>>> ")


def _yaml() -> YAML:
    """The layout the template writes: 2-space maps, ``- `` items indented under their key, long
    lines kept long, quotes as written, and ``null`` spelled out (ruamel would write nothing)."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml


@contextlib.contextmanager
def edit(path: Path) -> Iterator[CommentedMap]:
    """The file's top-level mapping to change in place; written back only if something changed."""
    text = path.read_text(encoding="utf-8")
    if any(line.startswith(MARKERS) for line in text.splitlines()):
        raise ValueError(f"{path.name} holds conflict markers (<<<<<<< >>>>>>>): resolve them first")
    yaml = _yaml()
    document = yaml.load(text)
    if not isinstance(document, CommentedMap):
        raise ValueError(f"{path.name} is not a YAML mapping")
    yield document
    out = io.StringIO()
    yaml.dump(document, out)
    if out.getvalue() != text:
        path.write_text(out.getvalue(), encoding="utf-8")


def rename(document: CommentedMap, old: str, new: str) -> bool:
    """Move the value at dotted path ``old`` to ``new``, with its comment; True if anything moved.

    Within one mapping the key keeps its place; into another it goes last, its parents made as
    needed. Where both exist, the value under ``old`` wins: it is the project's own setting, and
    the one under ``new`` came from the template's defaults."""
    *old_parents, old_key = old.split(".")
    *new_parents, new_key = new.split(".")
    source = _mapping(document, old_parents, create=False)
    if source is None or old_key not in source:
        return False
    comment = source.ca.items.pop(old_key, None)
    position = list(source).index(old_key)
    value = source.pop(old_key)
    target = _mapping(document, new_parents, create=True)
    assert target is not None
    if new_key in target:
        target.ca.items.pop(new_key, None)
        target[new_key] = value
    elif target is source:
        target.insert(position, new_key, value)
    else:
        target[new_key] = value
    if comment:
        target.ca.items[new_key] = comment
    return True


def _mapping(document: CommentedMap, path: list[str], *, create: bool) -> CommentedMap | None:
    here: Any = document
    for key in path:
        if not isinstance(here, CommentedMap):
            return None
        if key not in here:
            if not create:
                return None
            here[key] = CommentedMap()
        here = here[key]
    return here if isinstance(here, CommentedMap) else None
