"""The payload log: a sample of the model server's requests and responses, kept as Parquet files.

The model server offers each answered request to a ``PayloadLog``; a sampled one is queued as
references to its arrays (no copy, no I/O on the request's path) and a writer thread writes one
Parquet file per flush (``flush_rows`` rows or ``flush_s`` seconds, whichever comes first) into a
rolling store: a local folder, or an object-store URI (``s3://bucket/prefix``) opened with
``pyarrow.fs.FileSystem.from_uri``. After each write the oldest files are deleted until the store
is under ``max_bytes``. ``handoff monitor`` reads a window of it back with ``read_window``.

A file is ``<UTC time %Y%m%dT%H%M%S%fZ>-<pid>-<seq:06d>.parquet`` (names sort by time; the time
is when it was written, so no row in it is newer), with one row per batch row:

    ts                    timestamp[ms, UTC]  when the response was produced
    request_id            string              the V2 request's id (a uuid4 when it had none)
    model, model_version  string              the served model and its registered version
    model_sha256          string              the served model.onnx's sha256 ("" where unknown)
    input.<name>          list<T>             that input's row, flattened (BYTES: list<binary>)
    input.<name>.shape    list<int32>         that row's shape (without the batch axis)
    output.<name>, output.<name>.shape        likewise for the response's outputs
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from handoff.project import Project

log = logging.getLogger(__name__)

MIB = 1024 * 1024
NAME_TIME = "%Y%m%dT%H%M%S%fZ"
FILE_NAME = re.compile(r"^(\d{8}T\d{12}Z)-\d+-\d{6}\.parquet$")
# Sampled requests waiting for the writer, by the bytes of their arrays: past it a sample is
# dropped (and counted) rather than letting a slow store grow the server's memory.
MAX_PENDING_BYTES = 64 * MIB
# The V2 request ids of handoff's own probes (deploy's smoke test and latency check): synthetic
# traffic, the contract example over and over, which would read as drift. Never logged.
SMOKE_TEST_ID = "smoke-test"
LATENCY_CHECK_ID = "latency-check"
PROBE_IDS = frozenset({SMOKE_TEST_ID, LATENCY_CHECK_ID})
# File numbers, shared by every log in the process: two logs writing to one store in the same
# microsecond (the collector keeps one per model version) still name their files apart.
_SEQ = itertools.count(1)


class _Sample(NamedTuple):
    ts: float  # unix seconds
    request_id: str | None
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    rows: int


def open_store(store: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of ``store``: a local folder, or a URI pyarrow opens (s3://…)."""
    if isinstance(store, str) and "://" in store:
        fs, path = pafs.FileSystem.from_uri(store)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(store).resolve())


def payload_store(project: Project) -> str:
    """Where the project's model server keeps its payload log: handoff.yaml's ``monitoring.store``,
    else ``<state folder>/payloads/<model name>`` on this machine."""
    from handoff.project import state_dir_of  # the state folder, without creating it

    store = project.settings.monitoring.store
    return store or str(state_dir_of(project.root) / "payloads" / project.contract.name)


