"""The contract's example, in the forms the steps need it: model.py's example batch checked
against the contract's inputs (what export traces and parity-checks, evaluate times and check runs),
and example.json, the request the smoke test replays with the response the model server must give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from handoff.contract import Contract
from handoff.errors import HandoffError
from handoff.hooks import MODEL_FILE, as_tuple, call_hook
from handoff.onnx_io import check_arrays, open_session, run_session
from handoff.project import Project
from handoff.raw_io import postprocess, preprocess, raw_request, v2_tensor


def example_arrays(project: Project, cfg: Any) -> tuple[torch.Tensor, ...]:
    """model.py's example batch, checked against the contract's inputs."""
    value = call_hook(project.hooks, "example_inputs", cfg)
    try:
        example = tuple(t.detach().cpu() for t in as_tuple(value))
    except HandoffError:
        raise HandoffError(
            f"example_inputs() must return a tensor or a tuple of tensors, got {type(value).__name__}",
            file=MODEL_FILE,
            field="example_inputs",
        ) from None
    check_arrays(
        project.contract.inputs,
        [t.numpy() for t in example],
        what="inputs",
        source="model.py example_inputs()",
    )
    return example


def example_payload(
    contract: Contract, inputs: tuple[torch.Tensor, ...], outputs: list[np.ndarray]
) -> dict[str, Any]:
    """The contract example as an Open Inference Protocol v2 request plus expected outputs."""
    return {
        "inputs": [
            {
                "name": spec.name,
                "datatype": spec.v2_datatype,
                "shape": list(t.shape),
                "data": t.detach().numpy().reshape(-1).tolist(),
            }
            for spec, t in zip(contract.inputs, inputs, strict=True)
        ],
        "expected_outputs": [
            {
                "name": spec.name,
                "datatype": spec.v2_datatype,
                "shape": list(a.shape),
                "data": a.reshape(-1).tolist(),
            }
            for spec, a in zip(contract.outputs, outputs, strict=True)
        ],
    }


def served_example(
    project: Project, cfg: Any, path: Path, example: tuple[torch.Tensor, ...], outputs: list[np.ndarray]
) -> dict[str, Any]:
    """example.json for a model with preprocess/postprocess: the request a client sends (raw when
    preprocess runs) and the response the model server must give, computed as it computes it:
    raw -> preprocess -> ONNX Runtime -> postprocess."""
    contract, hooks = project.contract, project.hooks
    assert contract.raw is not None
    if contract.raw.inputs:
        raw = raw_request(hooks, contract, cfg)
        feeds = preprocess(hooks, contract, raw)
        outputs = run_session(open_session(path), contract, list(feeds.values()))
        check_arrays(contract.outputs, outputs, what="outputs", source="ONNX Runtime on preprocess()'s")
        request = [v2_tensor(spec, raw[spec.name]) for spec in contract.raw.inputs]
    else:
        request = example_payload(contract, example, outputs)["inputs"]
    if contract.raw.outputs:
        answer = postprocess(hooks, contract, dict(zip(contract.output_names, outputs, strict=True)))
        expected = [v2_tensor(spec, answer[spec.name]) for spec in contract.raw.outputs]
    else:
        expected = [v2_tensor(spec, a) for spec, a in zip(contract.outputs, outputs, strict=True)]
    return {"inputs": request, "expected_outputs": expected}
