"""Benchmark: the model server (``python -m handoff.serving``) against what it replaces, in one run.

Five measurements on the default generated project's trained digits model (and a wide MLP where
weight bandwidth dominates), every HTTP side over keep-alive connections, every response checked
against bare ONNX Runtime's outputs for the same input so a broken side cannot look fast:

1. one-request latency, sequential: bare ``session.run`` in this process, the handoff server, a
   stock ``kserve.Model`` on KServe's ModelServer (bench/stock_kserve_server.py);
2. throughput at concurrency 8, the handoff server with batching on vs off, digits and wide MLP;
3. a 64 KiB input (digits at batch 256) as V2 JSON vs the V2 binary tensor extension, end to end
   (client encoding and decoding included);
4. the handoff server vs FastAPI + torch eager (bench/fastapi_torch_server.py) on one request,
   for the digits model and for a deep narrow MLP (bench/deep_model.py);
5. cold start: spawn to ``/v2/health/ready`` == 200;
6. the largest JSON request the server takes (just under its 16 MiB limit), alone and four at
   once: the server's peak memory over its body (beside what bare ONNX Runtime needs for the same
   batch), what it holds afterwards, and how long ``/v2/health/live`` takes meanwhile;
7. the payload log's cost: one-request latency of two handoff servers, one without the log and
   one sampling every request (``monitoring.sample_rate: 1.0``), requests alternating between
   them; the logging side's rows must all reach its store.

Usage: python bench/serving.py [--requests 500] [--repeats 3] [--seconds 4] [--workdir DIR]
[--only-payload-log] (``--workdir`` keeps the generated project, checkpoint and ONNX files for
the next run; ``--only-payload-log`` measures 7 alone).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HOST = "127.0.0.1"
DIGITS = "digits-classifier"
WIDE = "wide-mlp"
DEEP = "deep-mlp"  # bench/deep_model.py's NAME
WIDE_IN, WIDE_OUT = 512, 16
CONCURRENCY = 8
TOLERANCE = 1e-4  # torch eager vs ONNX Runtime, and batched vs one-by-one GEMMs
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


# --- the models under test ------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    project: Path  # the default generated project (model.py, contract.yaml)
    checkpoint: Path  # its trained weights, as the train step writes them
    digits_onnx: Path  # the export step's model.onnx
    wide_dir: Path  # contract.yaml of the wide MLP
    wide_onnx: Path
    deep_dir: Path  # contract.yaml and model.onnx of bench/deep_model.py


def prepare(work: Path, wide_hidden: int) -> Models:
    """Generate, train and export the default project once (reused from ``work`` when present)."""
    from cookiecutter.main import cookiecutter

    home = work / "cookiecutter-home"  # replay files stay out of $HOME
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(f"cookiecutters_dir: {home / 'dirs'}\nreplay_dir: {home / 'replay'}\n")
    os.environ["COOKIECUTTER_CONFIG"] = str(home / "config.yaml")
    project = work / "gen" / DIGITS
    if not project.exists():
        project = Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(work / "gen")))
    checkpoint, onnx_dir = work / "checkpoint.pt", work / "onnx"
    if not checkpoint.exists():
        from handoff.steps.train import train

        print("training the default project ...", flush=True)
        train(project, checkpoint)
    if not (onnx_dir / "model.onnx").exists():
        from handoff.steps.export import export

        export(project, checkpoint, onnx_dir)
    wide_dir = work / f"wide-{wide_hidden}"
    if not (wide_dir / "model.onnx").exists():
        export_wide(project, wide_dir, wide_hidden)
    deep_dir = work / "deep"
    if not (deep_dir / "model.onnx").exists():
        export_deep(project, deep_dir)
    return Models(project, checkpoint, onnx_dir / "model.onnx", wide_dir, wide_dir / "model.onnx", deep_dir)


def export_deep(project: Path, out: Path) -> None:
    """bench/deep_model.py exported with its own contract (x: [-1, 256] -> y: [-1, 16])."""
    import torch

    from handoff.contract import load_contract
    from handoff.steps.export import export_onnx

    sys.path.insert(0, str(BENCH))
    import deep_model

    out.mkdir(parents=True, exist_ok=True)
    contract = yaml.safe_load((project / "contract.yaml").read_text())
    contract["name"] = deep_model.NAME
    contract["inputs"] = [{"name": "x", "dtype": "float32", "shape": [-1, deep_model.WIDTH]}]
    contract["outputs"] = [{"name": "y", "dtype": "float32", "shape": [-1, deep_model.OUT]}]
    (out / "contract.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
    print("exporting the deep MLP ...", flush=True)
    export_onnx(
        deep_model.build(), load_contract(out), (torch.randn(2, deep_model.WIDTH),), out / "model.onnx"
    )


def export_wide(project: Path, out: Path, hidden: int) -> None:
    """A 3-layer MLP, ``hidden`` ** 2 weights in the middle: at batch 1 each request streams all of them."""
    import torch

    from handoff.contract import load_contract
    from handoff.steps.export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    contract = yaml.safe_load((project / "contract.yaml").read_text())
    contract["name"] = WIDE
    contract["inputs"] = [{"name": "x", "dtype": "float32", "shape": [-1, WIDE_IN]}]
    contract["outputs"] = [{"name": "y", "dtype": "float32", "shape": [-1, WIDE_OUT]}]
    contract["slo"]["max_model_size_mb"] = 4096
    (out / "contract.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDE_IN, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, WIDE_OUT),
    ).eval()
    print("exporting the wide MLP ...", flush=True)
    export_onnx(model, load_contract(out), (torch.randn(2, WIDE_IN),), out / "model.onnx")


# --- servers --------------------------------------------------------------------------------


LIVE: list[Server] = []  # started and not yet stopped: stopped on any exit, failed runs included


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    ready_seconds: float
    log: Path

    def stop(self) -> None:
        if self in LIVE:
            LIVE.remove(self)
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def ready(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def spawn(name: str, argv: Callable[[str], list[str]], logs: Path, *, pass_fd: bool) -> Server:
    """Start one server on a free port and time spawn to ready; ``argv`` gets the fd or the port."""
    from handoff.serving import local_server

    sock = local_server.bind(HOST, 0)
    port = sock.getsockname()[1]
    if not pass_fd:  # the server binds the port itself (KServe's ModelServer)
        sock.close()
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv(str(sock.fileno()) if pass_fd else str(port)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),) if pass_fd else (),
        )
    if pass_fd:
        sock.close()  # the child holds it now
    deadline = started + 120
    while not ready(port):
        if process.poll() is not None or time.perf_counter() > deadline:
            process.kill()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            sys.exit(f"server {name} did not get ready (exit code {process.poll()}):\n{tail}")
        time.sleep(0.01)
    server = Server(name, process, port, time.perf_counter() - started, log)
    LIVE.append(server)
    return server


def handoff_server(
    name: str,
    model_name: str,
    onnx: Path,
    contract_dir: Path,
    logs: Path,
    batching: dict | None = None,
    max_request_bytes: int = 64 * 1024 * 1024,
    payload_log: dict | None = None,
) -> Server:
    spec: dict[str, Any] = {
        "model_name": model_name,
        "onnx_path": str(onnx),
        "contract_dir": str(contract_dir),
        "host": HOST,
        "port": 0,
        "max_request_bytes": max_request_bytes,
    }
    if batching is not None:
        spec["batching"] = batching
    if payload_log is not None:
        spec["payload_log"] = payload_log
    path = logs / f"{name}.json"
    path.write_text(json.dumps(spec))
    return spawn(
        name, lambda fd: [sys.executable, "-m", "handoff.serving", str(path), fd], logs, pass_fd=True
    )


@contextmanager
def running(*servers: Server) -> Iterator[tuple[Server, ...]]:
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- the largest request --------------------------------------------------------------------

MAX_REQUEST = 16 * 1024 * 1024  # the server's default limit


def peak_rss(pid: int) -> int:
    """The process's resident high-water mark since ``reset_peak`` (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc: this measurement needs Linux")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def largest_body(rows_per_mib: int) -> tuple[np.ndarray, bytes]:
    """Digits images as V2 JSON (values as a Python client writes float32s), just under 16 MiB."""
    rng = np.random.default_rng(3)
    rows = rows_per_mib * 16
    while True:
        images = rng.random((rows, 1, 8, 8), dtype=np.float32)
        body = v2_json("image", images)
        if len(body) <= MAX_REQUEST:
            return images, body
        rows = int(rows * MAX_REQUEST / len(body) * 0.999)


