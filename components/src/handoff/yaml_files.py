"""Load a YAML file into a pydantic model, turning validation errors into one readable line each.

Every message names the file, the line, the field path (``inputs[0].dtype``), what was expected
and what was found, because the person reading it is editing that file by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from handoff.errors import HandoffError

ModelT = TypeVar("ModelT", bound=BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Line (1-based) of the deepest node along ``loc`` that exists in the document."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line


def load_yaml_model(path: Path, model: type[ModelT]) -> ModelT:
    """Parse ``path`` and validate it as ``model``; raise HandoffError listing every problem."""
    if not path.is_file():
        raise HandoffError(f"file not found (expected {model.__name__} settings here)", file=path)
    text = path.read_text()
    try:
        data: Any = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise HandoffError(f"{where}not valid YAML: {getattr(exc, 'problem', exc)}", file=path) from None
    if not isinstance(data, dict):
        raise HandoffError(f"expected a mapping of fields, found {type(data).__name__}", file=path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            line = _line_of(root, err["loc"])
            found = "" if err["type"] == "missing" else f" (found {err.get('input')!r})"
            prefix = f"line {line}: " if line else ""
            problems.append(f"{prefix}{_field_path(err['loc'])}: {err['msg']}{found}")
        raise HandoffError("; ".join(problems), file=path) from None
