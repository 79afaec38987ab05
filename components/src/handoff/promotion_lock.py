"""The registry lock around moving ``champion``: read it, compare, move it, as one step.

MLflow has no compare-and-set for aliases, so two registers that beat the same champion could
both read it before either moves it, and both promote. Creating a registered model is atomic in
every MLflow store (its name is unique: a second create fails with RESOURCE_ALREADY_EXISTS, on a
sqlite file as on a tracking server), so the lock is a registered model, ``<model>.promotion-lock``,
that exists only while one process holds it: created to take it, deleted to give it back. It has
no versions and no aliases; nothing that looks up ``<model>``'s versions or aliases sees it.

A holder that died leaves it behind. A lock older than ``STALE_AFTER_S`` (its acquired-at tag,
by the clocks of the two machines) is broken with a log line, far longer than any holder keeps
it (a few registry calls). Breaking is itself done under a second lock
(``<model>.promotion-lock.break``), after reading that the same stale lock is still there, so
two waiters that both find it stale never delete the fresh lock one of them has taken since.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from handoff.errors import HandoffError

LOCK_SUFFIX = ".promotion-lock"
BREAK_SUFFIX = ".break"
TOKEN_TAG = "handoff.lock_token"
ACQUIRED_TAG = "handoff.lock_acquired_at"  # Unix seconds, by the holder's clock
HOLDER_TAG = "handoff.lock_holder"
# A holder keeps the lock for a few registry calls (seconds, even against a slow server): one
# older than this was left by a process that died. Waiting longer than this means a dead
# holder's lock is always broken before a waiter gives up.
STALE_AFTER_S = 300.0
WAIT_S = 360.0
POLL_S = 0.2
# create fails with RESOURCE_ALREADY_EXISTS while another holds the lock; the sqlite store may
# report RESOURCE_DOES_NOT_EXIST instead when the holder deletes it in between (it reads it back).
_TAKEN = ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")


def lock_name(model: str) -> str:
    """The registered model that is the promotion lock of ``model``."""
    return model + LOCK_SUFFIX


@dataclass(frozen=True)
class Held:
    """A lock as found in the registry."""

    token: str
    age_s: float
    holder: str


@contextlib.contextmanager
def promotion_lock(
    client: MlflowClient,
    model: str,
    holder: str,
    *,
    wait_s: float = WAIT_S,
    stale_after_s: float = STALE_AFTER_S,
) -> Iterator[None]:
    """Hold ``model``'s promotion lock for the block; ``holder`` says who, for whoever waits.

    Waits up to ``wait_s`` for another holder, then raises ``HandoffError`` saying who holds it
    and what to do.
    """
    name = lock_name(model)
    token = _acquire(client, name, holder, wait_s, stale_after_s)
    try:
        yield
    finally:
        _release(client, name, token, stale_after_s)


def _acquire(client: MlflowClient, name: str, holder: str, wait_s: float, stale_after_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        token = _create(client, name, holder)
        if token is not None:
            return token
        held = _held(client, name)
        if held is not None and held.age_s > stale_after_s and _break(client, name, held, stale_after_s):
            continue
        if time.monotonic() >= deadline:
            who = f"{held.holder}, {held.age_s:.0f} s ago" if held else "another process"
            raise HandoffError(
                f"waited {wait_s:g} s for the registry's promotion lock {name!r} (held by {who}); "
                f"if no handoff register or rollback of this model is running, delete the registered "
                f"model {name!r} (MLflow UI, or MlflowClient().delete_registered_model({name!r})) and "
                f"run the step again (a lock older than {stale_after_s:.0f} s is broken by itself)"
            )
        time.sleep(POLL_S * random.uniform(0.5, 1.5))  # jitter: waiters do not retry in step


def _create(client: MlflowClient, name: str, holder: str) -> str | None:
    """Take the lock named ``name``: its token, or None when another holds it."""
    token = uuid.uuid4().hex
    who = f"{holder} (host {socket.gethostname()}, pid {os.getpid()})"
    try:
        client.create_registered_model(
            name,
            tags={TOKEN_TAG: token, ACQUIRED_TAG: f"{time.time():.3f}", HOLDER_TAG: who},
            description=f"handoff's lock around moving champion, held by {who} for seconds.",
        )
    except MlflowException as exc:
        if exc.error_code in _TAKEN:
            return None
        raise
    return token


def _held(client: MlflowClient, name: str) -> Held | None:
    """The lock named ``name``, or None when nobody holds it."""
    try:
        found = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    try:
        acquired = float(found.tags[ACQUIRED_TAG])
    except (KeyError, ValueError):  # not made by _create: count from its creation
        acquired = (found.creation_timestamp or 0) / 1000
    holder = found.tags.get(HOLDER_TAG) or "unknown"
    return Held(token=found.tags.get(TOKEN_TAG, ""), age_s=time.time() - acquired, holder=holder)


def _break(client: MlflowClient, name: str, stale: Held, stale_after_s: float) -> bool:
    """Delete the stale lock ``stale`` if it is still there; whether it was this call that did."""
    breaker = name + BREAK_SUFFIX
    if _create(client, breaker, f"breaking the stale lock {name}") is None:
        other = _held(client, breaker)
        if other is not None and other.age_s > stale_after_s:  # a breaker that died mid-way
            _delete(client, breaker)
        return False
    try:
        now = _held(client, name)
        if now is None or now.token != stale.token:
            return False  # released, or already broken (and maybe taken again) meanwhile
        print(
            f"handoff: breaking the stale promotion lock {name!r}: held by {stale.holder} for "
            f"{stale.age_s:.0f} s (more than {stale_after_s:.0f} s; that process is gone)",
            file=sys.stderr,
            flush=True,
        )
        _delete(client, name)
        return True
    finally:
        _delete(client, breaker)


def _release(client: MlflowClient, name: str, token: str, stale_after_s: float) -> None:
    held = _held(client, name)
    if held is None or held.token != token:
        print(
            f"handoff: the promotion lock {name!r} was broken while this process held it "
            f"(it kept it over {stale_after_s:.0f} s); another may have moved champion meanwhile",
            file=sys.stderr,
            flush=True,
        )
        return
    _delete(client, name)


def _delete(client: MlflowClient, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
