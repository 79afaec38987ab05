"""`handoff monitor` on real parts: the default model registered with its reference profile
(evaluate's real report folder), served by the real local KServe server with its payload log on,
real V2 traffic, Evidently's real drift tests. In-distribution traffic gets no drift verdict;
inverted or noised digits get one, exit 1, and a report and verdict that name the drifted input."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from handoff.cli import app
from handoff.contract import Contract
from handoff.drift_features import categorical, feature_table, input_columns, prediction_columns, tensor_of
from handoff.payload_log import payload_store, read_window
from handoff.project import Project
from handoff.serving import local_server
from handoff.step_entry import record_json
from handoff.steps.deploy import deploy
from handoff.steps.evaluate import evaluate
from handoff.steps.register import register

from .conftest import edit_yaml, generate, mlflow_state_restored
from .test_triton_layout import EVALUATION, MODEL, _export

pytestmark = pytest.mark.local


@dataclass(frozen=True)
class Served:
    project: Path
    url: str
    version: str
    heldout: np.ndarray  # the held-out split's images, [n, 1, 8, 8] in [0, 1]
    logged_by_deploy: int  # payload log rows right after deploy (its smoke test, latency check)


@pytest.fixture(scope="module")
def served(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The default model evaluated (reference profile), registered and served with payload logging."""
    root = tmp_path_factory.mktemp("monitor")
    project_dir = Path(shutil.copytree(default_project, root / MODEL))
    edit_yaml(project_dir / "handoff.yaml", lambda s: s["serving"].update(port=0))
    with mlflow_state_restored():
        loaded = Project.load(project_dir)
        onnx = _export(loaded, 0, root / "export")
        report = root / "report"
        evaluation = json.loads(record_json(evaluate(project_dir, onnx, report_dir=report)))
        version = register(project_dir, onnx, evaluation, report_dir=report).version
        deployed = deploy(project_dir, MODEL, version, cluster=False)
        _, heldout = loaded.hooks.build_datasets(loaded.config())
        images = np.stack([image.numpy() for image, _ in heldout])
        logged = read_window(payload_store(loaded)).rows
        yield Served(project_dir, deployed.url, version, images, logged)
        local_server.stop(loaded.state_dir, project=loaded.root)


def send(served: Served, images: np.ndarray, rows_per_request: int = 8) -> datetime:
    """POST ``images`` as V2 requests; wait until the payload log holds them; when they began."""
    began = datetime.now(UTC)
    store = payload_store(Project.load(served.project))
    before = read_window(store).rows
    with requests.Session() as session:
        for start in range(0, len(images), rows_per_request):
            batch = images[start : start + rows_per_request]
            body = {
                "inputs": [
                    {
                        "name": "image",
                        "shape": list(batch.shape),
                        "datatype": "FP32",
                        "data": batch.ravel().tolist(),
                    }
                ]
            }
            answer = session.post(f"{served.url}/v2/models/{MODEL}/infer", json=body, timeout=10)
            assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 20
    while read_window(store).rows < before + len(images):
        assert time.monotonic() < deadline, "the payload log never held the requests sent"
        time.sleep(0.2)
    return began


def monitor(served: Served, out: Path, *args: str) -> tuple[int, str, dict]:
    result = CliRunner().invoke(app, ["monitor", "--project", str(served.project), "--out", str(out), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stderr, json.loads((out / "verdict.json").read_text())


def test_deploys_own_probes_are_not_logged(served: Served) -> None:
    """The smoke test and the latency check (the contract example, 211 times) are not traffic:
    logged, they would read as drift."""
    assert served.logged_by_deploy == 0


def test_in_distribution_traffic_gets_no_drift_verdict(served: Served, tmp_path: Path) -> None:
    began = send(served, served.heldout)
    code, said, verdict = monitor(served, tmp_path, "--since", began.isoformat())
    assert code == 0, said
    assert verdict["status"] == "no drift" and not verdict["drift_detected"], verdict["reasons"]
    assert verdict["version"] == served.version and verdict["rows"] == len(served.heldout)
    # Every column of both sides was tested: the image's summaries, the class and its confidence.
    summaries = {f"image.{s}" for s in ("mean", "std", "min", "p25", "p50", "p75", "max")}
    assert set(verdict["columns"]) == {*summaries, "logits.class", "logits.confidence"}
    assert verdict["columns"]["logits.class"]["method"].startswith("chi-square")
    assert {c["tensor"] for c in verdict["columns"].values()} == {"image", "logits"}
    assert f"no drift over {len(served.heldout)} rows" in said
    gauges = (tmp_path / "metrics.prom").read_text()
    assert re.search(rf'handoff_drift_detected\{{model="{MODEL}",version="{served.version}"\}} 0\.0', gauges)
    assert (tmp_path / "report.html").stat().st_size > 100_000  # Evidently's page, scripts inlined


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(lambda x, rng: 1.0 - x, id="inverted"),
        pytest.param(lambda x, rng: x + rng.normal(0, 0.35, x.shape).astype(np.float32), id="noised"),
    ],
)
def test_shifted_digits_get_a_drift_verdict_naming_the_input(served: Served, tmp_path: Path, shift) -> None:
    shifted = shift(served.heldout, np.random.default_rng(0)).astype(np.float32)
    began = send(served, shifted)
    code, said, verdict = monitor(served, tmp_path, "--since", began.isoformat())
    assert code == 1, said
    assert verdict["status"] == "drift" and verdict["drift_detected"]
    assert verdict["drifted_inputs"] == ["image"]
    assert verdict["drift_share"] >= 0.5
    assert "input columns drifted" in verdict["reasons"][0] and "image." in verdict["reasons"][0]
    assert "drift over" in said and "image." in said
    drifted = [c for c, d in verdict["columns"].items() if d["drifted"]]
    assert drifted and all(verdict["columns"][c]["score"] is not None for c in drifted)
    rendered(tmp_path / "report.html", tmp_path / "report.png")
    gauges = (tmp_path / "metrics.prom").read_text()
    assert re.search(r"handoff_drift_detected\{[^}]*\} 1\.0", gauges)


