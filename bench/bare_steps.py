"""The five steps called one after another in one plain Python process (the baseline).

Usage: python bench/bare_steps.py <project_dir> <work_dir>. Prints one JSON line: wall seconds
of the whole process body (imports included) and each step's own seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()

from handoff.project import Project  # noqa: E402
from handoff.serving import local_server  # noqa: E402
from handoff.steps.deploy import deploy  # noqa: E402
from handoff.steps.evaluate import evaluate  # noqa: E402
from handoff.steps.export import export  # noqa: E402
from handoff.steps.register import register  # noqa: E402
from handoff.steps.train import train  # noqa: E402


def main(project: Path, work: Path) -> None:
    imported = time.perf_counter()
    trained = train(project, work / "checkpoint.pt")
    exported = export(project, work / "checkpoint.pt", work / "onnx")
    evaluated = evaluate(
        project, work / "onnx", report_dir=work / "report", training_run_id=trained.mlflow_run_id
    )
    registered = register(
        project,
        work / "onnx",
        json.loads(json.dumps(evaluated, default=vars)),
        trained.mlflow_run_id,
        work / "report",
    )
    deployed = deploy(project, registered.model_name, registered.version)
    total = time.perf_counter() - started
    local_server.stop(Project.load(project).state_dir)
    steps = {
        name: result.seconds
        for name, result in zip(
            ("train", "export", "evaluate", "register", "deploy"),
            (trained, exported, evaluated, registered, deployed),
            strict=True,
        )
    }
    print(json.dumps({"total_seconds": total, "import_seconds": imported - started, "steps": steps}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
