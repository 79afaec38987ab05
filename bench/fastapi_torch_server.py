"""The baseline bench/serving.py compares against: what a researcher writes to serve model.py by hand.

FastAPI + uvicorn with their defaults (access log on), the model rebuilt from the project's model.py
and its trained checkpoint, run in torch eager mode under ``torch.no_grad()``, JSON in and out. The
request and response bodies follow the V2 JSON shape so the benchmark sends every server the same
bytes. Usage: python bench/fastapi_torch_server.py <project_dir> <checkpoint.pt> <port>, or
``--deep <port>`` for bench/deep_model.py's model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceRequest(BaseModel):
    inputs: list[Tensor]


def load_model(project: Path, checkpoint: Path) -> torch.nn.Module:
    sys.path.insert(0, str(project))
    from model import Config, build_model

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build_model(Config(**state["config"]))
    model.load_state_dict(state["model"])
    return model.eval()


def create_app(model: torch.nn.Module, output_name: str = "logits") -> FastAPI:
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: InferenceRequest) -> dict[str, Any]:
        tensor = request.inputs[0]
        x = torch.tensor(tensor.data, dtype=torch.float32).reshape(tensor.shape)
        with torch.no_grad():
            y = model(x)
        data = y.flatten().tolist()
        return {
            "model_name": name,
            "outputs": [{"name": output_name, "shape": list(y.shape), "datatype": "FP32", "data": data}],
        }

    return app


if __name__ == "__main__":
    if sys.argv[1] == "--deep":
        sys.path.insert(0, str(Path(__file__).parent))
        from deep_model import build

        app, port = create_app(build(), output_name="y"), sys.argv[2]
    else:
        project_dir, checkpoint_path, port = sys.argv[1:4]
        app = create_app(load_model(Path(project_dir), Path(checkpoint_path)))
    # host and port, as a researcher runs it (uvicorn given an fd would treat it as a Unix socket
    # and leave Nagle's algorithm on: 40 ms a response)
    uvicorn.run(app, host="127.0.0.1", port=int(port))
