"""The one exception type for errors a user can cause and fix.

The CLI prints these as a single line (no stack trace) and exits non-zero; anything else is a
bug in the platform and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class HandoffError(Exception):
    """A problem in the user's project: names the file and field at fault and what was expected."""

    def __init__(self, message: str, *, file: str | Path | None = None, field: str | None = None):
        self.file = str(file) if file is not None else None
        self.field = field
        self.detail = message
        where = ": ".join(part for part in (self.file, field) if part)
        super().__init__(f"{where}: {message}" if where else message)
