"""What changed between two contracts, field by field, and which changes a served model can take.

A registered version was exported for one contract. Its objectives (SLOs, gates, owners) may move
on after registration and deploy enforces the working tree's; its interface (the model's name,
input and output names, dtypes, shapes and value ranges) is baked into the ONNX graph, so a
version cannot be served under another one.
"""

from __future__ import annotations

from typing import Any

from handoff.contract import Contract

# Top-level contract fields that the exported model.onnx embodies.
INTERFACE_FIELDS = ("name", "inputs", "outputs")


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key in value:
            _flatten(value[key], f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        for i, item in enumerate(value):
            _flatten(item, f"{path}[{i}]", out)
    else:
        out[path] = value


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def contract_changes(before: Contract, after: Contract) -> tuple[list[str], list[str]]:
    """``(interface, other)`` changes from ``before`` to ``after``, each as ``field: old -> new``."""
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    _flatten(before.model_dump(mode="json"), "", old)
    _flatten(after.model_dump(mode="json"), "", new)
    interface: list[str] = []
    other: list[str] = []
    for path in sorted(old.keys() | new.keys()):
        if old.get(path) == new.get(path):
            continue
        line = f"{path}: {_shown(old.get(path))} -> {_shown(new.get(path))}"
        top = path.split(".")[0].split("[")[0]
        (interface if top in INTERFACE_FIELDS else other).append(line)
    return interface, other
