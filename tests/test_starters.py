"""The starters (`starter` prompt): each generates its own model.py, contract, card and seeded
tests, passes `handoff check` and its own tests, and two of them run the whole local pipeline.

image-classification is the default project, whose pipeline the rest of the suite runs
(tests/test_pipeline_local.py); here it gets the same check and tests as the other two. The
seeded tests are one file for every starter: they test model.py through the hooks contract and
contract.yaml, so a researcher's own architecture keeps passing them.

Cost on two cores (measured): 20-30 s per starter for `handoff check` plus its tests, 13 s for
the swapped architecture, 20-25 s per pipeline run; about 140 s the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from handoff.errors import HandoffError
from handoff.model_card import check_model_card, project_card_problems

from .conftest import edit_yaml, generate, handoff, mlflow_state_restored, project_tests, replace_in

pytestmark = [pytest.mark.bake, pytest.mark.slow]

STARTERS = ("image-classification", "text-classification", "tabular-regression")
# What each starter's contract declares: the task, then each input's name, dtype and shape.
CONTRACTS = {
    "image-classification": ("classification", [("image", "float32", [-1, 1, 8, 8])]),
    "text-classification": ("classification", [("tokens", "int64", [-1, -1])]),
    "tabular-regression": ("regression", [("features", "float32", [-1, 10])]),
}
SLUGS = {
    "image-classification": "digits-classifier",
    "text-classification": "review-sentiment",
    "tabular-regression": "diabetes-progression",
}
STARTER_SECTIONS = (
    "Intended use",
    "Training data",
    "Evaluation data",
    "Limitations",
    "Ethical considerations",
)


@pytest.fixture(scope="module")
def starters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each starter generated once with its default answers; tests copy before changing anything."""
    return {name: generate(tmp_path_factory.mktemp(name), starter=name) for name in STARTERS}


def copy_of(project: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(project, tmp_path / project.name, symlinks=True))


def seeded_tests(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The project's own tests as `make test` runs them (conftest.project_tests, with pytest args)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("starter", STARTERS)
def test_each_starter_brings_its_own_model_contract_and_card(starters: dict[str, Path], starter: str) -> None:
    project = starters[starter]
    assert project.name == SLUGS[starter]
    assert not (project / "starters").exists()  # the other starters' files are gone
    contract = yaml.safe_load((project / "contract.yaml").read_text())
    task, inputs = CONTRACTS[starter]
    assert (contract["task"], [(i["name"], i["dtype"], i["shape"]) for i in contract["inputs"]]) == (
        task,
        inputs,
    )
    # The card describes this starter and records the model.py it describes.
    card = (project / "model_card.md").read_text()
    recorded = re.search(r"model\.py sha256 ([0-9a-f]{64})", card)
    assert recorded and recorded.group(1) == hashlib.sha256((project / "model.py").read_bytes()).hexdigest()
    assert f"the {starter} starter" in card
    check_model_card(project)  # complete as generated: `make run` registers it
    # One set of seeded tests for every starter; dependencies of the researcher's own, kept out of updates.
    assert (project / "tests" / "test_model.py").read_text() == (
        starters["image-classification"] / "tests" / "test_model.py"
    ).read_text()
    assert (project / "requirements-model.txt").read_text().startswith("#")
    pyproject = (project / "pyproject.toml").read_text()
    assert '"requirements-model.txt"' in pyproject.split("[tool.cruft]")[1]
    # The first commit is made, so readiness has a commit and `cruft update` a clean tree.
    assert git(project, "rev-list", "--count", "HEAD") == "1"
    assert git(project, "status", "--porcelain") == ""


# The default starter's own tests run in tests/test_template_matrix.py, for every answer set.
@pytest.mark.parametrize("starter", [s for s in STARTERS if s != "image-classification"])
def test_each_starter_passes_handoff_check_and_its_own_tests(
    starters: dict[str, Path], starter: str, tmp_path: Path
) -> None:
    project = copy_of(starters[starter], tmp_path)
    checked = handoff("check", cwd=project, timeout=300)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    # The seeded tests, less their first, which runs the same check in process.
    tested = seeded_tests(project, "-k", "not test_model_satisfies_the_contract")
    assert tested.returncode == 0, tested.stdout[-3000:]
    assert "2 passed, 1 deselected" in tested.stdout


def test_the_seeded_tests_keep_passing_for_another_architecture(
    starters: dict[str, Path], tmp_path: Path
) -> None:
    """A researcher swaps the digits CNN for an MLP on the same contract: the seeded tests, which
    know nothing of digits, still pass."""
    project = copy_of(starters["image-classification"], tmp_path)
    model_py = project / "model.py"
    text = model_py.read_text()
    start, end = text.index("def build_model("), text.index("def build_datasets(")
    mlp = (
        "def build_model(cfg: Config) -> nn.Module:\n"
        '    """An MLP instead of the CNN."""\n'
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))\n\n\n"
    )
    model_py.write_text(text[:start] + mlp + text[end:])
    tested = project_tests(project)
    assert tested.returncode == 0, tested.stdout[-3000:]


