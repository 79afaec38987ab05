"""model.py as source text: its name, the hooks it must define, and a check that needs no torch."""

from __future__ import annotations

import ast
from pathlib import Path

from handoff.errors import HandoffError

MODEL_FILE = "model.py"
REQUIRED_HOOKS = ("Config", "build_model", "build_datasets", "loss", "example_inputs")


def precheck_source(project_dir: Path) -> None:
    """Syntax and hook names of model.py without importing it (no torch): milliseconds.

    Lets a pipeline run refuse a broken model.py before any step starts.
    """
    path = (project_dir / MODEL_FILE).resolve()
    if not path.is_file():
        raise HandoffError("file not found: every project defines its model here", file=path)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        raise HandoffError(f"line {exc.lineno}: syntax error: {exc.msg}", file=path) from None
    except ValueError as exc:  # e.g. a NUL byte: not Python source at all
        raise HandoffError(f"not Python source: {exc}", file=path) from None
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
    missing = [name for name in REQUIRED_HOOKS if name not in defined]
    if missing:
        raise HandoffError(
            f"missing hook(s) {', '.join(missing)}; model.py must define "
            f"{', '.join(REQUIRED_HOOKS)} (see the template's model.py for each one's signature)",
            file=path,
        )
