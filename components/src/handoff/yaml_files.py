"""Load a YAML file into a pydantic model, turning validation errors into one readable line each.

Every message names the file, the line, the field path (``inputs[0].dtype``), what was expected
and what was found, because the person reading it is editing that file by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from handoff.errors import HandoffError

ModelT = TypeVar("ModelT", bound=BaseModel)

Loc = tuple[int | str, ...]


class StrictModel(BaseModel):
    """Base of every model read from a hand-edited YAML file.

    Unknown keys are errors, so a typo (``latency_p99:``) is reported instead of silently
    falling back to a default; frozen, so a loaded file cannot drift from what was validated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldError(ValueError):
    """A validator's complaint about a field below the one it validates.

    Cross-field checks run on a parent model, so pydantic reports them at the parent's location;
    raising this instead lets :func:`load_yaml_model` point the message (and its line number) at
    ``loc``, relative to the validated model, e.g. ``("inputs", 1, "name")``.
    """

    def __init__(self, loc: Loc, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


def _field_path(loc: Loc) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _line_of(node: yaml.Node | None, loc: Loc) -> int | None:
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


def _find_duplicate_key(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Loc, int, int] | None:
    """First mapping key that appears twice: (field path, line of the repeat, line of the first).

    YAML parsers keep the last value of a repeated key without a word, so a file edited by hand
    can say one thing on the line the reader looks at and mean another. Keys are compared as
    constructed values (``1`` and ``"1"`` differ); ``<<`` merge keys are skipped because a key
    given next to a merge is meant to override the merged one.
    """
    seen_nodes: set[int] = set()  # aliases can make the node graph cyclic
    stack: list[tuple[yaml.Node, Loc]] = [(node, ())]
    while stack:
        current, loc = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in reversed(list(enumerate(current.value))))
        elif isinstance(current, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            children: list[tuple[yaml.Node, Loc]] = []
            for key_node, value_node in current.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    return (*loc, key), line, first_line[key]
                first_line[key] = line
                children.append((value_node, (*loc, key)))
            stack.extend(reversed(children))
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        byte = exc.object[exc.start]
        raise HandoffError(
            f"line {line}: not UTF-8 text (byte 0x{byte:02x}); save the file with UTF-8 encoding",
            file=path,
        ) from None


def line_of_field(path: Path, loc: Loc) -> int | None:
    """The line of field ``loc`` in a YAML file (for checks made after loading it), or None."""
    try:
        root = yaml.compose(_read_text(path), Loader=yaml.SafeLoader)
    except (HandoffError, yaml.YAMLError, OSError):
        return None
    return _line_of(root, loc)


def load_yaml_model(path: Path, model: type[ModelT]) -> ModelT:
    """Parse ``path`` and validate it as ``model``; raise HandoffError listing every problem."""
    if not path.is_file():
        raise HandoffError(f"file not found (expected {model.__name__} settings here)", file=path)
    text = _read_text(path)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        # Before constructing: construction flattens ``<<`` merges into the nodes in place.
        duplicate = _find_duplicate_key(loader, root) if root is not None else None
        data: Any = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise HandoffError(f"{where}not valid YAML: {getattr(exc, 'problem', exc)}", file=path) from None
    finally:
        loader.dispose()
    if duplicate is not None:
        loc, line, first = duplicate
        raise HandoffError(
            f"line {line}: {_field_path(loc)}: duplicate key (first given on line {first}); "
            "YAML would silently keep only the last one, so remove one of them",
            file=path,
        )
    if not isinstance(data, dict):
        raise HandoffError(f"expected a mapping of fields, found {type(data).__name__}", file=path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc, msg = err["loc"], err["msg"]
            found = "" if err["type"] == "missing" else f" (found {err.get('input')!r})"
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, FieldError):
                # The message already says what was found, and the input is the whole parent.
                loc, msg, found = (*loc, *cause.loc), cause.message, ""
            line_no = _line_of(root, loc)
            prefix = f"line {line_no}: " if line_no else ""
            problems.append(f"{prefix}{_field_path(loc)}: {msg}{found}")
        raise HandoffError("; ".join(problems), file=path) from None
