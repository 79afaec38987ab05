"""The handoff zone: every gate can block, the champion is a gate too, the model card must be
written, and the readiness report says what the gates decided, with pictures a browser renders.

One model is trained and exported per module (real torch, real ONNX); each test evaluates and
registers it (real ONNX Runtime, real MLflow on sqlite) in its own copy of the project.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from matplotlib import image as mpimg
from mlflow.tracking import MlflowClient

from .conftest import edit_yaml, handoff, mlflow_state_restored, replace_in

pytestmark = pytest.mark.local


@pytest.fixture(scope="module")
def exported(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default project with checkpoint.pt and onnx/ (a model that passes every gate)."""
    project = Path(shutil.copytree(default_project, tmp_path_factory.mktemp("zone") / "p"))
    for args in (("train", "--record", "train.json"), ("export",)):
        result = handoff(*args, cwd=project)
        assert result.returncode == 0, result.stderr[-2000:]
    return project


@pytest.fixture(autouse=True)
def _own_mlflow_state() -> Iterator[None]:
    with mlflow_state_restored():
        yield


@pytest.fixture
def zone(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "p"))


def evaluate(project: Path, model_dir: str = "onnx") -> dict[str, Any]:
    run_id = json.loads((project / "train.json").read_text())["mlflow_run_id"]
    args = ("--model-dir", model_dir, "--out", "evaluation.json", "--run-id", run_id)
    result = handoff("evaluate", *args, cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((project / "evaluation.json").read_text())


def register(project: Path, model_dir: str = "onnx") -> subprocess.CompletedProcess[str]:
    args = ("--model-dir", model_dir, "--evaluation", "evaluation.json", "--report", "report")
    return handoff("register", *args, cwd=project)


def registry(project: Path) -> MlflowClient:
    """A client of the project's own store (never MLflow's process-wide registry URI, which an
    earlier test in this process may have pointed elsewhere)."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def verdicts(evaluation: dict[str, Any]) -> dict[str, bool]:
    return {item["name"]: item["passed"] for item in evaluation["readiness"]}


def slo(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda contract: change(contract["slo"])


@pytest.mark.parametrize(
    ("change", "check", "item", "expected"),
    [
        (
            slo(lambda s: s.update(min_metrics={"accuracy": 0.999})),
            "accuracy",
            "Metric gates",
            r"accuracy 0\.9\d{3} below the minimum 0\.999 by 0\.0\d{3} \(slo\.min_metrics\.accuracy\)",
        ),
        (
            slo(lambda s: s.update(max_metrics={"ece": 0.0001})),
            "ece",
            "Metric gates",
            r"ece 0\.\d{4} above the maximum 0\.0001 by 0\.\d{4} \(slo\.max_metrics\.ece\)",
        ),
        (
            slo(lambda s: s.update(min_metrics={"recall_of_nothing": 0.5})),
            "recall_of_nothing",
            "Metric gates",
            r"recall_of_nothing was not produced \(slo\.min_metrics\.recall_of_nothing asks for it\)",
        ),
        (
            slo(lambda s: s.update(latency_p99_ms=0.0001)),
            "latency_p99_ms",
            "Latency SLO",
            r"latency p99 \d+\.\d\d ms > slo\.latency_p99_ms 0\.0001 ms at batch 1 \(over by \d+\.\d\d ms\)",
        ),
        (
            slo(lambda s: s.update(max_model_size_mb=0.001)),
            "model_size_mb",
            "Metric gates",
            r"model\.onnx 0\.\d{3} MB > slo\.max_model_size_mb 0\.001 MB",
        ),
    ],
    ids=["min-metric", "max-metric", "missing-metric", "latency", "model-size"],
)
def test_each_absolute_gate_blocks_and_the_report_says_so(
    zone: Path, change: Callable[[dict[str, Any]], None], check: str, item: str, expected: str
) -> None:
    edit_yaml(zone / "contract.yaml", change)
    evaluation = evaluate(zone)
    gate = evaluation["gate"]
    assert gate["passed"] is False
    (failed,) = [c for c in gate["checks"] if not c["passed"]]
    assert failed["name"] == check
    assert re.fullmatch(expected, failed["detail"]), failed["detail"]
    assert gate["reasons"] == [failed["detail"]]
    # The report's verdicts are the gate's: the one item fails, the other gate items pass.
    items = verdicts(evaluation)
    assert items[item] is False
    others = {"Latency SLO", "Metric gates", "Champion comparison"} - {item}
    assert all(items[name] for name in others)
    report = (zone / "report/readiness.md").read_text()
    assert f"| {item} | FAIL |" in report and "NOT READY" in report


def test_first_model_bootstraps_then_a_worse_challenger_is_held_back_by_the_champion(zone: Path) -> None:
    first = evaluate(zone)
    assert first["gate"]["passed"] and first["champion"] is None
    assert register(zone).returncode == 0
    # A deliberately worse model: one epoch. The absolute floor is lowered so only the champion
    # comparison stands in its way.
    worse = handoff("train", "--set", "epochs=1", "--checkpoint", "worse.pt", "--fresh", cwd=zone)
    assert worse.returncode == 0, worse.stderr[-2000:]
    assert handoff("export", "--checkpoint", "worse.pt", "--out", "worse", cwd=zone).returncode == 0
    edit_yaml(zone / "contract.yaml", slo(lambda s: s.update(min_metrics={"accuracy": 0.3})))
    second = evaluate(zone, "worse")
    assert second["champion"]["version"] == "1"
    (failed,) = [c for c in second["gate"]["checks"] if not c["passed"]]
    assert failed["name"] == "champion.accuracy" and failed["kind"] == "relative"
    assert "vs champion v1" in failed["detail"] and "worse by" in failed["detail"]
    assert second["metrics"]["accuracy"] < first["metrics"]["accuracy"] - 0.01
    assert verdicts(second)["Champion comparison"] is False
    result = register(zone, "worse")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout[result.stdout.index("{") :])
    assert record["version"] == "2" and record["aliases"] == ["challenger"]  # not promoted
    client = registry(zone)
    assert str(client.get_model_version_by_alias("digits-classifier", "champion").version) == "1"
    tags = client.get_model_version("digits-classifier", "2").tags
    assert tags["handoff.gate"] == "failed" and "vs champion v1" in tags["handoff.gate_reasons"]
    assert tags["handoff.compared_to_champion"] == "1"


def test_an_incomplete_model_card_blocks_registration_listing_every_gap(zone: Path) -> None:
    evaluate(zone)
    card = zone / "model_card.md"
    replace_in(card, "Tiny, low-resolution", "TODO: describe limitations. Tiny, low-resolution")
    text = card.read_text()
    start = text.index("## Ethical considerations")
    end = text.index("## Owners")
    card.write_text(text[:start] + "## Ethical considerations\n<!-- to be written -->\n\n" + text[end:])
    card.write_text(card.read_text().split("## Owners")[0])
    result = register(zone)
    assert result.returncode == 1
    assert "model_card.md: incomplete, so the model cannot be registered:" in result.stderr
    assert "'Limitations' still says 'TODO'" in result.stderr
    assert "'Ethical considerations' is empty" in result.stderr
    assert "'Owners' is missing (add a '## Owners' section)" in result.stderr
    client = registry(zone)
    assert client.search_registered_models() == []  # nothing was written
    assert verdicts(evaluate(zone))["Model card complete"] is False  # and the report says so


def test_the_registered_version_carries_the_filled_in_card_and_the_report(zone: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=zone, check=True)
    subprocess.run(["git", "add", "-A"], cwd=zone, check=True)
    ident = ["-c", "user.name=r", "-c", "user.email=r@example.com"]
    subprocess.run(["git", *ident, "commit", "-qm", "model"], cwd=zone, check=True)
    evaluation = evaluate(zone)
    assert all(verdicts(evaluation).values()), evaluation["readiness"]  # git commit: lineage complete
    assert register(zone).returncode == 0
    uri = f"sqlite:///{zone / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # not whatever an earlier test in this process left
    local = Path(mlflow.artifacts.download_artifacts("models:/digits-classifier/1"))
    extra = local / "extra_files"
    card = (extra / "model_card.md").read_text()
    assert card.startswith("# Model card: Digits Classifier")
    assert "## Measured by handoff" in card
    assert f"| accuracy | {evaluation['metrics']['accuracy']:.4f} |" in card
    assert "| latency_p99_ms | pass:" in card and "![confusion_matrix.png](confusion_matrix.png)" in card
    report = (extra / "readiness.md").read_text()
    assert "**READY**: 9/9 items pass; gate passed." in report and "NOT READY" not in report
    for png in ("confusion_matrix.png", "latency_histogram.png"):
        assert (extra / png).read_bytes().startswith(b"\x89PNG")


def test_the_registry_page_shows_the_card_and_what_the_champion_is(zone: Path) -> None:
    evaluation = evaluate(zone)
    assert register(zone).returncode == 0
    client = registry(zone)
    description = client.get_model_version("digits-classifier", "1").description
    assert description.startswith("# Model card: Digits Classifier")
    for section in ("## Intended use", "## Training data", "## Limitations", "## Measured by handoff"):
        assert section in description
    assert f"| accuracy | {evaluation['metrics']['accuracy']:.4f} |" in description
    assert "](" not in description  # no links the registry page could not resolve
    about = client.get_registered_model("digits-classifier").description
    assert about.startswith("A small CNN that reads 8x8 handwritten digits.\n\nChampion: version 1 (")
    assert "promoted: the first champion" in about and "](" not in about


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is required for this test (apt-get install chromium; .ci/run installs it)"
    return found


def test_the_html_report_renders_its_pictures_in_a_browser(zone: Path, tmp_path: Path) -> None:
    evaluate(zone)
    html = zone / "report/readiness.html"
    assert 'src="data:image/png;base64,' in html.read_text() and "<img" in html.read_text()
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,2600",
            f"--screenshot={shot}",
            html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = (mpimg.imread(shot)[..., :3] * 255).astype(np.int16)
    # The plots are drawn in blues (histogram bars, curves, the confusion matrix's colour map);
    # the page itself has none, and a broken image would show only its alt text.
    red, green_, blue_ = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    blue = ((blue_ > red + 60) & (blue_ > green_ + 20)).sum()
    assert blue > 5000, f"only {blue} blue pixels: the report's images did not render"
    # The verdicts are in the page too, in the pass colour.
    green = (np.abs(pixels - np.array([10, 122, 47])).sum(axis=-1) < 40).sum()
    assert green > 50


def test_the_html_report_shows_per_class_and_slice_tables_as_tables_in_a_browser(zone: Path) -> None:
    evaluate(zone)
    html = zone / "report/readiness.html"
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    section = dom.split("<h2>Per class and slices</h2>", 1)[1]
    assert "<pre>" not in section and "|---" not in section  # no Markdown left in the page
    tables = re.findall(r'<h3>([^<]+)</h3><table class="sortable">(.*?)</table>', section, re.S)
    assert [title for title, _ in tables][:1] == ["Per class"]
    rows = re.findall(r"<tr><th>(\d+)</th>", tables[0][1])
    assert rows == [str(digit) for digit in range(10)]  # one row per class of the digits model
    # The Markdown report keeps them as Markdown tables.
    markdown = (zone / "report/readiness.md").read_text()
    assert "## Per class\n\n| | " in markdown and "\n| 0 | " in markdown


def test_a_champion_that_cannot_be_compared_stops_evaluation_with_what_to_do(zone: Path) -> None:
    evaluate(zone)
    assert register(zone).returncode == 0  # v1, champion, with input "image"
    replace_in(zone / "contract.yaml", "- name: image", "- name: pixels")  # a deliberate contract change
    assert handoff("export", "--out", "renamed", cwd=zone).returncode == 0
    run_id = json.loads((zone / "train.json").read_text())["mlflow_run_id"]
    result = handoff("evaluate", "--model-dir", "renamed", "--run-id", run_id, cwd=zone)
    assert result.returncode == 1
    assert "the champion digits-classifier v1 could not be scored on this held-out data" in result.stderr
    assert "delete_registered_model_alias('digits-classifier', 'champion')" in result.stderr
