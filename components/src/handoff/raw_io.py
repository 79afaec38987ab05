"""Raw requests: model.py's ``preprocess`` / ``postprocess`` around the ONNX model, numpy only.

A model whose clients send strings or image bytes keeps the ONNX graph numeric: ``preprocess(raw)``
turns the request (``contract.yaml`` ``raw.inputs``, by name) into the graph's inputs (``inputs``,
by name), ``postprocess(outputs)`` turns the graph's outputs (by name) into the response
(``raw.outputs``), and ``raw_example(cfg)`` is the raw request ``check``, export and the smoke test
replay. The model server runs these hooks in its own process, so this module needs numpy and
nothing of torch: the server imports model.py from the model's folder (``served_code`` lists what
register and the Triton layout carry there) and torch only if model.py itself imports it.

``bytes`` tensors (V2 ``BYTES``) reach the hooks as numpy object arrays of ``bytes``, whether the
request sent them as JSON strings (UTF-8 encoded here) or through the binary extension; a hook
may return ``str`` or ``bytes`` elements.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from handoff.contract import Contract, TensorSpec
from handoff.errors import HandoffError
from handoff.model_source import MODEL_FILE, user_code
from handoff.onnx_io import check_arrays
from handoff.settings import SETTINGS_FILE, Settings
from handoff.yaml_files import line_of_field

RAW_FIELD = {"preprocess": "raw.inputs", "postprocess": "raw.outputs"}
# What each hook does, for messages.
PURPOSE = {
    "preprocess": "turns a raw request into the model's inputs",
    "postprocess": "turns the model's outputs into the response",
}
TRITON_REFUSAL = (
    "is triton, which serves the ONNX model alone and cannot run model.py's {hooks}; set "
    "serving.kserve.runtime: kserve (the project's handoff-onnx runtime, the same model server "
    "as local serving, which runs them)"
)


def has_raw_hooks(contract: Contract) -> bool:
    """True when the contract says preprocess or postprocess runs in the model server."""
    return contract.raw is not None and bool(contract.raw.inputs or contract.raw.outputs)


def _contract_error(contract_file: Path, field: str, message: str) -> HandoffError:
    parts = tuple(int(p) if p.isdigit() else p for p in field.split("."))
    line = line_of_field(contract_file, parts) if contract_file.is_file() else None
    return HandoffError(f"{f'line {line}: ' if line else ''}{message}", file=contract_file, field=field)


def check_raw_hooks(module: Any, contract: Contract, contract_file: Path) -> None:
    """preprocess/postprocess and ``raw:`` agree: each hook has its field, each field its hook,
    and preprocess comes with ``raw_example``."""
    path = Path(module.__file__)
    raw = contract.raw
    for hook, declared in (
        ("preprocess", raw.inputs if raw else None),
        ("postprocess", raw.outputs if raw else None),
    ):
        field = RAW_FIELD[hook]
        defined = hasattr(module, hook)
        if defined and not callable(getattr(module, hook)):
            raise HandoffError(f"{hook} must be a function", file=path, field=hook)
        if defined and not declared:
            raise _contract_error(
                contract_file,
                field if raw else "raw",
                f"model.py defines {hook}(), which {PURPOSE[hook]} in the model server: declare "
                f"those tensors under {field} (name, dtype, shape; dtype bytes for strings or "
                "encoded images)",
            )
        if declared and not defined:
            raise _contract_error(
                contract_file,
                field,
                f"is declared, but model.py defines no {hook}(), which {PURPOSE[hook]}: define it, "
                f"or remove {field}",
            )
    if hasattr(module, "preprocess") and not callable(getattr(module, "raw_example", None)):
        raise HandoffError(
            "preprocess() needs raw_example(cfg): the raw request (a dict name -> numpy array, as "
            "raw.inputs declares) that check, export and the smoke test send",
            file=path,
            field="raw_example",
        )
    if hasattr(module, "raw_example") and not hasattr(module, "preprocess"):
        raise HandoffError(
            "raw_example() is only used with preprocess(); define preprocess() or remove it",
            file=path,
            field="raw_example",
        )


def _as_array(spec: TensorSpec, value: Any) -> np.ndarray:
    """A bytes tensor as an object array of ``bytes`` (str encoded as UTF-8); others unchanged."""
    array = np.asarray(value)
    if spec.v2_datatype != "BYTES" or array.dtype.kind not in "USO":
        return array
    out = np.empty(array.shape, dtype=object)
    for index, item in np.ndenumerate(array):
        out[index] = item.encode("utf-8") if isinstance(item, str) else item
    return out


def named_arrays(
    value: Any, specs: Sequence[TensorSpec], *, hook: str, field: str, path: Path
) -> dict[str, np.ndarray]:
    """What a hook returned, checked: a dict holding exactly the specs' names, each an array of
    its spec's dtype and shape (bytes: str or bytes elements). Returned in the specs' order."""
    names = [spec.name for spec in specs]
    if not isinstance(value, Mapping):
        raise HandoffError(
            f"{hook}() must return a dict name -> numpy array with the names of {field} "
            f"({', '.join(names)}), got {type(value).__name__}",
            file=path,
            field=hook,
        )
    keys = [str(k) for k in value]
    if sorted(keys) != sorted(names):
        raise HandoffError(
            f"{hook}() returned {keys}; {field} in contract.yaml names {names}",
            file=path,
            field=hook,
        )
    arrays = {spec.name: _as_array(spec, value[spec.name]) for spec in specs}
    for spec in specs:
        array = arrays[spec.name]
        if spec.v2_datatype == "BYTES" and not all(isinstance(v, bytes) for v in array.reshape(-1)):
            raise HandoffError(
                f"{hook}() returned '{spec.name}' (dtype bytes) with elements that are not str or bytes",
                file=path,
                field=hook,
            )
    check_arrays(specs, list(arrays.values()), what=field, source=f"model.py {hook}()")
    return arrays


class HookRaised(HandoffError):
    """The hook itself raised (on a request: the request's fault, so the server answers 400)."""


def run_hook(
    module: Any, hook: str, arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec], field: str
) -> dict[str, np.ndarray]:
    """``hook(arrays)`` under ``user_code`` (errors name model.py and the line; ``HookRaised``),
    its result checked against ``specs`` (``field`` names them; a plain ``HandoffError``)."""
    try:
        with user_code(module, f"{hook}()"):
            value = getattr(module, hook)(dict(arrays))
    except HandoffError as exc:
        raise HookRaised(exc.detail, file=exc.file, field=exc.field) from None
    return named_arrays(value, specs, hook=hook, field=field, path=Path(module.__file__))


