"""The project contract (``contract.yaml``): the one schema that export, evaluation, serving and
smoke tests all enforce.

Shapes use -1 for a dynamic axis: the first axis is the batch and must be -1; any other -1 (a
sequence length, an image size) is exported dynamic too and checked at two sizes. Dtypes are named
as numpy names them; the V2 datatype (``FP32``) and the ONNX element type follow from that one
name, so they cannot drift. ``task`` says what the evaluation suite scores: a bare
``classification`` / ``regression``, or a mapping that also names the scored output and target.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

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
RawDtype = Literal[
    "float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool", "bytes"
]
TaskType = Literal["classification", "regression"]
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8")


class TensorSpec(StrictModel):
    """One named model input or output."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
    dtype: Dtype
    shape: list[int] = Field(min_length=1)
    # Inputs only: the model server answers NaN or infinite values with 400 unless this is true
    # (for a model that handles missing values itself).
    allow_non_finite: bool = False
    # Integer inputs only: the values a request may carry, both ends included (token ids below the
    # vocabulary size, say). The model server answers others with 400; ONNX Runtime would fail on
    # an id past an embedding table (a 500) and silently wrap a negative one.
    range: tuple[int, int] | None = None

    @field_validator("shape")
    @classmethod
    def _dims_are_positive_or_dynamic(cls, shape: list[int]) -> list[int]:
        if any(dim == 0 or dim < -1 for dim in shape):
            raise ValueError("each dimension must be a positive size or -1 for a dynamic axis")
        if shape[0] != -1:
            raise ValueError("the first (batch) dimension must be -1 so requests can be batched")
        return shape

    @model_validator(mode="after")
    def _range_fits_the_dtype(self) -> TensorSpec:
        if self.range is None:
            return self
        if self.dtype not in INTEGER_DTYPES:
            raise FieldError(
                ("range",), f"applies to integer dtypes ({', '.join(INTEGER_DTYPES)}), not {self.dtype}"
            )
        low, high = self.range
        if low > high:
            raise FieldError(("range",), f"the low end {low} is above the high end {high}")
        info = np.iinfo(self.numpy_dtype)
        if low < info.min or high > info.max:
            raise FieldError(
                ("range",), f"[{low}, {high}] does not fit {self.dtype} [{info.min}, {info.max}]"
            )
        return self

    @property
    def dynamic_axes(self) -> list[int]:
        """Axes declared -1: the batch (0) and any other dynamic axis."""
        return [axis for axis, dim in enumerate(self.shape) if dim == -1]

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


class RawTensorSpec(TensorSpec):
    """A tensor of a raw request or response (``raw.inputs`` / ``raw.outputs``): a model input or
    output spec whose dtype may also be ``bytes`` (V2 ``BYTES``; numpy object arrays of bytes/str)."""

    dtype: RawDtype  # type: ignore[assignment]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == "bytes" else np.dtype(self.dtype)

    @property
    def v2_datatype(self) -> str:
        return "BYTES" if self.dtype == "bytes" else V2_DATATYPES[self.dtype]


def _unique_names(specs: list[RawTensorSpec] | None, where: str) -> None:
    for i, spec in enumerate(specs or []):
        if spec.name in [s.name for s in (specs or [])[:i]]:
            raise FieldError((where, i, "name"), f"{spec.name!r} is used twice")


class Raw(StrictModel):
    """What clients send and get back when model.py's preprocess/postprocess run in the server.

    ``inputs``: the request preprocess() receives (required with preprocess, refused without);
    ``outputs``: the response postprocess() returns (required with postprocess, refused without).
    """

    inputs: list[RawTensorSpec] | None = Field(default=None, min_length=1)
    outputs: list[RawTensorSpec] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _names_are_unique(self) -> Raw:
        _unique_names(self.inputs, "inputs")
        _unique_names(self.outputs, "outputs")
        for i, spec in enumerate(self.outputs or []):
            for only_inputs in ("allow_non_finite", "range"):
                if getattr(spec, only_inputs) not in (False, None):
                    raise FieldError(
                        ("outputs", i, only_inputs), "applies to inputs only (what requests may carry)"
                    )
        return self


# A relative champion tolerance: a percentage of the champion's value ("2%", "0.5%").
PERCENT = re.compile(r"^(\d+(\.\d*)?|\.\d+)%$")
# What a metric not named in a champion_tolerance mapping (which has no ``default``) may trail by.
DEFAULT_CHAMPION_TOLERANCE = 0.01


