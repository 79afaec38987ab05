"""Benchmark: the local kfp.local pipeline vs the same five steps in one plain Python process.

Both run on fresh copies of the default generated project (own registry, free port), in
alternating order, ``--repeats`` times each; medians are compared. Reports the ratio and the
overhead per step. Usage: python bench/pipeline_overhead.py [--repeats 3] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from cookiecutter.main import cookiecutter

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = ("train", "export", "evaluate", "register", "deploy")


def fresh_project(template_copy: Path, where: Path, epochs: int | None) -> Path:
    project = Path(shutil.copytree(template_copy, where))
    settings = yaml.safe_load((project / "handoff.yaml").read_text())
    settings["serving"]["port"] = 0
    if epochs:
        settings["training"]["overrides"] = {"epochs": epochs}
    (project / "handoff.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return project


def run_pipeline(project: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "handoff"), "run", "--local"], cwd=project, capture_output=True, text=True
    )
    total = time.perf_counter() - started
    subprocess.run([str(BIN / "handoff"), "stop"], cwd=project, capture_output=True, check=True)
    if result.returncode:
        sys.exit(f"pipeline failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    summary = json.loads((project / "runs" / "latest" / "summary.json").read_text())
    return {"total_seconds": total, "steps": summary["step_seconds"]}


def run_bare(project: Path) -> dict:
    work = project / "bare"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bare_steps.py"), str(project), str(work)],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"bare run failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--epochs", type=int, default=None, help="override Config.epochs (default: model.py's)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        base = Path(tmp)
        template_copy = Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(base / "gen")))
        runs: dict[str, list[dict]] = {"bare": [], "pipeline": []}
        for i in range(args.repeats):
            order = ("bare", "pipeline") if i % 2 == 0 else ("pipeline", "bare")
            for kind in order:
                project = fresh_project(template_copy, base / f"{kind}-{i}", args.epochs)
                runs[kind].append((run_bare if kind == "bare" else run_pipeline)(project))
                print(f"  {kind:<8} run {i + 1}: {runs[kind][-1]['total_seconds']:.2f} s", flush=True)

    def median(kind: str, key: str | None = None) -> float:
        values = [r["total_seconds"] if key is None else r["steps"][key] for r in runs[kind]]
        return statistics.median(values)

    bare, pipe = median("bare"), median("pipeline")
    print(f"\nepochs: {args.epochs or 'model.py default'}, repeats: {args.repeats} (medians)\n")
    print("| step | bare (s) | pipeline (s) |")
    print("|---|---|---|")
    for step in STEPS:
        print(f"| {step} | {median('bare', step):.2f} | {median('pipeline', step):.2f} |")
    print(f"| **wall, whole run** | **{bare:.2f}** | **{pipe:.2f}** |")
    print(
        f"\nratio pipeline / bare: {pipe / bare:.2f}x; overhead {pipe - bare:.2f} s in all, "
        f"{(pipe - bare) / len(STEPS):.2f} s per step"
    )


if __name__ == "__main__":
    main()
