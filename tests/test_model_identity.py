"""A registered version is one model under one contract, and champion means "served":

* the ONNX bytes depend only on weights, graph and contract, not on the process that exported
  them (a module class defined in model.py included), so the sha256 identifies the model;
* a contract edit makes a new version of the same bytes, and deploy enforces the contract of the
  working tree it runs from, saying when it differs from the version's;
* a promotion whose deploy fails its checks is undone: champion goes back to the version it
  replaced (or is removed when there was none), so it never points at a version that never served.

Real parts: the exporter in separate processes, MLflow on sqlite, the KServe model server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from handoff.cli import app
from handoff.errors import HandoffError
from handoff.files import sha256_of
from handoff.project import Project
from handoff.registry import PROMOTION_TAG, SERVED_TAG
from handoff.serving import local_server
from handoff.steps.register import register
from handoff.tracking import CHAMPION, alias_version, use_tracking

from .conftest import edit_yaml, mlflow_state_restored, replace_in
from .test_triton_layout import EVALUATION, MODEL, _export

pytestmark = pytest.mark.local

# A module class of model.py's own (the default example's nn.Sequential hides the module's name).
OWN_CLASS = '''

class Net(nn.Module):
    """The default CNN as a class of this file."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.body = _sequential(cfg)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


def build_model(cfg: Config) -> nn.Module:
    return Net(cfg)