@dataclass(frozen=True)
class Tolerance:
    """How far a challenger may trail the champion on one metric, and which line said so.

    Absolute: ``amount`` in the metric's own units. Relative: ``amount`` percent of the champion's
    value, so one setting suits metrics of any scale (an RMSE in dollars, an R² near 1).
    """

    amount: float
    relative: bool
    source: str  # the contract field it came from, as a person would look it up

    def allowance(self, champion: float) -> float:
        """The largest shortfall allowed against a champion that scored ``champion``."""
        return abs(champion) * self.amount / 100 if self.relative else self.amount


def _tolerance_value(value: Any) -> float | str | None:
    """A number >= 0 or an 'N%' string, as given; None when it is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if value >= 0 else None
    if isinstance(value, str) and PERCENT.match(value):
        return value
    return None


# What `handoff optimize` can make from the exported fp32 model (handoff.onnx_forms), in the order
# it makes them. "fp32" is the exported model itself: always a candidate, and the fallback.
OptimizeForm = Literal["fp32", "fp32_optimized", "int8_static", "int8_dynamic", "fp16"]
OPTIMIZE_FORMS: tuple[OptimizeForm, ...] = ("fp32", "fp32_optimized", "int8_static", "int8_dynamic", "fp16")
DEFAULT_FORMS: tuple[OptimizeForm, ...] = ("fp32",)  # without slo.optimize: export's model, as is
# max |fp32 - form| on the contract example each form may show by default: an int8 model's logits
# move by a quantization step or so (the held-out metric drop is the real guard), fp16 by its
# 3-digit precision, a graph rewrite only by float reassociation.
DEFAULT_FORM_PARITY: dict[str, float] = {
    "fp32": 0.0,
    "fp32_optimized": 1e-4,
    "int8_static": 0.5,
    "int8_dynamic": 0.5,
    "fp16": 1e-2,
}


class Optimize(StrictModel):
    """``slo.optimize``: which forms `handoff optimize` may serve instead of the exported fp32
    model, and what each may cost. Without the section the exported model is served as it is: a
    contract written before optimize existed never gets another model unasked."""

    forms: list[OptimizeForm] = Field(default_factory=lambda: list(DEFAULT_FORMS))
    # How far a metric may fall short of fp32's value on the held-out split. A gated metric
    # (slo.min_metrics / max_metrics) not named here may not get worse at all; one named here that
    # is not gated is held too (lower is better for the suite's error metrics).
    max_metric_drop: dict[str, float] = Field(default_factory=dict)
    # max |fp32 ONNX - candidate| on the contract example, per form (DEFAULT_FORM_PARITY otherwise).
    parity_tolerance: dict[OptimizeForm, float] = Field(default_factory=dict)
    # A form other than fp32 is served only when its p50 beats fp32's by this factor: a smaller
    # gain is within noise, and not worth what a changed model costs to audit.
    min_speedup: float = Field(default=1.1, ge=1)

    @field_validator("max_metric_drop")
    @classmethod
    def _drops_are_not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for name, drop in value.items():
            if not drop >= 0:  # NaN too: it would allow any drop
                raise FieldError((name,), f"must be >= 0, the most {name} may fall (found {drop:g})")
        return value

    @field_validator("parity_tolerance")
    @classmethod
    def _tolerances_are_positive(cls, value: dict[str, float]) -> dict[str, float]:
        for form, tolerance in value.items():
            if not tolerance > 0:
                raise FieldError((form,), f"must be > 0 (found {tolerance:g})")
        return value

    def allows(self, form: str) -> bool:
        """fp32 is always allowed: it is what every other form is measured against."""
        return form == "fp32" or form in self.forms

    def parity(self, form: str) -> float:
        return self.parity_tolerance.get(form, DEFAULT_FORM_PARITY[form])  # type: ignore[call-overload]


# Evidently's statistical tests a contract may name for `handoff monitor` (its stattest registry
# has more; these are the ones that read the same on numerical and categorical columns or are the
# usual choice for one of them). None lets Evidently pick per column by type and row count.
DriftMethod = Literal["ks", "wasserstein", "psi", "jensenshannon", "kl_div", "chisquare", "z", "hellinger"]


class Drift(StrictModel):
    """``slo.drift``: when `handoff monitor` calls the logged traffic drifted from the registered
    version's reference profile (training inputs, held-out outputs). Without the section the
    defaults hold; the section is left out of the contract's dump when absent, so contracts
    written before it hash as they did."""

    # The verdict is "drift" when at least this share of the input features drifted...
    max_drift_share: float = Field(default=0.5, gt=0, le=1)
    # ...or, with prediction: true, when the model's predictions (class, or output values) drifted.
    prediction: bool = True
    # The per-feature test and its threshold (a p-value for ks/chisquare/z, a distance for the
    # others); None: Evidently's choice per column and its default threshold.
    method: DriftMethod | None = None
    threshold: float | None = Field(default=None, gt=0)
    # Fewer logged rows than this give no verdict: a handful of requests says nothing.
    min_rows: int = Field(default=200, ge=1)
    # Per input, a value that only pads its rows (token id 0 after a short review): left out of
    # its drift columns on both sides, so training rows padded to a fixed length and requests
    # sent unpadded describe the same data alike.
    pad: dict[str, float] = Field(default_factory=dict)


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
    # Relative gate: how far a challenger may trail the registry's champion on each min/max
    # metric, on the same held-out split (the first model has no champion). A number (absolute,
    # every metric), "N%" (of the champion's value), or per metric with an optional default:
    # {r2: "2%", rmse: 0.5, default: 0.01}.
    champion_tolerance: float | str | dict[str, float | str] = DEFAULT_CHAMPION_TOLERANCE
    # What `handoff optimize` may serve instead of the exported fp32 model (None: the defaults).
    optimize: Optimize | None = None
    # When `handoff monitor` calls live traffic drifted (None: the defaults).
    drift: Drift | None = None

    @model_serializer(mode="wrap")
    def _without_absent_sections(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A contract without ``slo.optimize`` or ``slo.drift`` dumps (and hashes) as it did before
        they existed."""
        data: dict[str, Any] = handler(self)
        for section in ("optimize", "drift"):
            if getattr(self, section) is None:
                data.pop(section, None)
        return data

    @property
    def drifting(self) -> Drift:
        """``slo.drift`` as written, or its defaults."""
        return self.drift or Drift()

    @property
    def optimizing(self) -> Optimize:
        """``slo.optimize`` as written, or its defaults."""
        return self.optimize or Optimize()

    @field_validator("champion_tolerance", mode="plain")
    @classmethod
    def _tolerance_is_a_number_percentage_or_mapping(cls, value: Any) -> float | str | dict[str, float | str]:
        # One hand-written validator rather than a pydantic union, whose errors would list every
        # alternative it tried instead of the one mistake.
        if isinstance(value, dict):
            checked: dict[str, float | str] = {}
            for name, each in value.items():
                tolerance = _tolerance_value(each)
                if not isinstance(name, str) or tolerance is None:
                    message = f"must be a number >= 0 or a percentage such as '2%' (found {each!r})"
                    raise FieldError((str(name),), message)
                checked[name] = tolerance
            return checked
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to 0")
        tolerance = _tolerance_value(value)
        if tolerance is None:
            raise PydanticCustomError(
                "champion_tolerance",
                "Input should be a number >= 0, 'N%' or a mapping {metric: number or 'N%'} "
                "with an optional default",
            )
        return tolerance

    @model_validator(mode="after")
    def _bounds_are_consistent(self) -> Slo:
        for name, upper in self.max_metrics.items():
            lower = self.min_metrics.get(name)
            if lower is not None and lower > upper:
                message = f"{upper:g} is below min_metrics.{name} = {lower:g}: no model can pass"
                raise FieldError(("max_metrics", name), message)
        if isinstance(self.champion_tolerance, dict):
            gated = {"default", *self.min_metrics, *self.max_metrics}
            for name in self.champion_tolerance:
                if name not in gated:
                    message = f"{name!r} is not gated (not in min_metrics or max_metrics)"
                    raise FieldError(("champion_tolerance", name), message)
        return self

    def tolerance(self, metric: str) -> Tolerance:
        """The champion tolerance for ``metric``: its own entry, else ``default``, else 0.01."""
        field = "slo.champion_tolerance"
        value: float | str = DEFAULT_CHAMPION_TOLERANCE
        if not isinstance(self.champion_tolerance, dict):
            value, source = self.champion_tolerance, field
        elif metric in self.champion_tolerance:
            value, source = self.champion_tolerance[metric], f"{field}.{metric}"
        elif "default" in self.champion_tolerance:
            value, source = self.champion_tolerance["default"], f"{field}.default"
        else:
            source = f"the default: {field} has no {metric} or default entry"
        if isinstance(value, str):
            return Tolerance(float(value[:-1]), relative=True, source=source)
        return Tolerance(float(value), relative=False, source=source)


