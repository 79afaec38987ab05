"""Benchmark: what the local A/B router (``handoff ab start``) adds to a request, in one run.

The default generated project with two registered versions (untrained weights of two seeds:
the model's cost is the same, which is what a router comparison needs), v1 deployed, then an A/B
test of v2 against it. Sequential one-row requests over keep-alive connections, in alternating
rounds:

- **direct**: straight to the champion arm's model server (its private loopback port);
- **router**: the project's port, through the router, which hashes the request's key, forwards
  it to an arm over a pooled connection and adds the arm and version headers.

Every answer is checked (status 200, the version the arm header names). Reports p50/p99 per side
and the ratios router / direct.

Usage: python bench/ab_router.py [--requests 1000] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from cookiecutter.main import cookiecutter

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits-classifier"
EVALUATION = {
    "gate": {"passed": True, "reasons": [], "checks": []},
    "metrics": {"accuracy": 0.99},
    "latency_p50_ms": 1.0,
    "latency_p99_ms": 2.0,
    "champion": None,
}


def project_with_two_versions(work: Path) -> Path:
    from handoff.checkpoints import save_checkpoint
    from handoff.project import Project
    from handoff.steps.export import export
    from handoff.steps.register import register
    from handoff.tracking import CHAMPION, use_tracking

    project_dir = Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(work / "gen")))
    text = (project_dir / "handoff.yaml").read_text().replace("port: 8080", "port: 0", 1)
    (project_dir / "handoff.yaml").write_text(text)
    project = Project.load(project_dir)
    cfg = project.config()
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = project.hooks.build_model(cfg)
        checkpoint = work / f"seed-{seed}.pt"
        save_checkpoint(checkpoint, {"model": model.state_dict(), "config": dataclasses.asdict(cfg)})
        export(project_dir, checkpoint, work / f"export-{seed}")
        register(project_dir, work / f"export-{seed}", EVALUATION)
    use_tracking(project).set_registered_model_alias(MODEL, CHAMPION, "1")
    return project_dir


def timed(url: str, body: bytes, requests: int) -> list[float]:
    """Milliseconds per request, sequential on one keep-alive connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    seconds = []
    for i in range(requests):
        started = time.perf_counter()
        conn.request("POST", f"/v2/models/{MODEL}/infer", body.replace(b"ID", str(i).encode()), headers)
        answer = conn.getresponse()
        data = answer.read()
        seconds.append((time.perf_counter() - started) * 1000)
        assert answer.status == 200, data
        arm = answer.getheader("x-handoff-ab-arm")
        expected = {"champion": "1", "challenger": "2", None: "1"}[arm]
        assert json.loads(data)["model_version"] == expected
    conn.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from handoff import ab
    from handoff.deployment import deploy_locally

    project = project_with_two_versions(work)
    try:
        deploy_locally(project, MODEL, "1")
        started = ab.start(project, "2")
        assert started.arms
        direct_url = started.arms["champion"]["url"]
        image = np.random.default_rng(0).random(64).round(4).tolist()
        tensor = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image}
        body = json.dumps({"id": "req-ID", "inputs": [tensor]}).encode()
        timed(direct_url, body, 100), timed(started.url, body, 100)  # warm-up
        sides: dict[str, list[float]] = {"direct": [], "router": []}
        for _ in range(args.rounds):
            sides["direct"] += timed(direct_url, body, args.requests)
            sides["router"] += timed(started.url, body, args.requests)
        quantiles = {side: np.quantile(values, [0.5, 0.99]) for side, values in sides.items()}
        print(f"{'side':<8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for side, (p50, p99) in quantiles.items():
            print(f"{side:<8} {p50:8.3f} {p99:8.3f} {statistics.fmean(sides[side]):8.3f}")
        p50 = quantiles["router"][0] / quantiles["direct"][0]
        p99 = quantiles["router"][1] / quantiles["direct"][1]
        print(
            f"router / direct: p50 {p50:.2f}x, p99 {p99:.2f}x "
            f"({args.rounds} x {args.requests} requests a side)"
        )
    finally:
        from handoff.project import Project
        from handoff.serving import local_server

        loaded = Project.load(project)
        local_server.stop(loaded.state_dir)
        ab.stop_servers(loaded)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