'''

EXPORT_SCRIPT = """
import sys, torch
from pathlib import Path
from handoff.project import Project
from handoff.contract_examples import example_arrays
from handoff.onnx_export import export_onnx
project = Project.load(Path(sys.argv[1]))
cfg = project.config()
torch.manual_seed(0)
model = project.hooks.build_model(cfg).eval()
export_onnx(model, project.contract, example_arrays(project, cfg), Path(sys.argv[2]))
"""


def test_a_model_class_of_model_py_exports_to_the_same_bytes_in_every_process(
    project: Path, tmp_path: Path
) -> None:
    replace_in(project / "model.py", "def build_model(cfg: Config) -> nn.Module:", "def _sequential(cfg):")
    with (project / "model.py").open("a") as source:
        source.write(OWN_CLASS)
    shas = []
    for seed in ("1", "2"):  # str hashes differ between these two processes
        out = tmp_path / f"hashseed-{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", EXPORT_SCRIPT, str(project), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        shas.append(sha256_of(out))
    assert shas[0] == shas[1]


@pytest.fixture
def registered(default_project: Path, tmp_path: Path) -> Iterator[Path]:
    """A project (serving on a free port, a latency SLO the machine meets) with two exports."""
    with mlflow_state_restored():
        project_dir = Path(shutil.copytree(default_project, tmp_path / MODEL))
        edit_yaml(project_dir / "handoff.yaml", lambda s: s["serving"].update(port=0))
        replace_in(project_dir / "contract.yaml", "latency_p99_ms: 25", "latency_p99_ms: 250")
        loaded = Project.load(project_dir)
        for seed in (0, 1):
            _export(loaded, seed, tmp_path / f"export-{seed}")
        yield project_dir
        local_server.stop(loaded.state_dir)


def champion(project: Path) -> str | None:
    return alias_version(use_tracking(Project.load(project)), MODEL, CHAMPION)


def deploy(project: Path, version: str, *flags: str) -> tuple[int, str, str]:
    """``handoff deploy --local`` in this process: exit code, stderr notes and the error line."""
    result = CliRunner().invoke(
        app, ["deploy", "--local", "--version", version, "--project", str(project), *flags]
    )
    error = f"error: {result.exception}" if isinstance(result.exception, HandoffError) else ""
    return (1 if error else result.exit_code), result.stderr, error or result.stdout


def test_a_contract_edit_makes_a_new_version_of_the_same_model(registered: Path) -> None:
    export = registered.parent / "export-0"
    assert register(registered, export, EVALUATION).version == "1"
    # Comments and layout are not the contract: the same version.
    text = (registered / "contract.yaml").read_text()
    (registered / "contract.yaml").write_text("# reviewed\n" + text.replace(": ", ":  ", 1))
    assert register(registered, export, EVALUATION).version == "1"
    replace_in(registered / "contract.yaml", "latency_p99_ms: 250", "latency_p99_ms: 100")
    second = register(registered, export, EVALUATION)
    assert second.version == "2" and second.onnx_sha256 == sha256_of(export / "model.onnx")
    assert register(registered, export, EVALUATION).version == "2"  # retry-safe under the new contract
    client = use_tracking(Project.load(registered))
    tags = [client.get_model_version(MODEL, v).tags for v in ("1", "2")]
    assert tags[0]["handoff.contract_sha256"] != tags[1]["handoff.contract_sha256"]


def test_deploy_enforces_the_working_tree_contract_and_says_when_it_differs(registered: Path) -> None:
    register(registered, registered.parent / "export-0", EVALUATION)  # v1 under latency 250
    replace_in(registered / "contract.yaml", "latency_p99_ms: 250", "latency_p99_ms: 0.001")
    code, notes, error = deploy(registered, "1")
    assert code == 1
    assert "exceeds slo.latency_p99_ms 0.001" in error
    assert "contract.yaml, which differs from the one v1 was registered with" in notes
    assert "slo.latency_p99_ms: 250 -> 0.001" in notes
    replace_in(registered / "contract.yaml", "latency_p99_ms: 0.001", "latency_p99_ms: 300")
    code, notes, out = deploy(registered, "1")
    assert code == 0, out[-2000:]
    assert "slo.latency_p99_ms: 250 -> 300" in notes and json.loads(out)["version"] == "1"
    # An interface the version was not exported for is refused before anything changes.
    edit_yaml(registered / "contract.yaml", lambda c: c["outputs"][0].update(name="scores"))
    code, _, error = deploy(registered, "1")
    assert code == 1
    assert "outputs[0].name: logits -> scores" in error and "export and register the model again" in error
    serving = local_server.current(Project.load(registered).state_dir)
    assert serving is not None and serving.version == "1"


def test_a_promotion_whose_deploy_fails_is_undone(registered: Path) -> None:
    client = use_tracking(Project.load(registered))
    first = register(registered, registered.parent / "export-0", EVALUATION)
    code, _, out = deploy(registered, "1", "--champion-only")
    assert code == 0, out[-2000:]
    assert client.get_model_version(MODEL, "1").tags[SERVED_TAG].startswith("local ")
    second = register(
        registered, registered.parent / "export-1", {**EVALUATION, "champion": {"version": "1"}}
    )
    assert (first.promoted, second.promoted, champion(registered)) == (True, True, "2")
    replace_in(registered / "contract.yaml", "latency_p99_ms: 250", "latency_p99_ms: 0.001")
    code, _, error = deploy(registered, "2", "--champion-only")
    assert code == 1 and "did not pass its checks before taking over" in error
    assert "champion moved back to v1, which it replaced" in error
    assert champion(registered) == "1"
    tags = client.get_model_version(MODEL, "2").tags
    assert tags[PROMOTION_TAG].startswith("promotion undone: its deploy failed")
    assert SERVED_TAG not in tags
    serving = local_server.current(Project.load(registered).state_dir)
    assert serving is not None and serving.version == "1"
    # A champion that has served is not demoted by a later failing redeploy: it is what serves.
    code, _, error = deploy(registered, "1", "--champion-only")
    assert code == 1 and "champion moved back" not in error and champion(registered) == "1"


def test_a_first_champion_whose_deploy_fails_is_no_champion(registered: Path) -> None:
    replace_in(registered / "contract.yaml", "latency_p99_ms: 250", "latency_p99_ms: 0.001")
    assert register(registered, registered.parent / "export-0", EVALUATION).promoted
    code, _, error = deploy(registered, "1", "--champion-only")
    assert code == 1 and "champion removed: v1 was the first champion and never served" in error
    assert champion(registered) is None
    assert local_server.current(Project.load(registered).state_dir) is None