def bare_peak(onnx: Path, images: np.ndarray, work: Path) -> int:
    """What bare ONNX Runtime's run of the same batch adds to a process's peak memory."""
    np.save(work / "largest.npy", images)
    code = (
        "import sys, numpy as np; from pathlib import Path\n"
        "from handoff.onnx_io import open_session\n"
        "s = open_session(Path(sys.argv[1])); x = np.load(sys.argv[2]); s.run(None, {'image': x[:1]})\n"
        "import os; pid = os.getpid(); Path(f'/proc/{pid}/clear_refs').write_text('5')\n"
        "hwm = lambda: int([l for l in open(f'/proc/{pid}/status') if l.startswith('VmHWM')][0].split()[1])\n"
        "before = hwm(); s.run(None, {'image': x}); print((hwm() - before) * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(onnx), str(work / "largest.npy")],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def under_load(port: int, pid: int, body: bytes, want: np.ndarray, at_once: int) -> dict[str, float]:
    """``at_once`` copies of ``body`` sent together while a probe asks ``/v2/health/live`` every 5 ms:
    the server's peak memory growth, what it holds after, the probe's slowest answer."""
    before = rss(pid)
    reset_peak(pid)
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        while not done.is_set():
            started = time.perf_counter()
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()
            probes.append((time.perf_counter() - started) * 1000)
            time.sleep(0.005)
        conn.close()

    errors: list[str] = []

    def send() -> None:
        client = Client(port, DIGITS)
        try:
            out, _ = client.infer(body)
            check("largest request", out, want)
        except BaseException as exc:  # noqa: BLE001 - reported below (check exits with SystemExit)
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    prober = threading.Thread(target=probe)
    prober.start()
    senders = [threading.Thread(target=send) for _ in range(at_once)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    done.set()
    prober.join()
    if errors:
        sys.exit(f"largest request: {errors[0]}")
    return {
        "growth": peak_rss(pid) - before,
        "after": rss(pid) - before,
        "probe_max_ms": max(probes),
        "probe_p50_ms": statistics.median(probes),
    }


# --- clients --------------------------------------------------------------------------------


def v2_json(name: str, array: np.ndarray) -> bytes:
    tensor = {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def v2_binary(name: str, array: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The V2 binary tensor extension: JSON header, then the raw bytes; binary outputs asked for."""
    raw = array.tobytes()
    tensor = {
        "name": name,
        "shape": list(array.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + raw, headers


JSON_HEADERS = {"Content-Type": "application/json"}


class Client:
    """One keep-alive connection; ``infer`` returns the first output as an array and whether the
    response carried it as binary data."""

    def __init__(self, port: int, model: str):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)
        self.path = f"/v2/models/{model}/infer"

    def infer(self, body: bytes, headers: dict[str, str] = JSON_HEADERS) -> tuple[np.ndarray, bool]:
        self.conn.request("POST", self.path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        header_length = response.getheader("inference-header-content-length")
        raw = b""
        if header_length is not None:
            data, raw = data[: int(header_length)], data[int(header_length) :]
        output = json.loads(data)["outputs"][0]
        dtype = DTYPES[output["datatype"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            return np.frombuffer(raw[:size], dtype=dtype).reshape(output["shape"]), True
        return np.asarray(output["data"], dtype=dtype).reshape(output["shape"]), False

    def close(self) -> None:
        self.conn.close()


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def requests_per_run(port: int) -> float | None:
    """Mean requests per model run so far, from the server's Prometheus metrics (None: not exported)."""
    text = scrape(port)
    found = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"handoff_batch_requests_{part}{{"):
                found[part] = float(line.rsplit(" ", 1)[1])
    return found["sum"] / found["count"] if found.get("count") else None


def check(side: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=TOLERANCE):
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
        sys.exit(f"{side}: wrong outputs (shape {got.shape} vs {want.shape}, max |diff| {diff:.3g})")


# --- measurements ---------------------------------------------------------------------------


@dataclass
class Samples:
    ms: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.ms, q))


def sequential(
    side: str, call: Callable[[], np.ndarray], want: np.ndarray, n: int, warmup: int
) -> list[float]:
    """``n`` timed calls one after another (after ``warmup``); every output is checked afterwards."""
    for _ in range(warmup):
        check(side, call(), want)
    times, outputs = [], []
    for _ in range(n):
        started = time.perf_counter()
        outputs.append(call())
        times.append((time.perf_counter() - started) * 1000)
    for out in outputs:
        check(side, out, want)
    return times


def concurrent(
    side: str, port: int, model: str, bodies: list[bytes], wants: list[np.ndarray], seconds: float
) -> tuple[float, list[float]]:
    """CONCURRENCY threads, each on its own keep-alive connection with its own input, for ``seconds``:
    (requests per second, latencies in ms). A batching server that mixed up rows fails the check."""
    barrier = threading.Barrier(CONCURRENCY + 1)
    latencies: list[list[float]] = [[] for _ in range(CONCURRENCY)]
    errors: list[str] = []
    stop_at = [0.0]

    def worker(index: int) -> None:
        client = Client(port, model)
        body, want = bodies[index % len(bodies)], wants[index % len(wants)]
        try:
            for _ in range(3):
                client.infer(body)
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                started = time.perf_counter()
                out, _ = client.infer(body)
                latencies[index].append((time.perf_counter() - started) * 1000)
                if out.shape != want.shape or not np.allclose(out, want, rtol=0, atol=TOLERANCE):
                    errors.append(f"{side}: thread {index} got another input's outputs or wrong ones")
                    return
        except Exception as exc:  # noqa: BLE001 - reported below, the run fails
            errors.append(f"{side}: thread {index}: {type(exc).__name__}: {exc}")
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + 3600
    with suppress(threading.BrokenBarrierError):
        barrier.wait()
    started = time.perf_counter()
    stop_at[0] = started + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        sys.exit("\n".join(errors))
    flat = [ms for per in latencies for ms in per]
    return len(flat) / elapsed, flat


def alternating(
    calls: dict[str, Callable[[], np.ndarray]], want: np.ndarray, n: int, warmup: int
) -> dict[str, list[float]]:
    """``n`` timed calls of each side, the sides taking turns call by call (the first side changes
    every call), so both see the same moments of a noisy machine; outputs checked afterwards."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            check(name, calls[name](), want)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: list[tuple[str, np.ndarray]] = []
    for i in range(n):
        for name in rotated(names, i):
            started = time.perf_counter()
            outputs.append((name, calls[name]()))
            times[name].append((time.perf_counter() - started) * 1000)
    for name, out in outputs:
        check(name, out, want)
    return times


def payload_log_cost(
    models: Models, logs: Path, body: bytes, want: np.ndarray, n: int, repeats: int, warmup: int
) -> tuple[dict[str, Samples], dict[str, float], int]:
    """7: one request at a time to a server without the payload log and to one sampling every
    request: latencies per side, the logging server's payload-log counters, and rows in its store."""
    from handoff.payload_log import read_window

    store = logs / "payloads"
    shutil.rmtree(store, ignore_errors=True)
    plain = handoff_server("payload-log-off", DIGITS, models.digits_onnx, models.project, logs)
    logging_ = handoff_server(
        "payload-log-on",
        DIGITS,
        models.digits_onnx,
        models.project,
        logs,
        payload_log={"sample_rate": 1.0, "max_bytes": 256 * 1024 * 1024, "store": str(store)},
    )
    samples = {"off": Samples(), "sample_rate 1.0": Samples()}
    with running(plain, logging_):
        clients = {"off": Client(plain.port, DIGITS), "sample_rate 1.0": Client(logging_.port, DIGITS)}
        calls = {name: (lambda c=c: c.infer(body)[0]) for name, c in clients.items()}
        for i in range(repeats):
            for name, ms in alternating(calls, want, n, warmup if i == 0 else 0).items():
                samples[name].ms += ms
        for client in clients.values():
            client.close()
        counters = {
            name: float(line.rsplit(" ", 1)[1])
            for line in scrape(logging_.port).splitlines()
            for name in ("handoff_payload_log_rows_total", "handoff_payload_log_dropped_total")
            if line.startswith(name + "{")
        }
    # Stopped gracefully: the server wrote its last rows on the way out.
    return samples, counters, read_window(store).rows


def rotated(items: list[Any], i: int) -> list[Any]:
    return items[i % len(items) :] + items[: i % len(items)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500, help="sequential requests per side and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, sides in rotating order")
    parser.add_argument("--seconds", type=float, default=4.0, help="per concurrency run")
    parser.add_argument("--max-batch-size", type=int, default=64, help="batching on (the server's default)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="batching on (the server's default)")
    parser.add_argument("--wide-hidden", type=int, default=8192, help="the wide MLP's hidden width")
    parser.add_argument("--workdir", type=Path, default=None, help="keep project and models here")
    parser.add_argument("--only-payload-log", action="store_true", help="measure the payload log alone (7)")
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serving-")))
        else:
            work = args.workdir.resolve()
        stack.callback(lambda: [server.stop() for server in list(LIVE)])  # before the folder goes
        run(args, work)


def run(args: argparse.Namespace, work: Path) -> None:
    import onnxruntime  # noqa: F401 - imported before timing anything

    from handoff.onnx_io import open_session

    models = prepare(work, args.wide_hidden)
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    warmup = max(20, args.requests // 10)
    verdicts: list[str] = []

    digits_session = open_session(models.digits_onnx)
    example = json.loads((models.digits_onnx.parent / "example.json").read_text())
    one = np.asarray(example["inputs"][0]["data"], dtype=np.float32).reshape(-1, 1, 8, 8)[:1]
    one_want = digits_session.run(["logits"], {"image": one})[0]
    one_body = v2_json("image", one)

    # 7: the payload log's cost on one request -------------------------------------------------------
    print("payload log off vs on ...", flush=True)
    payload, payload_counters, payload_rows = payload_log_cost(
        models, logs, one_body, one_want, args.requests, args.repeats, warmup
    )
    sent = args.requests * args.repeats + warmup
    payload_verdict = payload_log_verdict(payload, payload_counters, payload_rows, sent)
    if args.only_payload_log:
        report_payload_log(payload, payload_counters, payload_rows)
        print(f"\n- {payload_verdict}")
        return

    # 1 + 4 + 5: sequential latency of one request, and each server's first start --------------
    print("starting servers ...", flush=True)
    ours = handoff_server("handoff", DIGITS, models.digits_onnx, models.project, logs)
    stock = spawn(
        "stock-kserve",
        lambda port: [
            sys.executable,
            str(BENCH / "stock_kserve_server.py"),
            str(models.digits_onnx),
            DIGITS,
            port,
        ],
        logs,
        pass_fd=False,
    )
    eager = spawn(
        "fastapi-torch",
        lambda port: [
            sys.executable,
            str(BENCH / "fastapi_torch_server.py"),
            str(models.project),
            str(models.checkpoint),
            port,
        ],
        logs,
        pass_fd=False,
    )
    first_start = {s.name: s.ready_seconds for s in (ours, stock, eager)}
    latency = {name: Samples() for name in ("onnxruntime", "handoff", "stock-kserve", "fastapi-torch")}
    with running(ours, stock, eager):
        clients = {s.name: Client(s.port, DIGITS) for s in (ours, stock, eager)}
        calls: dict[str, Callable[[], np.ndarray]] = {
            "onnxruntime": lambda: digits_session.run(["logits"], {"image": one})[0],
            **{name: (lambda c=c: c.infer(one_body)[0]) for name, c in clients.items()},
        }
        for i in range(args.repeats):
            for name in rotated(list(calls), i):
                latency[name].ms += sequential(name, calls[name], one_want, args.requests, warmup)
            print(f"  latency round {i + 1}/{args.repeats} done", flush=True)
        for client in clients.values():
            client.close()

    # 4, deep MLP: the same comparison where the model has many small operators -------------------
    deep_onnx = models.deep_dir / "model.onnx"
    deep_session = open_session(deep_onnx)
    deep_x = np.random.default_rng(2).standard_normal((1, 256), dtype=np.float32)
    deep_want = deep_session.run(["y"], {"x": deep_x})[0]
    deep_body = v2_json("x", deep_x)
    deep_ours = handoff_server("handoff-deep", DEEP, deep_onnx, models.deep_dir, logs)
    deep_eager = spawn(
        "fastapi-torch-deep",
        lambda port: [sys.executable, str(BENCH / "fastapi_torch_server.py"), "--deep", port],
        logs,
        pass_fd=False,
    )
    deep = {name: Samples() for name in ("onnxruntime", "handoff", "fastapi-torch")}
    with running(deep_ours, deep_eager):
        deep_clients = {
            "handoff": Client(deep_ours.port, DEEP),
            "fastapi-torch": Client(deep_eager.port, DEEP),
        }
        deep_calls: dict[str, Callable[[], np.ndarray]] = {
            "onnxruntime": lambda: deep_session.run(["y"], {"x": deep_x})[0],
            **{name: (lambda c=c: c.infer(deep_body)[0]) for name, c in deep_clients.items()},
        }
        for i in range(args.repeats):
            for name in rotated(list(deep_calls), i):
                deep[name].ms += sequential(
                    f"{name} deep", deep_calls[name], deep_want, args.requests, warmup
                )
        for client in deep_clients.values():
            client.close()
    print("  deep MLP done", flush=True)

    # 5: cold start of the handoff server, again ------------------------------------------------
    cold = [first_start["handoff"]]
    for i in range(args.repeats + 1):  # a few more than the repeats: starts are cheap
        server = handoff_server(f"handoff-cold-{i}", DIGITS, models.digits_onnx, models.project, logs)
        cold.append(server.ready_seconds)
        server.stop()

    # 3: 64 KiB input, JSON vs binary -------------------------------------------------------------
    big = np.random.default_rng(0).random((256, 1, 8, 8), dtype=np.float32)
    big_want = digits_session.run(["logits"], {"image": big})[0]
    wire = {"json": Samples(), "binary": Samples()}
    binary_answered = False
    big_n = max(20, args.requests // 5)
    ours = handoff_server("handoff-wire", DIGITS, models.digits_onnx, models.project, logs)
    with running(ours):
        client = Client(ours.port, DIGITS)

        def as_json() -> np.ndarray:
            return client.infer(v2_json("image", big))[0]

        def as_binary() -> np.ndarray:
            nonlocal binary_answered
            out, binary_answered = client.infer(*v2_binary("image", big))
            return out

        for i in range(args.repeats):
            for name, call in rotated([("json", as_json), ("binary", as_binary)], i):
                wire[name].ms += sequential(f"{name} batch 256", call, big_want, big_n, 5)
        json_out, binary_out = as_json(), as_binary()
        sizes = {"json": len(v2_json("image", big)), "binary": len(v2_binary("image", big)[0])}
        identical = bool(np.array_equal(json_out, binary_out))
        client.close()
    print("  JSON vs binary done", flush=True)

    # 6: the largest JSON request, alone and four at once ------------------------------------------
    largest, largest_body_bytes = largest_body(rows_per_mib=1300)
    largest_want = digits_session.run(["logits"], {"image": largest})[0]
    bare_growth = bare_peak(models.digits_onnx, largest, work)
    largest_runs: dict[str, dict[str, float]] = {}
    ours = handoff_server(
        "handoff-largest", DIGITS, models.digits_onnx, models.project, logs, max_request_bytes=MAX_REQUEST
    )
    with running(ours):
        pid = ours.process.pid
        for label, at_once in (("first", 1), ("again", 1), ("four at once", 4)):
            largest_runs[label] = under_load(ours.port, pid, largest_body_bytes, largest_want, at_once)
    print("  largest request done", flush=True)

    # 2: concurrency 8, batching off vs on -------------------------------------------------------
    rng = np.random.default_rng(1)
    wide_session = open_session(models.wide_onnx)
    loads = {
        DIGITS: (
            models.digits_onnx,
            models.project,
            "image",
            rng.random((CONCURRENCY, 1, 1, 8, 8), dtype=np.float32),
        ),
        WIDE: (
            models.wide_onnx,
            models.wide_dir,
            "x",
            rng.standard_normal((CONCURRENCY, 1, WIDE_IN), dtype=np.float32),
        ),
    }
    sessions = {DIGITS: (digits_session, "logits"), WIDE: (wide_session, "y")}
    modes = {
        "off": {"max_batch_size": 1, "max_wait_ms": 0.0},
        "on": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms},
    }
    throughput: dict[tuple[str, str], list[float]] = {}
    loaded: dict[tuple[str, str], Samples] = {}
    per_run: dict[tuple[str, str], float | None] = {}
    for model, (onnx, contract_dir, input_name, inputs) in loads.items():
        session, output_name = sessions[model]
        wants = [session.run([output_name], {input_name: x})[0] for x in inputs]
        bodies = [v2_json(input_name, x) for x in inputs]
        servers = {
            mode: handoff_server(f"{model}-batching-{mode}", model, onnx, contract_dir, logs, batching)
            for mode, batching in modes.items()
        }
        with running(*servers.values()):
            for i in range(args.repeats):
                for mode in rotated(list(modes), i):
                    rps, ms = concurrent(
                        f"{model} batching {mode}", servers[mode].port, model, bodies, wants, args.seconds
                    )
                    throughput.setdefault((model, mode), []).append(rps)
                    loaded.setdefault((model, mode), Samples()).ms.extend(ms)
            for mode, server in servers.items():
                per_run[(model, mode)] = requests_per_run(server.port)
        print(f"  concurrency {CONCURRENCY} on {model} done", flush=True)

    # report ---------------------------------------------------------------------------------------
    print(
        f"\nrequests: {args.requests} x {args.repeats} per side (sequential), {args.seconds:g} s x "
        f"{args.repeats} per concurrency run; {os.cpu_count()} CPUs\n"
    )
    print("| measurement | side | p50 (ms) | p99 (ms) | other |")
    print("|---|---|---|---|---|")
    for name, samples in latency.items():
        print(f"| one request, digits | {name} | {samples.pct(50):.3f} | {samples.pct(99):.3f} | |")
    for name, samples in deep.items():
        print(f"| one request, deep MLP | {name} | {samples.pct(50):.3f} | {samples.pct(99):.3f} | |")
    for name, samples in wire.items():
        print(
            f"| 64 KiB input (batch 256) | {name} | {samples.pct(50):.2f} | {samples.pct(99):.2f} | "
            f"request body {sizes[name]:,} bytes |"
        )
    for (model, mode), samples in loaded.items():
        rps = statistics.median(throughput[(model, mode)])
        mean = per_run[(model, mode)]
        batches = "n/a" if mean is None else f"{mean:.1f}"
        print(
            f"| concurrency {CONCURRENCY}, {model} | batching {mode} | {samples.pct(50):.2f} | "
            f"{samples.pct(99):.2f} | {rps:,.0f} req/s, {batches} requests per model run |"
        )
    mib = 1024 * 1024
    for label, measured in largest_runs.items():
        print(
            f"| largest JSON request ({len(largest_body_bytes) / mib:.1f} MiB, batch {len(largest)}), "
            f"{label} | handoff | | | peak +{measured['growth'] / mib:.0f} MiB, "
            f"held after +{measured['after'] / mib:.0f} MiB, "
            f"/v2/health/live max {measured['probe_max_ms']:.1f} ms (p50 {measured['probe_p50_ms']:.1f}) |"
        )
    print(
        f"| largest JSON request, same batch | onnxruntime | | | peak +{bare_growth / mib:.0f} MiB "
        "(the model's own run: activations) |"
    )
    report_payload_log(payload, payload_counters, payload_rows, header=False)
    for name, seconds in first_start.items():
        extra = (
            f"median of {len(cold)}: {statistics.median(cold):.2f} s" if name == "handoff" else "one start"
        )
        print(f"| cold start to ready | {name} | | | {seconds:.2f} s ({extra}) |")

    p50 = {name: s.pct(50) for name, s in latency.items()}
    p99 = {name: s.pct(99) for name, s in latency.items()}
    overhead = p50["handoff"] - p50["onnxruntime"]
    verdicts.append(
        f"serving overhead p50 over bare session.run: {overhead:.3f} ms (target <= 0.5 ms): "
        f"{'met' if overhead <= 0.5 else 'NOT met'}"
    )
    vs_stock = p50["handoff"] / p50["stock-kserve"]
    verdicts.append(
        f"handoff vs stock kserve: p50 {vs_stock:.2f}x, p99 {p99['handoff'] / p99['stock-kserve']:.2f}x "
        f"of stock (target <= 1.00x, no worse): {'met' if vs_stock <= 1 else 'NOT met'}"
    )
    for model in loads:
        on, off = (statistics.median(throughput[(model, m)]) for m in ("on", "off"))
        verdicts.append(
            f"batching on / off, {model}: {on / off:.2f}x throughput, p99 "
            f"{loaded[(model, 'on')].pct(99):.1f} vs {loaded[(model, 'off')].pct(99):.1f} ms "
            f"(target >= 2x): {'met' if on / off >= 2 else 'NOT met'}"
        )
    speedup = wire["json"].pct(50) / wire["binary"].pct(50)
    verdicts.append(
        f"binary vs JSON, 64 KiB: {speedup:.2f}x faster p50 (target >= 2x): "
        f"{'met' if speedup >= 2 else 'NOT met'}; outputs {'identical' if identical else 'DIFFER'}; "
        f"response {'binary' if binary_answered else 'JSON (binary outputs not honoured)'}"
    )
    for label, results in (("digits", latency), ("deep MLP", deep)):
        eager_ratio = results["fastapi-torch"].pct(50) / results["handoff"].pct(50)
        verdicts.append(
            f"fastapi + torch eager p50 / handoff p50, {label}: {eager_ratio:.2f}x (target >= 1.5x): "
            f"{'met' if eager_ratio >= 1.5 else 'NOT met'}"
        )
    again = largest_runs["again"]
    own = (again["growth"] - bare_growth) / len(largest_body_bytes)
    verdicts.append(
        f"largest JSON request: peak {again['growth'] / len(largest_body_bytes):.2f}x its body, of which "
        f"the server's own (beyond bare ONNX Runtime's run of the batch) {own:.2f}x (target <= 4x): "
        f"{'met' if own <= 4 else 'NOT met'}"
    )
    probe_max = max(run["probe_max_ms"] for run in largest_runs.values())
    verdicts.append(
        f"/v2/health/live during the largest requests: slowest {probe_max:.1f} ms (target <= 100 ms): "
        f"{'met' if probe_max <= 100 else 'NOT met'}"
    )
    median_cold = statistics.median(cold)
    verdicts.append(
        f"cold start to ready, median of {len(cold)}: {median_cold:.2f} s (target <= 3 s): "
        f"{'met' if median_cold <= 3 else 'NOT met'}"
    )
    verdicts.append(payload_verdict)
    print()
    for line in verdicts:
        print(f"- {line}")


def report_payload_log(
    samples: dict[str, Samples], counters: dict[str, float], rows: int, header: bool = True
) -> None:
    if header:
        print("| measurement | side | p50 (ms) | p99 (ms) | other |")
        print("|---|---|---|---|---|")
    for name, side in samples.items():
        other = (
            f"{rows:,} rows in the store, {counters.get('handoff_payload_log_dropped_total', 0):.0f} dropped"
            if name != "off"
            else ""
        )
        print(f"| one request, payload log | {name} | {side.pct(50):.3f} | {side.pct(99):.3f} | {other} |")


def payload_log_verdict(samples: dict[str, Samples], counters: dict[str, float], rows: int, sent: int) -> str:
    off, on = samples["off"].pct(50), samples["sample_rate 1.0"].pct(50)
    cost = on / off - 1
    complete = rows == sent and counters.get("handoff_payload_log_dropped_total", 0) == 0
    return (
        f"payload log at sample_rate 1.0: p50 {on:.3f} vs {off:.3f} ms off, {cost:+.1%} "
        f"(target < +10%): {'met' if cost < 0.10 else 'NOT met'}; "
        f"{rows} of {sent} requests in the store{'' if complete else ' (INCOMPLETE)'}"
    )


if __name__ == "__main__":
    main()