class Task(StrictModel):
    """What the evaluation suite scores: the task kind, and which output against which target.

    ``output`` names a contract output (required when there are several). ``target`` picks one
    target when the datasets yield several: a dict key, or an index into a tuple of targets.
    """

    type: TaskType
    output: str | None = None
    target: str | int | None = None


class Owners(StrictModel):
    research: str = Field(min_length=1)
    engineering: str = Field(min_length=1)


class Contract(StrictModel):
    """The handoff contract between the researcher and the platform."""

    name: Dns1123Label
    task: Task
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    slo: Slo
    owners: Owners
    raw: Raw | None = None
    sha256: str = Field(default="", exclude=True)

    @model_serializer(mode="wrap")
    def _without_absent_raw(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A contract without ``raw`` dumps (and hashes) as it did before ``raw`` existed, so its
        registered versions keep their ``handoff.contract_sha256``."""
        data: dict[str, Any] = handler(self)
        if self.raw is None:
            data.pop("raw", None)
        return data

    @field_validator("task", mode="before")
    @classmethod
    def _bare_task_type(cls, value: Any) -> Any:
        """``task: classification`` is short for ``task: {type: classification}``."""
        return {"type": value} if isinstance(value, str) else value

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
            for only_inputs in ("allow_non_finite", "range"):
                if getattr(spec, only_inputs) not in (False, None):
                    raise FieldError(
                        ("outputs", i, only_inputs), "applies to inputs only (what requests may carry)"
                    )
            if spec.name in inputs:
                raise FieldError(("outputs", i, "name"), f"{spec.name!r} is also an input name")
            if spec.name in outputs:
                raise FieldError(("outputs", i, "name"), f"{spec.name!r} is used twice")
            outputs.add(spec.name)
        return self

    @model_validator(mode="after")
    def _drift_pads_name_inputs(self) -> Contract:
        unknown = sorted(set(self.slo.drifting.pad) - set(self.input_names))
        if unknown:
            raise FieldError(
                ("slo", "drift", "pad", unknown[0]),
                f"is not an input; the inputs are {self.input_names}",
            )
        return self

    @model_validator(mode="after")
    def _scored_output_is_named(self) -> Contract:
        """With several outputs the suite cannot guess which one holds the predictions: scoring
        the first would grade an embedding as if it were logits, silently."""
        names = self.output_names
        if self.task.output is None and len(names) > 1:
            raise FieldError(
                ("task", "output"),
                f"the model has {len(names)} outputs ({', '.join(names)}): say which one the "
                "evaluation suite scores",
            )
        if self.task.output is not None and self.task.output not in names:
            raise FieldError(
                ("task", "output"), f"{self.task.output!r} is not an output; the outputs are {names}"
            )
        return self

    @property
    def task_type(self) -> TaskType:
        """``classification`` or ``regression``: the one accessor code uses for the task kind."""
        return self.task.type

    @property
    def scored_output(self) -> int:
        """Index in ``outputs`` of the output the evaluation suite scores."""
        return self.output_names.index(self.task.output) if self.task.output else 0

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def request_inputs(self) -> list[TensorSpec]:
        """What a request carries: ``raw.inputs`` when preprocess runs in the server, else ``inputs``."""
        return list(self.raw.inputs) if self.raw and self.raw.inputs else list(self.inputs)

    @property
    def response_outputs(self) -> list[TensorSpec]:
        """What a response carries: ``raw.outputs`` when postprocess runs in the server, else ``outputs``."""
        return list(self.raw.outputs) if self.raw and self.raw.outputs else list(self.outputs)

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


def load_contract(project_dir: Path) -> Contract:
    """Read and validate ``<project_dir>/contract.yaml``; its content hash travels with it.

    The hash is of what the contract says (the validated fields, canonical JSON), not of the
    file's bytes: a comment or a re-indent is not a new contract, a changed SLO is (a registered
    version is the model and its contract).
    """
    contract = load_yaml_model(project_dir / CONTRACT_FILE, Contract)
    canonical = json.dumps(contract.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return contract.model_copy(update={"sha256": hashlib.sha256(canonical.encode()).hexdigest()})
