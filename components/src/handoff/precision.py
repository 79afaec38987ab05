"""Numeric precision and kernel choices for training, decided once from the device.

bf16 autocast on GPUs that support it (no loss scaling needed), fp16 autocast with a gradient
scaler on older GPUs, plain fp32 on CPUs (CPU autocast is rarely faster for small models and
changes results). TF32 matmuls are allowed on GPUs: a large speed-up for a precision loss that
training does not notice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16": recorded with the run
    autocast_dtype: torch.dtype | None
    needs_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A gradient scaler that is a no-op unless fp16 needs it."""
        return torch.amp.GradScaler(device.type, enabled=self.needs_scaler)


def choose_precision(device: torch.device, *, mixed: bool = True) -> Precision:
    """The policy above; ``mixed=False`` (handoff.yaml training.mixed_precision) forces fp32."""
    if not mixed or device.type != "cuda":
        return Precision("fp32", None, needs_scaler=False)
    if torch.cuda.is_bf16_supported():
        return Precision("bf16", torch.bfloat16, needs_scaler=False)
    return Precision("fp16", torch.float16, needs_scaler=True)


def allow_fast_kernels(device: torch.device) -> None:
    """TF32 on Ampere and newer; cuDNN autotuning for fixed input shapes."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