class PayloadLog:
    """The writer: thread-safe; ``offer`` is the request's path and never waits on I/O."""

    def __init__(
        self,
        store: str | Path,
        *,
        model: str,
        version: str,
        sample_rate: float,
        max_bytes: int,
        flush_rows: int = 2048,
        flush_s: float = 2.0,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        seed: int | None = None,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        model_sha256: str = "",
    ) -> None:
        self.fs, self.root = open_store(store)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(self.root, recursive=True)
        self.model, self.version = model, str(version)
        # Versions are numbered per registry: a new registry (a deleted mlflow.db) numbers its
        # first version 1 again, and the sha tells its rows from the old version 1's.
        self.model_sha256 = model_sha256
        self.sample_rate, self.max_bytes = float(sample_rate), int(max_bytes)
        self.flush_rows, self.flush_s, self.max_pending_bytes = flush_rows, flush_s, max_pending_bytes
        self.on_written, self.on_dropped = on_written, on_dropped
        self.written_rows = 0  # rows that reached the store
        self.dropped_rows = 0  # sampled rows that did not (queue full, or a failed write)
        self._random = random.Random(seed).random
        self._lock = threading.Lock()  # guards the queue and its sizes (offer vs writer)
        self._write_lock = threading.Lock()  # one write (and rolling deletion) at a time
        self._pending: list[_Sample] = []
        self._pending_bytes = self._pending_rows = 0
        self._closed = False
        self._wake = threading.Event()
        self._writer = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self._writer.start()

    def offer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        request_id: str | None = None,
    ) -> bool:
        """Sample one answered request (arrays with the batch axis first); True when sampled. The
        arrays are kept by reference until written: the caller must not change them afterwards.
        handoff's own probes (``PROBE_IDS``) are never sampled."""
        if request_id in PROBE_IDS or (self.sample_rate < 1.0 and self._random() >= self.sample_rate):
            return False
        size = sum(_queued_bytes(array) for array in itertools.chain(inputs.values(), outputs.values()))
        rows = len(next(iter(inputs.values()))) if inputs else 0
        with self._lock:
            full = self._closed or self._pending_bytes + size > self.max_pending_bytes
            if not full:
                self._pending.append(_Sample(time.time(), request_id, inputs, outputs, rows))
                self._pending_bytes += size
                self._pending_rows += rows
                wake = self._pending_rows >= self.flush_rows
        if full:
            self._count_dropped(rows)
        elif wake:
            self._wake.set()
        return True

    def flush(self) -> None:
        """Write what is queued now (tests, shutdown)."""
        with self._write_lock:
            with self._lock:
                items, self._pending = self._pending, []
                self._pending_bytes = self._pending_rows = 0
            if items:
                self._write(items)

    def close(self) -> None:
        """Take no more samples, write the queued ones and stop the writer thread."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._writer.join()
        self.flush()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the writer must outlive one bad batch
                log.exception("payload log: a flush failed")

    def _count_dropped(self, rows: int) -> None:
        with self._lock:
            self.dropped_rows += rows
        if self.on_dropped is not None:
            self.on_dropped(rows)

    def _write(self, items: list[_Sample]) -> None:
        rows = sum(item.rows for item in items)
        now = datetime.now(UTC)
        name = f"{now.strftime(NAME_TIME)}-{os.getpid()}-{next(_SEQ) % 1_000_000:06d}.parquet"
        path = f"{self.root}/{name}"
        try:
            table = self._table(items)
            if isinstance(self.fs, pafs.LocalFileSystem):
                # A reader lists *.parquet: it never sees the file until it is whole.
                temporary = f"{self.root}/.{name}.tmp"
                pq.write_table(table, temporary, filesystem=self.fs)
                self.fs.move(temporary, path)
            else:  # an object appears only once its upload completed
                pq.write_table(table, path, filesystem=self.fs)
        except Exception:
            log.exception("payload log: cannot write %s; %d rows dropped", path, rows)
            self._count_dropped(rows)
            return
        self.written_rows += rows
        if self.on_written is not None:
            self.on_written(rows)
        self._roll(keep=path)

    def _table(self, items: list[_Sample]) -> pa.Table:
        counts = [item.rows for item in items]
        total = sum(counts)
        ts = np.repeat(np.array([item.ts * 1000 for item in items], dtype="int64"), counts)
        ids = [item.request_id or str(uuid.uuid4()) for item in items]
        columns: dict[str, pa.Array] = {
            "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
            "request_id": pa.array(np.repeat(np.array(ids, dtype=object), counts), pa.string()),
            "model": pa.repeat(pa.scalar(self.model), total),
            "model_version": pa.repeat(pa.scalar(self.version), total),
            "model_sha256": pa.repeat(pa.scalar(self.model_sha256), total),
        }
        for prefix, tensors in (("input", [i.inputs for i in items]), ("output", [i.outputs for i in items])):
            for name in dict.fromkeys(name for named in tensors for name in named):
                arrays = [named.get(name) for named in tensors]
                values, shapes = _list_columns(arrays, counts)
                columns[f"{prefix}.{name}"] = values
                columns[f"{prefix}.{name}.shape"] = shapes
        return pa.table(columns)

    def _roll(self, keep: str) -> None:
        """Delete the oldest files until the store is under max_bytes (never the newest one)."""
        files = _files(self.fs, self.root)
        total = sum(info.size or 0 for info in files)
        for info in files:
            if total <= self.max_bytes or info.path == keep:
                break
            # Another writer (the previous version's server) may have rolled it first.
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(info.path)
            total -= info.size or 0


def _queued_bytes(array: np.ndarray) -> int:
    """What a queued array keeps alive: a BYTES (object) array's ``nbytes`` counts only its
    references, so the texts they point at are added (only sampled requests pay for the sum).
    A postprocess may answer other objects than texts: they count as their reference (offer must
    not fail on the request's path)."""
    if array.dtype == object:
        return array.nbytes + sum(len(value) for value in array.flat if isinstance(value, bytes | str))
    return array.nbytes


def _list_columns(arrays: list[np.ndarray | None], counts: list[int]) -> tuple[pa.Array, pa.Array]:
    """One list<T> value per batch row (flattened) and its row shape; rows of a request that lacks
    the tensor are null (no values, no dims: the offsets stay in step with the values of the rows
    that have it). Numpy does the per-value work: this runs beside the requests, on the GIL."""
    shapes = [() if a is None else a.shape[1:] for a in arrays]
    row_sizes = np.repeat([0 if a is None else math.prod(a.shape[1:]) for a in arrays], counts)
    offsets = np.zeros(len(row_sizes) + 1, np.int32)
    np.cumsum(row_sizes, out=offsets[1:])
    present = [a.reshape(-1) for a in arrays if a is not None]
    if present[0].dtype == object:  # BYTES
        values = pa.array(np.concatenate(present), pa.binary())
    else:
        values = pa.array(np.concatenate([a.astype(present[0].dtype, copy=False) for a in present]))
    missing = [a is None for a in arrays]
    mask = pa.array(np.repeat(missing, counts)) if any(missing) else None
    lists = pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)
    dims = np.repeat([len(shape) for shape in shapes], counts)
    shape_offsets = np.zeros(len(dims) + 1, np.int32)
    np.cumsum(dims, out=shape_offsets[1:])
    shape_values = np.fromiter(
        (n for shape, count in zip(shapes, counts, strict=True) for _ in range(count) for n in shape),
        np.int32,
    )
    return lists, pa.ListArray.from_arrays(pa.array(shape_offsets), pa.array(shape_values), mask=mask)


