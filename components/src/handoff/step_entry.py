"""How an orchestrator calls a step: run it, keep its record, and fail with the step's own message.

A pipeline engine shows a failed task as a traceback of its executor. ``run_step`` prints the
user's error as one line, records it where the local runner (``HANDOFF_ERROR_FILE``) or
Kubernetes (``/dev/termination-log``) shows it, and exits non-zero. On success the step's result
is written as JSON to the task's ``record`` artifact, which later steps and the run summary read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from handoff.errors import HandoffError
from handoff.files import read_json, write_json

ResultT = TypeVar("ResultT")
ERROR_FILE_ENV = "HANDOFF_ERROR_FILE"
# Set by the local runner (kfp.local): steps that would reach for a cluster stay on this machine.
LOCAL_RUN_ENV = "HANDOFF_LOCAL_RUN"
TERMINATION_LOG = Path("/dev/termination-log")


def in_cluster() -> bool:
    """Whether this step runs in a cluster's pod (the kubelet gives every pod the API server's
    address), not in a local run (which has no cluster): it then deploys to the cluster, and
    checks first that the cluster can serve what it registers."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not os.environ.get(LOCAL_RUN_ENV)


def record_json(result: Any) -> str:
    """A step result as JSON (what ``handoff <step>`` prints and the record artifact holds)."""
    return json.dumps(dataclasses.asdict(result), sort_keys=True, indent=2)


def read_record(path: str | Path) -> dict[str, Any]:
    """Another step's record, as handed over by the orchestrator."""
    return read_json(Path(path))


def write_termination_message(message: str) -> None:
    """Where Kubernetes shows why a container failed (``kubectl describe``, a job's failure reason)."""
    if TERMINATION_LOG.exists() and os.access(TERMINATION_LOG, os.W_OK):  # mounted by Kubernetes
        TERMINATION_LOG.write_text(message[:4096])


def _report(step: str, message: str) -> None:
    print(f"handoff: {step} failed: {message}", file=sys.stderr, flush=True)
    target = os.environ.get(ERROR_FILE_ENV)
    if target:
        write_json(Path(target), {"step": step, "message": message})
    write_termination_message(f"{step}: {message}")


def run_step(step: str, function: Callable[..., ResultT], record: str | Path, **kwargs: Any) -> ResultT:
    """Call ``function(**kwargs)``, write its result to ``record``; exit non-zero on failure."""
    try:
        result = function(**kwargs)
    except HandoffError as exc:
        _report(step, str(exc))
        raise SystemExit(2) from None
    except Exception as exc:  # noqa: BLE001 - anything else is a platform bug: keep its traceback
        traceback.print_exc()
        _report(step, f"unexpected {type(exc).__name__}: {exc} (full traceback in the step's log)")
        raise SystemExit(1) from None
    Path(record).write_text(record_json(result) + "\n")
    return result
