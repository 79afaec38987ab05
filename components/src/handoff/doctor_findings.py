"""What every `handoff doctor` check ends as, and the one HTTP request the server checks share.

A leaf module: ``handoff.doctor`` runs the checks of ``handoff.doctor_access`` and
``handoff.doctor_engines``, and all three report with ``Finding``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import requests

Outcome = Literal["pass", "fail", "skip"]
Get = Callable[..., requests.Response]  # requests.get, or a test's stand-in with its signature
HTTP_TIMEOUT_S = 10


@dataclass(frozen=True)
class Finding:
    """One check's line: pass, fail (with what to do) or skip (with why it could not be checked)."""

    check: str
    outcome: Outcome
    detail: str


def fetch(check: str, url: str, get: Get, **kwargs: Any) -> requests.Response | Finding:
    """One GET (no retries: an unreachable server is reported at once), or the failing line when
    the server cannot be reached or answers an error."""
    try:
        answer = get(url, timeout=HTTP_TIMEOUT_S, **kwargs)
    except requests.RequestException as exc:
        return Finding(check, "fail", f"cannot reach {url}: {exc}")
    if answer.status_code >= 400:
        return Finding(check, "fail", f"{url} answered HTTP {answer.status_code}")
    return answer


def check_health(check: str, url: str, get: Get) -> Finding:
    """Does the server at ``url`` answer without an error?"""
    answer = fetch(check, url, get)
    if isinstance(answer, Finding):
        return answer
    return Finding(check, "pass", f"{url} answered HTTP {answer.status_code}")