def _files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """The store's Parquet files, oldest first."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except FileNotFoundError:
        return []
    found = [i for i in infos if i.type == pafs.FileType.File and FILE_NAME.match(i.base_name)]
    return sorted(found, key=lambda info: info.base_name)


def _written_at(info: pafs.FileInfo) -> datetime:
    match = FILE_NAME.match(info.base_name)
    assert match is not None
    return datetime.strptime(match.group(1), NAME_TIME).replace(tzinfo=UTC)


@dataclass
class Window:
    """Rows of the payload log, oldest first; ``inputs``/``outputs`` hold one array per row in its
    own shape (without the batch axis). A tensor only some of the files have (the interface changed
    within the window) is left out: filter by ``model_version`` to get it. A row whose request
    lacked a tensor the other rows of its file have (a V2 request that asked for some outputs) gives
    an empty array for it."""

    ts: np.ndarray  # datetime64[ms], UTC
    request_ids: list[str]
    versions: list[str]
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.request_ids)


def read_window(
    store: str | Path,
    *,
    since: datetime | None = None,
    last_rows: int | None = None,
    model_version: str | None = None,
    model_sha256: str | None = None,
) -> Window:
    """The payload log's rows at or after ``since`` (naive = UTC) of ``model_version`` (any when
    None), the newest ``last_rows`` of them when given. With ``model_sha256``, rows another model
    answered under that version number are left out (rows whose writer did not know the model's
    sha, the cluster's collector, stay). Reads the newest files first and stops as soon as older
    files cannot hold a row of the window."""
    fs, root = open_store(store)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    since_ms = None if since is None else int(since.timestamp() * 1000)
    tables: list[pa.Table] = []
    newest: list[np.ndarray] = []  # ts of the rows kept so far
    for info in reversed(_files(fs, root)):
        written = _written_at(info)
        if since is not None and written < since:
            break  # this file and older ones hold only older rows
        if last_rows is not None and sum(len(t) for t in newest) >= last_rows:
            # the last_rows-th newest row so far: a file written before it holds none newer
            cut = np.sort(np.concatenate(newest))[-last_rows]
            if int(written.timestamp() * 1000) < cut:
                break
        try:
            table = pq.read_table(info.path, filesystem=fs)
        except FileNotFoundError:  # rolled away while reading
            continue
        ts = table.column("ts").cast(pa.int64()).to_numpy()
        keep = np.ones(len(table), dtype=bool)
        if since_ms is not None:
            keep &= ts >= since_ms
        if model_version is not None:
            keep &= table.column("model_version").to_numpy(zero_copy_only=False) == str(model_version)
        if model_sha256 is not None and "model_sha256" in table.column_names:
            shas = table.column("model_sha256").to_numpy(zero_copy_only=False)
            keep &= (shas == model_sha256) | (shas == "")
        if not keep.all():
            table, ts = table.filter(pa.array(keep)), ts[keep]
        if len(table):
            tables.append(table)
            newest.append(ts)
    return _window(tables[::-1], last_rows)  # oldest first: rows of one millisecond keep their order


def _window(tables: list[pa.Table], last_rows: int | None) -> Window:
    if not tables:
        return Window(ts=np.empty(0, "datetime64[ms]"), request_ids=[], versions=[])
    # Only the columns every file has: a tensor some rows lack is left out (Window says why).
    common = set(tables[0].column_names).intersection(*(t.column_names for t in tables[1:]))
    columns = [c for c in tables[0].column_names if c in common]
    table = pa.concat_tables([t.select(columns) for t in tables], promote_options="permissive")
    order = np.argsort(table.column("ts").cast(pa.int64()).to_numpy(), kind="stable")
    if last_rows is not None:
        order = order[-last_rows:] if last_rows > 0 else order[:0]
    table = table.take(pa.array(order))
    window = Window(
        ts=table.column("ts").cast(pa.int64()).to_numpy().astype("datetime64[ms]"),
        request_ids=table.column("request_id").to_pylist(),
        versions=table.column("model_version").to_pylist(),
    )
    # A shape column is "<value column>.shape" of a value column that is there: by exact name, so
    # a tensor named "shape" ("input.shape", its shape "input.shape.shape") is a value column.
    present = set(columns)
    shapes = {name for name in columns if name.endswith(".shape") and name[: -len(".shape")] in present}
    for prefix, into in (("input.", window.inputs), ("output.", window.outputs)):
        for name in columns:
            if name.startswith(prefix) and name not in shapes:
                into[name[len(prefix) :]] = _rows(table.column(name), table.column(f"{name}.shape"))
    return window


def _rows(values: pa.ChunkedArray, shapes: pa.ChunkedArray) -> list[np.ndarray]:
    """Each row's flattened values reshaped to its row shape."""
    lists = values.combine_chunks()
    flat = lists.values.to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()
    return [
        flat[offsets[i] : offsets[i + 1]].reshape(shape if shape is not None else -1)
        for i, shape in enumerate(shapes.to_pylist())
    ]
