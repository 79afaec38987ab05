"""model.py as source text: its name, the hooks it must define, and what needs no torch (a
syntax check, and ``user_code``, which the model server uses around preprocess/postprocess)."""

from __future__ import annotations

import ast
import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from handoff.errors import HandoffError

MODEL_FILE = "model.py"
REQUIRED_HOOKS = ("Config", "build_model", "build_datasets", "loss", "example_inputs")
# Optional hooks for raw requests, run by the model server around the ONNX model (numpy in and
# out): preprocess(raw) -> model inputs, postprocess(outputs) -> response, raw_example(cfg).
RAW_HOOKS = ("preprocess", "postprocess", "raw_example")


def _user_frame(exc: BaseException, path: Path) -> str:
    """'line N: ' of the deepest frame inside model.py, so errors point at the researcher's code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f"line {frames[-1].lineno}: " if frames else ""


@contextlib.contextmanager
def user_code(module: Any, what: str, hint: str = "") -> Iterator[None]:
    """Run researcher code; report a failure as model.py's, with the line and ``what`` was running.

    ``module`` is model.py's module (anything with ``__file__``) or the file's path.
    """
    path = Path(module if isinstance(module, Path) else module.__file__)
    try:
        yield
    except HandoffError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever model.py raises is the researcher's to fix
        detail = f"{_user_frame(exc, path)}{what} raised {type(exc).__name__}: {exc}"
        raise HandoffError(f"{detail}{f'; {hint}' if hint else ''}", file=path) from None


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
