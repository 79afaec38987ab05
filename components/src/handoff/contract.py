"""The project contract (``contract.yaml``): the one schema that export, evaluation, serving and
smoke tests all enforce.

Shapes use -1 for a dynamic axis (the batch). Dtypes are named as numpy names them; the V2
datatype (``FP32``) and the ONNX element type follow from that one name, so they cannot drift.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from handoff.k8s_names import Dns1123Label
from handoff.yaml_files import FieldError, StrictModel, load_yaml_model

CONTRACT_FILE = "contract.yaml"

# numpy dtype name -> Open Inference Protocol v2 datatype
V2_DATATYPES: dict[str, str] = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "bool": "BOOL",
}

Dtype = Literal["float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]


class TensorSpec(StrictModel):
    """One named model input or output."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
    dtype: Dtype
    shape: list[int] = Field(min_length=1)
    # Inputs only: the model server answers NaN or infinite values with 400 unless this is true
    # (for a model that handles missing values itself).
    allow_non_finite: bool = False

    @field_validator("shape")
    @classmethod
    def _dims_are_positive_or_dynamic(cls, shape: list[int]) -> list[int]:
        if any(dim == 0 or dim < -1 for dim in shape):
            raise ValueError("each dimension must be a positive size or -1 for a dynamic axis")
        if shape[0] != -1:
            raise ValueError("the first (batch) dimension must be -1 so requests can be batched")
        return shape

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def v2_datatype(self) -> str:
        return V2_DATATYPES[self.dtype]

    def v2_metadata(self) -> dict[str, Any]:
        """This tensor as Open Inference Protocol v2 model metadata describes it."""
        return {"name": self.name, "datatype": self.v2_datatype, "shape": self.shape}

    def accepts(self, shape: tuple[int, ...] | list[int]) -> bool:
        """True when a concrete shape fits this spec (-1 matches any size)."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


class Slo(StrictModel):
    """Service-level objectives the gate checks before a model may be promoted."""

    latency_p99_ms: float = Field(gt=0)
    latency_batch_size: int = Field(default=1, ge=1)
    # Held-out metrics (researcher's and the evaluation suite's) that must be at least / at most.
    min_metrics: dict[str, float] = Field(default_factory=dict)
    max_metrics: dict[str, float] = Field(default_factory=dict)
    parity_tolerance: float = Field(default=1e-4, gt=0)
    # The exported model.onnx may not be larger (what the serving pods must load).
    max_model_size_mb: float | None = Field(default=None, gt=0)
    # Relative gate: a challenger may trail the registry's champion by at most this much on each
    # min/max metric, measured on the same held-out data (the first model has no champion).
    champion_tolerance: float = Field(default=0.01, ge=0)

    @model_validator(mode="after")
    def _bounds_are_consistent(self) -> Slo:
        for name, upper in self.max_metrics.items():
            lower = self.min_metrics.get(name)
            if lower is not None and lower > upper:
                message = f"{upper:g} is below min_metrics.{name} = {lower:g}: no model can pass"
                raise FieldError(("max_metrics", name), message)
        return self


class Owners(StrictModel):
    research: str = Field(min_length=1)
    engineering: str = Field(min_length=1)


class Contract(StrictModel):
    """The handoff contract between the researcher and the platform."""

    name: Dns1123Label
    task: Literal["classification", "regression"]
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    slo: Slo
    owners: Owners
    sha256: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _tensor_names_are_unique(self) -> Contract:
        """Every input and output needs its own name.

        Requests and responses address tensors by name, so a repeated input name leaves one
        input unreachable, and ONNX itself refuses a graph whose input and output share a name,
        but only at export time and with an error that does not mention contract.yaml.
        """
        inputs: set[str] = set()
        for i, spec in enumerate(self.inputs):
            if spec.name in inputs:
                raise FieldError(("inputs", i, "name"), f"{spec.name!r} is used twice")
            inputs.add(spec.name)
        outputs: set[str] = set()
        for i, spec in enumerate(self.outputs):
            if spec.allow_non_finite:
                raise FieldError(
                    ("outputs", i, "allow_non_finite"), "applies to inputs only (what requests may carry)"
                )
            if spec.name in inputs:
                raise FieldError(("outputs", i, "name"), f"{spec.name!r} is also an input name")
            if spec.name in outputs:
                raise FieldError(("outputs", i, "name"), f"{spec.name!r} is used twice")
            outputs.add(spec.name)
        return self

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


def load_contract(project_dir: Path) -> Contract:
    """Read and validate ``<project_dir>/contract.yaml``; the file's hash travels with it."""
    path = project_dir / CONTRACT_FILE
    contract = load_yaml_model(path, Contract)
    return contract.model_copy(update={"sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
