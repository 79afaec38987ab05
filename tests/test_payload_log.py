"""The payload log (``handoff.payload_log``): what the model server writes is what ``read_window``
gives back, sampling keeps the share asked for, the store stays under its size, a full queue drops
instead of slowing a request; and a real server logs the requests it answered, locally and to S3."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from prometheus_client.utils import floatToGoString

from handoff.errors import HandoffError
from handoff.payload_log import PayloadLog, read_window
from handoff.serving import local_server
from handoff.settings import load_settings
from tests.conftest import edit_yaml
from tests.model_server import MODEL, start_server
from tests.rehearsal.s3 import S3

BIG = 1 << 30  # a store size that rolls nothing away


def texts(*values: bytes) -> np.ndarray:
    """A BYTES tensor of one row per value, as the server decodes it (an object array of bytes)."""
    array = np.empty((len(values), 1), dtype=object)
    array[:, 0] = values
    return array


def logged(store: Path | str, **kwargs: object) -> PayloadLog:
    return PayloadLog(store, model="m", version="1", sample_rate=1.0, max_bytes=BIG, **kwargs)  # type: ignore[arg-type]


@pytest.mark.unit
def test_rows_come_back_with_their_dtypes_shapes_and_ids(tmp_path: Path) -> None:
    log = logged(tmp_path)
    # Two requests whose rows differ in length (a dynamic axis), one without an id.
    log.offer(
        {"tokens": np.array([[1, 2, 3], [4, 5, 6]], np.int64), "text": texts(b"ab", "é".encode())},
        {"score": np.array([[0.5, 1.5], [2.5, 3.5]], np.float32)},
        "first",
    )
    log.offer(
        {"tokens": np.array([[7]], np.int64), "text": texts(b"")}, {"score": np.zeros((1, 2), np.float32)}
    )
    log.close()

    window = read_window(tmp_path)
    assert window.rows == 3  # one row per batch row
    assert window.request_ids[:2] == ["first", "first"] and window.request_ids[2] not in ("", "first")
    assert window.versions == ["1", "1", "1"]
    assert [row.tolist() for row in window.inputs["tokens"]] == [[1, 2, 3], [4, 5, 6], [7]]
    assert all(row.dtype == np.int64 for row in window.inputs["tokens"])
    assert [row.tolist() for row in window.inputs["text"]] == [[b"ab"], ["é".encode()], [b""]]
    assert window.outputs["score"][1].tolist() == [2.5, 3.5]
    assert window.outputs["score"][1].dtype == np.float32
    assert window.ts.dtype == np.dtype("datetime64[ms]")
    assert abs(window.ts[0].astype(datetime).replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() < 60


@pytest.mark.unit
def test_rows_keep_their_row_shape(tmp_path: Path) -> None:
    log = logged(tmp_path)
    log.offer({"image": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)}, {"y": np.array([1, 2])})
    log.close()
    window = read_window(tmp_path)
    assert window.inputs["image"][1].shape == (3, 4)
    assert window.inputs["image"][1][2, 3] == 23
    assert window.outputs["y"][1].shape == () and window.outputs["y"][1] == 2


@pytest.mark.unit
def test_the_files_are_the_shared_format(tmp_path: Path) -> None:
    """What `handoff monitor` and the cluster collector rely on: names that sort by time, and the
    columns with their types."""
    log = logged(tmp_path)
    log.offer({"x": np.ones((1, 2), np.float32)}, {"y": np.ones((1,), np.int64)}, "r")
    log.close()
    (file,) = tmp_path.iterdir()
    assert file.name.endswith(".parquet") and file.name[8] == "T" and file.name[:8].isdigit()
    schema = pq.read_schema(file)
    assert {name: str(schema.field(name).type) for name in schema.names} == {
        "ts": "timestamp[ms, tz=UTC]",
        "request_id": "string",
        "model": "string",
        "model_version": "string",
        "model_sha256": "string",
        "input.x": "list<element: float>",
        "input.x.shape": "list<element: int32>",
        "output.y": "list<element: int64>",
        "output.y.shape": "list<element: int32>",
    }


@pytest.mark.unit
def test_sampling_keeps_the_share_asked_for(tmp_path: Path) -> None:
    off = PayloadLog(tmp_path / "off", model="m", version="1", sample_rate=0.0, max_bytes=BIG)
    half = PayloadLog(tmp_path / "half", model="m", version="1", sample_rate=0.5, max_bytes=BIG, seed=7)
    row = {"x": np.zeros((1, 1), np.float32)}
    assert not any(off.offer(row, row) for _ in range(200))
    kept = sum(half.offer(row, row) for _ in range(2000))
    off.close()
    half.close()
    assert read_window(tmp_path / "off").rows == 0
    # Binomial(2000, 0.5): 5 standard deviations are ±112.
    assert 888 <= kept <= 1112
    assert read_window(tmp_path / "half").rows == kept


@pytest.mark.unit
def test_the_store_stays_under_its_size_and_keeps_the_newest(tmp_path: Path) -> None:
    max_bytes = 40_000
    log = PayloadLog(tmp_path, model="m", version="1", sample_rate=1.0, max_bytes=max_bytes)
    for i in range(30):  # files of ~8 kB of random (incompressible) floats
        log.offer({"x": np.random.default_rng(i).random((1, 1000), dtype=np.float32)}, {}, f"r{i}")
        log.flush()
    log.close()
    files = sorted(tmp_path.glob("*.parquet"))
    assert sum(f.stat().st_size for f in files) <= max_bytes
    assert 2 <= len(files) < 30
    assert read_window(tmp_path).request_ids == [f"r{i}" for i in range(30 - len(files), 30)]


@pytest.mark.unit
def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    dropped: list[float] = []
    # The writer never wakes on its own here: nothing leaves the queue until close().
    log = PayloadLog(
        tmp_path,
        model="m",
        version="1",
        sample_rate=1.0,
        max_bytes=BIG,
        flush_rows=10**9,
        flush_s=3600,
        max_pending_bytes=10 * 4000,
        on_dropped=dropped.append,
    )
    row = {"x": np.zeros((1, 1000), np.float32)}  # 4000 bytes
    started = time.perf_counter()
    for _ in range(100):
        log.offer(row, {})
    assert time.perf_counter() - started < 0.5  # no waiting on the writer
    assert log.dropped_rows == 90 and sum(dropped) == 90
    log.close()
    assert read_window(tmp_path).rows == 10 and log.written_rows == 10


@pytest.mark.unit
def test_a_window_is_chosen_by_time_version_and_count(tmp_path: Path) -> None:
    def write(version: str, ids: list[str]) -> None:
        log = PayloadLog(tmp_path, model="m", version=version, sample_rate=1.0, max_bytes=BIG)
        for request_id in ids:
            log.offer({"x": np.zeros((1, 1), np.float32)}, {}, request_id)
            log.flush()  # one file each
        log.close()

    write("1", ["a", "b", "c"])
    time.sleep(0.01)
    middle = datetime.now(UTC)
    time.sleep(0.01)
    write("2", ["d", "e"])
    write("1", ["f"])
    assert read_window(tmp_path).request_ids == ["a", "b", "c", "d", "e", "f"]
    assert read_window(tmp_path, since=middle).request_ids == ["d", "e", "f"]
    assert read_window(tmp_path, since=middle.replace(tzinfo=None)).request_ids == [
        "d",
        "e",
        "f",
    ]  # naive: UTC
    assert read_window(tmp_path, model_version="1").request_ids == ["a", "b", "c", "f"]
    assert read_window(tmp_path, last_rows=2).request_ids == ["e", "f"]
    assert read_window(tmp_path, last_rows=2, model_version="1").request_ids == ["c", "f"]
    assert read_window(tmp_path, since=middle, model_version="1", last_rows=5).request_ids == ["f"]
    assert read_window(tmp_path / "never-written").rows == 0


@pytest.mark.unit
def test_a_new_registrys_version_1_is_not_the_old_ones(tmp_path: Path) -> None:
    """A deleted mlflow.db numbers versions from 1 again: the served model's sha tells its rows
    apart; rows whose writer knew no sha (the cluster's collector) stay in; probes never get in."""
    for sha, request_id in (("old", "a"), ("new", "b"), ("", "c"), ("new", "smoke-test")):
        log = logged(tmp_path, model_sha256=sha)
        log.offer({"x": np.zeros((1, 1), np.float32)}, {}, request_id)
        log.close()
    assert read_window(tmp_path, model_version="1").request_ids == ["a", "b", "c"]
    assert read_window(tmp_path, model_version="1", model_sha256="new").request_ids == ["b", "c"]


@pytest.mark.unit
def test_a_bad_monitoring_setting_names_its_field(default_project: Path, tmp_path: Path) -> None:
    project = Path(shutil.copytree(default_project, tmp_path / "p"))
    assert load_settings(project).monitoring.sample_rate == 1.0  # the template's section loads
    edit_yaml(project / "handoff.yaml", lambda s: s["monitoring"].update(sample_rate=1.5))
    with pytest.raises(HandoffError, match=r"monitoring\.sample_rate") as error:
        load_settings(project)
    assert "handoff.yaml" in str(error.value) and "1" in str(error.value)


@pytest.mark.unit
def test_deploy_points_the_server_at_the_state_folder_by_default(
    default_project: Path, tmp_path: Path
) -> None:
    from handoff.deployment import write_spec
    from handoff.payload_log import payload_store
    from handoff.project import Project, state_dir_of

    project = Project.load(default_project)
    spec = json.loads(write_spec(project, tmp_path, MODEL, "4", 8123, tmp_path / "h.sock").read_text())
    store = state_dir_of(project.root) / "payloads" / project.contract.name
    assert payload_store(project) == str(store)  # where `handoff monitor` reads
    assert spec["payload_log"] == {"sample_rate": 1.0, "max_bytes": 256 * 1024 * 1024, "store": str(store)}


def send(url: str, request_id: str | None, rows: np.ndarray) -> list[float]:
    body = {
        "inputs": [
            {"name": "image", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    if request_id is not None:
        body["id"] = request_id  # type: ignore[assignment]
    response = requests.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"]
    return [answer["id"], *answer["outputs"][0]["data"]]


@pytest.mark.local
def test_a_server_logs_the_requests_it_answered(
    default_onnx: Path, default_project: Path, tmp_path: Path
) -> None:
    store = tmp_path / "payloads"
    spec_log = {"sample_rate": 1.0, "max_bytes": BIG, "store": str(store)}
    # A latency SLO that is none of the histogram's default bounds (30 ms).
    project = Path(shutil.copytree(default_project, tmp_path / "p"))
    edit_yaml(project / "contract.yaml", lambda c: c["slo"].update(latency_p99_ms=30))
    handle, url = start_server(tmp_path, default_onnx, project, model_version="5", payload_log=spec_log)
    rng = np.random.default_rng(0)
    sent = [rng.random((rows, 1, 8, 8), dtype=np.float32) for rows in (1, 3, 2)]
    try:
        answers = [
            send(url, request_id, rows) for request_id, rows in zip(["a", None, "c"], sent, strict=True)
        ]
        metrics = requests.get(f"{url}/metrics", timeout=10).text
    finally:
        local_server.terminate(handle)  # graceful: the last requests are written on the way out
    assert f'handoff_payload_log_dropped_total{{model="{MODEL}"}} 0.0' in metrics
    # Alert rules count the requests slower than the SLO from the bucket of its exact bound.
    bound = floatToGoString(0.03)
    assert f'handoff_inference_request_duration_seconds_bucket{{le="{bound}",model="{MODEL}"}} 3.0' in metrics

    window = read_window(store)
    assert window.rows == 6
    # The id each response carried, generated ones included, for joining feedback later.
    assert window.request_ids == ["a"] + [answers[1][0]] * 3 + ["c"] * 2
    assert window.versions == ["5"] * 6
    assert np.array_equal(np.stack(window.inputs["image"]), np.concatenate(sent))
    logits = np.stack(window.outputs["logits"])
    assert logits.shape == (6, 10)
    assert np.allclose(logits[0], answers[0][1:]) and np.allclose(logits[1:4].ravel(), answers[1][1:])


@pytest.mark.local
def test_the_log_round_trips_through_s3(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    store = f"s3://{s3.buckets[1]}/payloads-{time.time_ns()}"
    log = PayloadLog(store, model="m", version="3", sample_rate=1.0, max_bytes=BIG)
    log.offer(
        {"x": np.arange(4, dtype=np.float32).reshape(2, 2), "t": texts(b"a", b"b")}, {"y": np.ones(2)}, "s3"
    )
    log.close()
    window = read_window(store)
    assert window.request_ids == ["s3", "s3"] and window.versions == ["3", "3"]
    assert window.inputs["x"][1].tolist() == [2.0, 3.0] and window.inputs["t"][1].tolist() == [b"b"]


@pytest.mark.unit
def test_a_request_lacking_a_tensor_keeps_its_flush(tmp_path: Path) -> None:
    """A V2 request may ask for a subset of the outputs: its rows are logged without the ones it did
    not get, and the other requests of the same flush are written whole."""
    log = logged(tmp_path)
    both = {"y": np.array([[10.0]], np.float32), "z": np.array([[7.0, 8.0]], np.float32)}
    log.offer({"x": np.array([[1.0, 2.0]], np.float32)}, both, "a")
    log.offer({"x": np.array([[3.0, 4.0]], np.float32)}, {"y": np.array([[20.0]], np.float32)}, "b")
    log.offer(
        {"x": np.array([[5.0, 6.0]], np.float32)}, {**both, "z": np.array([[9.0, 1.0]], np.float32)}, "c"
    )
    log.close()
    assert log.written_rows == 3 and log.dropped_rows == 0
    (file,) = tmp_path.glob("*.parquet")  # one flush
    assert pq.read_table(file).column("output.z").to_pylist() == [[7.0, 8.0], None, [9.0, 1.0]]
    window = read_window(tmp_path)
    assert window.request_ids == ["a", "b", "c"]
    assert [row.tolist() for row in window.inputs["x"]] == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert [row.tolist() for row in window.outputs["y"]] == [[10.0], [20.0], [10.0]]
    # The row that lacked it reads back empty.
    assert [row.tolist() for row in window.outputs["z"]] == [[7.0, 8.0], [], [9.0, 1.0]]


@pytest.mark.unit
def test_bytes_tensors_count_their_text_against_the_queue_bound(tmp_path: Path) -> None:
    """A BYTES tensor holds references to its texts: the bound counts the texts, so a slow store
    cannot grow a text model's server without limit."""
    log = logged(tmp_path, flush_rows=10**9, flush_s=3600, max_pending_bytes=1 << 20)
    big = texts(b"x" * (256 << 10))  # a 256 KiB text
    kept = [log.offer({"text": big}, {"y": np.zeros((1, 2), np.float32)}) for _ in range(10)]
    assert all(kept)  # sampled, then dropped for room
    assert log.dropped_rows == 7  # 3 texts fit in 1 MiB with their arrays, the 4th does not
    log.close()
    assert read_window(tmp_path).rows == 3


@pytest.mark.unit
def test_a_tensor_named_shape_round_trips(tmp_path: Path) -> None:
    log = logged(tmp_path)
    log.offer({"shape": np.array([[2, 3]], np.int64), "x": np.ones((1, 2), np.float32)}, {"y": np.ones(1)})
    log.close()
    window = read_window(tmp_path)
    assert sorted(window.inputs) == ["shape", "x"]
    assert window.inputs["shape"][0].tolist() == [2, 3]