def rendered(html: Path, shot: Path) -> None:
    """Evidently's page, rendered in headless Chromium offline: its charts drawn (plotly's SVG),
    the drifted columns named, and a screenshot showing the charts' reds and greys."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is required for this test (apt-get install chromium; .ci/run installs it)"
    browser = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1400,2000",
        "--virtual-time-budget=15000",  # the page is a React app: let it render before reading it
    ]
    dom = subprocess.run(
        [*browser, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert dom.count('class="main-svg"') >= 2, "no plotly chart was drawn"
    assert "Dataset Drift is detected" in dom and "image.p50" in dom
    subprocess.run(
        [*browser, f"--screenshot={shot}", html.as_uri()], capture_output=True, timeout=120, check=True
    )
    pixels = (mpimg.imread(shot)[..., :3] * 255).astype(np.int16)
    red = ((pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)).sum()
    assert red > 2000, f"only {red} red pixels: the distribution charts did not render"


def test_too_few_rows_give_no_verdict_and_say_why(served: Served, tmp_path: Path) -> None:
    send(served, served.heldout[:16])
    code, _, verdict = monitor(served, tmp_path, "--last-rows", "16")
    assert code == 0
    assert verdict["status"] == "not enough data" and verdict["rows"] == 16
    assert "fewer than slo.drift.min_rows 200" in verdict["reasons"][0]
    assert not (tmp_path / "report.html").exists()
    assert "handoff_drift_detected" not in (tmp_path / "metrics.prom").read_text()


def test_a_version_registered_without_a_profile_is_named(served: Served, tmp_path: Path) -> None:
    loaded = Project.load(served.project)
    with mlflow_state_restored():
        bare = register(served.project, _export(loaded, 1, tmp_path / "export"), EVALUATION).version
        result = CliRunner().invoke(
            app,
            ["monitor", "--project", str(served.project), "--version", bare, "--out", str(tmp_path / "m")],
        )
    assert result.exit_code != 0
    assert f"registered version {MODEL}/{bare} has no reference profile" in str(result.exception)


def test_a_bad_since_is_refused_with_the_forms_it_takes(served: Served, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["monitor", "--project", str(served.project), "--since", "yesterday"])
    assert "--since 'yesterday' is neither a duration (90s, 30m, 24h, 7d) nor an ISO time" in str(
        result.exception
    )


@pytest.mark.unit
def test_the_readiness_item_says_what_monitoring_lacks(default_project: Path) -> None:
    """ "Monitoring configured" passes with a profile, payloads sampled and alerts generated, and
    otherwise names each gap."""
    from handoff.gates import decide
    from handoff.readiness import Evidence, monitoring_item

    project = Project.load(default_project)
    profile = {"inputs": {"rows": 2000, "columns": ["image.mean"]}, "outputs": {"rows": 359, "columns": []}}
    ready = Evidence(project, {}, decide([]), None, "", (), "", None, reference=profile, alerts=("A", "B"))
    item = monitoring_item(ready)
    assert item.passed and item.name == "Monitoring configured"
    assert "2000 training items as 1 input columns, 359 held-out outputs" in item.evidence
    assert "2 alert rules" in item.evidence and "Triton" in item.evidence  # the default cluster runtime
    off = project.settings.model_copy(
        update={"monitoring": project.settings.monitoring.model_copy(update={"sample_rate": 0.0})}
    )
    bare = Evidence(
        dataclasses.replace(project, settings=off), {}, decide([]), None, "", (), "", None, reference=None
    )
    item = monitoring_item(bare)
    assert not item.passed
    assert item.evidence == (
        "no reference profile: evaluate ran without a report folder (--report); "
        "handoff.yaml monitoring.sample_rate is 0: the server logs no payloads to compare; "
        "no alert rules were generated from contract.yaml"
    )


def _regression(**slo: object) -> Contract:
    return Contract.model_validate(
        {
            "name": "m",
            "task": "regression",
            "owners": {"research": "r", "engineering": "e"},
            "inputs": [{"name": "input.1", "dtype": "float32", "shape": [-1, 3]}],
            "outputs": [{"name": "prediction", "dtype": "float32", "shape": [-1, 1]}],
            "slo": {"latency_p99_ms": 10, **slo},
        }
    )


@pytest.mark.unit
def test_only_a_classifiers_class_is_compared_as_categories(default_project: Path) -> None:
    """The predicted class is a label (chi-square); a regression output named ``prediction`` stays a
    number (every distinct float its own category would always drift)."""
    digits = Project.load(default_project).contract
    table = feature_table(prediction_columns(digits, {"logits": np.eye(10, dtype=np.float32)[[1, 2, 2]]}))
    assert list(table.columns) == ["logits.class", "logits.confidence"]
    assert categorical(table) == ["logits.class"] and table["logits.class"].tolist() == ["1", "2", "2"]
    # A response that left the output out (the request asked for others) is logged empty: no class.
    rows = [np.eye(10, dtype=np.float32)[1], np.empty(0, np.float32), np.eye(10, dtype=np.float32)[2]]
    table = feature_table(prediction_columns(digits, {"logits": rows}))
    assert table["logits.class"].tolist() == ["1", None, "2"] and np.isnan(table["logits.confidence"][1])
    regression = _regression()
    table = feature_table(
        prediction_columns(regression, {"prediction": np.array([[0.5], [1.5]], np.float32)})
    )
    assert categorical(table) == [] and table["prediction"].tolist() == [0.5, 1.5]
    # Columns name their tensor even where its name has dots of its own.
    inputs = input_columns(regression, {"input.1": np.zeros((2, 3), np.float32)})
    assert list(inputs) == ["input.1[0]", "input.1[1]", "input.1[2]"]
    assert {tensor_of(c, ["input.1", "prediction"]) for c in inputs} == {"input.1"}


@pytest.mark.unit
def test_a_pad_value_must_name_an_input() -> None:
    with pytest.raises(ValueError, match=r"is not an input; the inputs are \['input.1'\]"):
        _regression(drift={"pad": {"tokens": 0}})


@pytest.mark.unit
def test_padded_training_reviews_and_unpadded_requests_describe_the_same_data(tmp_path: Path) -> None:
    """The text starter pads every training review with 0 to a fixed length; clients send reviews
    as long as they are. With the starter's slo.drift.pad the held-out reviews, sent unpadded, show
    no input drift against the reference profile; without it nearly every column drifted."""
    from handoff.reference_profile import reference_inputs
    from handoff.steps.monitor import _evidently

    project = Project.load(generate(tmp_path, starter="text-classification"))
    assert project.contract.slo.drifting.pad == {"tokens": 0}
    cfg = project.config()
    reference = reference_inputs(project, cfg)
    _, heldout = project.hooks.build_datasets(cfg)
    sent = [row[row != 0] for row in heldout.tensors[0].numpy()]  # as clients send them
    assert len({len(row) for row in sent}) > 1  # reviews of many lengths
    current = feature_table(input_columns(project.contract, {"tokens": sent}))
    columns = list(reference.columns)
    assert "tokens.size" in columns and reference["tokens.size"].nunique() > 1
    _, tested = _evidently(reference, current[columns], columns, [], project.contract.slo.drifting)
    assert [c for c, (_, _, _, drifted) in tested.items() if drifted] == []


@pytest.mark.unit
def test_without_evidently_monitor_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evidently is an extra (about 25 packages a researcher's first setup need not wait for)."""
    import sys

    import pandas as pd

    from handoff.contract import Drift
    from handoff.errors import HandoffError
    from handoff.steps.monitor import _evidently

    for name in [m for m in sys.modules if m == "evidently" or m.startswith("evidently.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "evidently", None)  # what a venv without the extra gives
    with pytest.raises(HandoffError) as missing:
        _evidently(pd.DataFrame(), pd.DataFrame(), [], [], Drift())
    assert "handoff monitor compares with Evidently, which is not installed here: pip install " in str(
        missing.value
    )
    assert "'ml-handoff[monitor]==" in str(missing.value) and "make setup EXTRAS=monitor" in str(
        missing.value
    )