def raw_request(module: Any, contract: Contract, cfg: Any) -> dict[str, np.ndarray]:
    """model.py's ``raw_example(cfg)``, checked against ``raw.inputs``."""
    assert contract.raw is not None and contract.raw.inputs
    with user_code(module, "raw_example()"):
        value = module.raw_example(cfg)
    return named_arrays(
        value, contract.raw.inputs, hook="raw_example", field="raw.inputs", path=Path(module.__file__)
    )


def preprocess(module: Any, contract: Contract, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's inputs from a raw request (checked against contract ``inputs``)."""
    return run_hook(module, "preprocess", raw, contract.inputs, "inputs")


def postprocess(module: Any, contract: Contract, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The response from the model's outputs (checked against ``raw.outputs``)."""
    assert contract.raw is not None and contract.raw.outputs
    return run_hook(module, "postprocess", outputs, contract.raw.outputs, "raw.outputs")


def v2_tensor(spec: TensorSpec, array: np.ndarray) -> dict[str, Any]:
    """One tensor as V2 JSON: bytes as UTF-8 strings (JSON carries text, not arbitrary bytes)."""
    data: list[Any] = array.reshape(-1).tolist()
    if spec.v2_datatype == "BYTES":
        try:
            data = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in data]
        except UnicodeDecodeError:
            raise HandoffError(
                f"'{spec.name}' holds bytes that are not UTF-8 text, which a JSON example cannot "
                "carry; make the example's bytes tensors text",
                file=MODEL_FILE,
                field="raw_example",
            ) from None
    return {"name": spec.name, "datatype": spec.v2_datatype, "shape": list(array.shape), "data": data}


def served_code(project_root: Path) -> list[Path]:
    """The Python files the model server imports for preprocess/postprocess: model.py and the
    ``*.py`` files beside it (helpers model.py imports), not the project's tests."""
    return sorted(p for p in project_root.glob("*.py") if p.is_file())


def load_serving_hooks(folder: Path) -> ModuleType:
    """Import ``folder/model.py`` in the model server, for its preprocess/postprocess.

    As ``hooks.load_model_module`` does (module name ``model``, its folder importable so its
    helpers load), but without importing torch here: the hooks are numpy in and out, and model.py
    pulls in torch only if it imports it itself. The folder stays on ``sys.path``, since a hook
    may import a helper lazily; a server process serves one model.
    """
    path = (folder / MODEL_FILE).resolve()
    if not path.is_file():
        raise HandoffError(
            f"the contract's raw section needs model.py in the model folder ({folder}) for "
            "preprocess/postprocess; register the model again with `handoff register`",
            file=path,
        )
    spec = importlib.util.spec_from_file_location("model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    with user_code(path, "importing model.py in the model server"):
        spec.loader.exec_module(module)
    return module


def check_cluster_runtime(contract: Contract, settings: Settings, project_root: Path) -> None:
    """Refuse serving raw hooks on Triton, which cannot run Python before or after the model."""
    if not has_raw_hooks(contract) or settings.serving.kserve.runtime != "triton":
        return
    raw = contract.raw
    assert raw is not None
    hooks = " and ".join(h for h, on in (("preprocess()", raw.inputs), ("postprocess()", raw.outputs)) if on)
    raise HandoffError(
        TRITON_REFUSAL.format(hooks=hooks) + f" (contract.yaml declares {'/'.join(_raw_fields(contract))})",
        file=project_root / SETTINGS_FILE,
        field="serving.kserve.runtime",
    )


def _raw_fields(contract: Contract) -> list[str]:
    raw = contract.raw
    return [f for f, on in (("raw.inputs", raw and raw.inputs), ("raw.outputs", raw and raw.outputs)) if on]
