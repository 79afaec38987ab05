"""Server-side dynamic batching: requests that wait while the model runs are run together.

One worker runs the model, one batch at a time, off the event loop (ONNX Runtime releases the
GIL and uses its own threads). Requests that arrive meanwhile queue up; when the worker is free
it takes every queued request that fits, up to ``max_batch_size`` rows, concatenates their
inputs along the batch axis (the contract makes the first axis of every tensor the batch axis),
runs once, and hands each request exactly its own rows of every output. A lone request runs at
once, so batching adds no latency at low load; ``max_wait_ms`` > 0 holds a batch open that long
for more requests, as Triton's ``max_queue_delay`` does.

With ``max_wait_ms`` 0, a request that the model (measured per row) runs in less than
``INLINE_BELOW_S`` runs on the event loop itself when nothing else is queued or running: handing
it to the worker thread and back would cost more than the run, and batching cannot save
anything on a model that fast. A large request, or a model that turns out slower, goes to the
worker again.

Requests whose non-batch dimensions differ cannot share a tensor and never share a batch. If a
batch of several requests fails, each is run again on its own, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

Feeds = Mapping[str, np.ndarray]
RunModel = Callable[[Feeds], Sequence[np.ndarray]]

INLINE_BELOW_S = 0.0002


@dataclass
class _Pending:
    feeds: Feeds
    rows: int
    key: tuple[tuple[str, tuple[int, ...]], ...]  # what must match to share a batch
    done: asyncio.Future[list[np.ndarray]] = field(repr=False)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Runs ``run_model`` on batches of requests; ``await batcher.run(feeds)`` gives one request's
    outputs. ``max_batch_size`` 1 turns batching off (requests run one at a time, in order)."""

    def __init__(
        self,
        run_model: RunModel,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int, int], None] = lambda rows, requests: None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_model = run_model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: _Pending | None = None  # taken from the queue but did not fit the last batch
        self._worker: asyncio.Task[None] | None = None
        self._running = False  # the worker has a batch in hand
        self._row_s = float("inf")  # moving average of a model run's seconds per row; unknown at first
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, feeds: Feeds) -> list[np.ndarray]:
        """One request's outputs, in the model's output order, each with the request's own rows."""
        rows = {int(array.shape[0]) for array in feeds.values()}
        if len(rows) != 1:
            raise ValueError("every input of one request needs the same first (batch) dimension")
        count = rows.pop()
        loop = asyncio.get_running_loop()
        queue = self._queue
        if self._loop is not loop or queue is None:  # first request, or a new loop (asyncio.run)
            self._loop, self._queue, self._held = loop, (queue := asyncio.Queue()), None
            self._worker = loop.create_task(self._work(), name="batcher")
        if self._inline(count, queue):
            self.on_batch(count, 1)
            started = time.perf_counter()
            outputs = list(self.run_model(feeds))
            self._timed(started, count)
            return outputs
        key = tuple((name, tuple(array.shape[1:])) for name, array in sorted(feeds.items()))
        pending = _Pending(feeds=feeds, rows=count, key=key, done=loop.create_future())
        await queue.put(pending)
        return await pending.done

    def _inline(self, rows: int, queue: asyncio.Queue[_Pending]) -> bool:
        """Whether to run a request of ``rows`` on the event loop now (see the module docstring)."""
        fast = rows * self._row_s < INLINE_BELOW_S
        idle = not self._running and self._held is None and queue.empty()
        return fast and idle and self.max_wait_s == 0

    async def _next(self, timeout_s: float | None) -> _Pending | None:
        assert self._queue is not None
        if self._held is not None:
            held, self._held = self._held, None
            return held
        if timeout_s is None:
            return await self._queue.get()
        if timeout_s <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Pending]:
        first = await self._next(None)
        assert first is not None
        batch, rows = [first], first.rows
        deadline = first.queued_at + self.max_wait_s
        while rows < self.max_batch_size:
            more = await self._next(deadline - time.perf_counter())
            if more is None:
                break
            if more.key != first.key or rows + more.rows > self.max_batch_size:
                self._held = more  # first in line for the next batch
                break
            batch.append(more)
            rows += more.rows
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            batch = [p for p in batch if not p.done.cancelled()]  # the client went away
            if not batch:
                continue
            self._running = True
            try:
                await self._serve(batch)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
                for pending in batch:
                    _settle(pending, exception=exc)
            finally:
                self._running = False

    async def _serve(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(p.rows for p in batch)
        self.on_batch(rows, len(batch))
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, batch, rows)
        except Exception as exc:  # noqa: BLE001 - handed to the requests, not raised here
            if len(batch) > 1:
                await self._run_alone(batch)  # so only a request that fails by itself fails
            else:
                _settle(batch[0], exception=exc)
            return
        for pending, own in zip(batch, outputs, strict=True):
            _settle(pending, result=own)

    async def _run_alone(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        for pending in batch:
            try:
                own = await loop.run_in_executor(self._executor, self._run_batch, [pending], pending.rows)
            except Exception as exc:  # noqa: BLE001
                _settle(pending, exception=exc)
            else:
                _settle(pending, result=own[0])

    def _run_batch(self, batch: list[_Pending], rows: int) -> list[list[np.ndarray]]:
        """Run one batch (in the worker thread); split the outputs back into each request's rows."""
        started = time.perf_counter()
        if len(batch) == 1:
            outputs = self.run_model(batch[0].feeds)
            self._timed(started, rows)
            return [list(outputs)]
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        outputs = self.run_model(feeds)
        self._timed(started, rows)
        for output in outputs:
            if output.ndim == 0 or output.shape[0] != rows:
                raise RuntimeError(
                    f"the model returned {output.shape[0] if output.ndim else 'a scalar'} rows for a "
                    f"batch of {rows}: its outputs are not batched along the first axis"
                )
        ends = np.cumsum([p.rows for p in batch])[:-1]
        split = [np.split(output, ends) for output in outputs]
        return [[parts[i] for parts in split] for i in range(len(batch))]

    def _timed(self, started: float, rows: int) -> None:
        per_row = (time.perf_counter() - started) / max(rows, 1)
        self._row_s = per_row if self._row_s == float("inf") else 0.8 * self._row_s + 0.2 * per_row

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _settle(
    pending: _Pending, *, result: list[np.ndarray] | None = None, exception: BaseException | None = None
) -> None:
    if pending.done.done():  # cancelled: the client is gone
        return
    if exception is not None:
        pending.done.set_exception(exception)
    else:
        assert result is not None
        pending.done.set_result(result)