def test_a_card_that_still_describes_the_starter_is_refused_once_model_py_changes(
    starters: dict[str, Path], tmp_path: Path
) -> None:
    project = copy_of(starters["text-classification"], tmp_path)
    replace_in(project / "model.py", "class Config:", "class Config:  # our own model now")
    with pytest.raises(HandoffError) as refused:
        check_model_card(project)
    message = str(refused.value)
    assert "still describes the text-classification starter" in message
    for section in STARTER_SECTIONS:
        assert f"'{section}'" in message
    assert "'Owners'" not in message
    # Readiness reads the same problems for the report (handoff.model_card.project_card_problems).
    assert any("still describes the text-classification starter" in p for p in project_card_problems(project))

    # Rewritten for the new model, without the starter's comment: accepted.
    card = (project / "model_card.md").read_text()
    card = re.sub(r"<!-- handoff: this card describes .*?-->\n", "", card, flags=re.DOTALL)
    (project / "model_card.md").write_text(card)
    check_model_card(project)
    # A required section left as a TODO is refused as before.
    replace_in(project / "model_card.md", "## Limitations\n", "## Limitations\nTODO\n")
    with pytest.raises(HandoffError, match="'Limitations' still says 'TODO'"):
        check_model_card(project)


# --- the whole local pipeline ------------------------------------------------------------------


@pytest.fixture
def own_mlflow_state() -> Iterator[None]:
    with mlflow_state_restored():
        yield


def infer(endpoint: str, model: str, inputs: list[dict]) -> requests.Response:
    return requests.post(f"{endpoint}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=30)


@pytest.mark.local
@pytest.mark.parametrize("starter", ["text-classification", "tabular-regression"])
def test_starter_runs_the_whole_local_pipeline_to_a_served_model(
    starters: dict[str, Path], starter: str, tmp_path: Path, own_mlflow_state: None
) -> None:
    project = copy_of(starters[starter], tmp_path)
    edit_yaml(project / "handoff.yaml", lambda s: s["serving"].update(port=0))
    # Deploy's served-p99 check moves with the suite's load on two cores: a budget a loaded machine
    # meets; the starter's own SLO is held on evaluate's ONNX Runtime p99, which load does not move.
    shipped = yaml.safe_load((project / "contract.yaml").read_text())["slo"]["latency_p99_ms"]
    replace_in(project / "contract.yaml", f"latency_p99_ms: {shipped} ", "latency_p99_ms: 250 ")
    git(project, "commit", "-qam", "Serve on a free port")  # a test's edit, committed as a user would
    slug = SLUGS[starter]
    try:
        ran = handoff("run", "--local", cwd=project)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert f"== {slug}: SUCCEEDED ==" in ran.stdout
        summary = json.loads((project / "runs" / "latest" / "summary.json").read_text())
        assert summary["gate"]["passed"] is True, summary["gate"]
        assert summary["latency_ms"]["p99"] <= shipped  # the starter meets its shipped SLO on ONNX Runtime
        readiness = summary["readiness"]
        assert readiness["passed"] == readiness["items"] == 9, readiness  # the git commit included
        assert summary["smoke_test"]["passed"] is True

        example = json.loads(next((project / "runs" / "latest").rglob("example.json")).read_text())
        answer = infer(summary["endpoint"], slug, example["inputs"])
        assert answer.status_code == 200, answer.text
        (output,) = answer.json()["outputs"]
        spec = yaml.safe_load((project / "contract.yaml").read_text())["outputs"][0]
        assert output["name"] == spec["name"] and len(output["shape"]) == len(spec["shape"])

        if starter == "text-classification":
            # Any sequence length is served (the contract's second -1), within the vocabulary's range.
            tokens = {"name": "tokens", "datatype": "INT64"}
            for length in (3, 21):
                request = {**tokens, "shape": [1, length], "data": [5] * length}
                answer = infer(summary["endpoint"], slug, [request])
                assert answer.status_code == 200, answer.text
                assert answer.json()["outputs"][0]["shape"] == [1, 2]
            outside = infer(summary["endpoint"], slug, [{**tokens, "shape": [1, 2], "data": [5, 10_000]}])
            assert outside.status_code == 400 and "tokens" in outside.text, outside.text
    finally:
        handoff("stop", cwd=project)
