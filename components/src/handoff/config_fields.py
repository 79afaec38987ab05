"""The fields of model.py's ``Config`` the platform itself reads (seed, batch_size, epochs).

Config is the researcher's dataclass and may lack them (the defaults apply) or hold anything; the
trainer and ``handoff check`` read them through here, so both refuse a wrong type with the same
message, naming model.py and the field.
"""

from __future__ import annotations

from typing import Any

from handoff.errors import HandoffError
from handoff.model_source import MODEL_FILE


def int_setting(cfg: Any, name: str, default: int) -> int:
    """A Config field the trainer reads (epochs, batch_size, seed), checked to be a whole number."""
    value = getattr(cfg, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HandoffError(
            f"Config.{name} must be an integer, got {value!r}", file=MODEL_FILE, field="Config"
        )
    return value
