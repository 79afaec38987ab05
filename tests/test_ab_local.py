"""`handoff ab` on this machine, on real parts: two registered versions served by the real KServe
model server behind the A/B router on the project's port, MLflow on sqlite, feedback through the
served model's feedback route, joined with the real payload log.

The traffic's labels are known: for most rows the challenger's own answer (computed here with
ONNX Runtime from its exported model), so the challenger is the better model by construction.
"""

from __future__ import annotations

import collections
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import requests
from mlflow import MlflowClient
from typer.testing import CliRunner

from handoff import ab
from handoff.cli import app
from handoff.errors import HandoffError
from handoff.project import Project
from handoff.serving import local_server
from handoff.serving.ab_router import ARM_HEADER, VERSION_HEADER, arm_for
from handoff.steps.register import register
from handoff.tracking import CHAMPION, alias_version, use_tracking

from .conftest import edit_yaml, mlflow_state_restored, replace_in
from .test_triton_layout import EVALUATION, MODEL, _export

pytestmark = pytest.mark.local

INFER = f"/v2/models/{MODEL}/infer"
FEEDBACK = f"/v2/models/{MODEL}/feedback"
ROWS = 16  # rows per request
USERS = 40


def invoke(*args: str) -> tuple[int, str]:
    """A ``handoff`` command in this process: exit code and what it printed (or its error line)."""
    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, HandoffError):
        return 1, f"error: {result.exception}"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def served(default_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two registered versions of distinct (untrained) weights, v1 champion and serving; the
    challenger v2's exported model.onnx for the labels."""
    with mlflow_state_restored():
        root = tmp_path_factory.mktemp("ab")
        project_dir = Path(shutil.copytree(default_project, root / MODEL))
        edit_yaml(project_dir / "handoff.yaml", lambda s: s["serving"].update(port=0))
        # A generous SLO (two servers and this test share two cores) and a 5-point tolerance: the
        # smallest accuracy difference worth acting on, which sizes the test at about 1000 rows.
        replace_in(project_dir / "contract.yaml", "latency_p99_ms: 25", "latency_p99_ms: 250")
        replace_in(project_dir / "contract.yaml", "champion_tolerance: 0.01", "champion_tolerance: 0.05")
        loaded = Project.load(project_dir)
        exports = [_export(loaded, seed, root / f"export-{seed}") for seed in (0, 1)]
        for out in exports:
            register(project_dir, out, EVALUATION)
        use_tracking(loaded).set_registered_model_alias(MODEL, CHAMPION, "1")
        code, said = invoke("deploy", "--local", "--version", "1", "--project", str(project_dir))
        assert code == 0, said
        yield project_dir, exports[1] / "model.onnx"
        invoke("stop", "--project", str(project_dir))


def send(
    url: str, session: requests.Session, rng: np.random.Generator, user: str
) -> tuple[requests.Response, np.ndarray]:
    images = rng.random((ROWS, 1, 8, 8), dtype=np.float32)
    body = {
        "id": uuid.uuid4().hex,
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "FP32",
                "data": images.ravel().tolist(),
            }
        ],
    }
    answer = session.post(f"{url}{INFER}", json=body, headers={"x-user-id": user}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer, images


def traffic(url: str, challenger: ort.InferenceSession, requests_: int, seed: int) -> dict[str, set[str]]:
    """Requests from USERS users, each answered request's labels reported as feedback: the
    challenger's answer for 90% of rows, a random class otherwise. Returns the arms each user saw."""
    rng = np.random.default_rng(seed)
    seen: dict[str, set[str]] = collections.defaultdict(set)
    reports: list[dict[str, Any]] = []
    with requests.Session() as session:
        for i in range(requests_):
            user = f"user-{i % USERS}"
            answer, images = send(url, session, rng, user)
            seen[user].add(answer.headers[ARM_HEADER])
            expected = {"champion": "1", "challenger": "2"}[answer.headers[ARM_HEADER]]
            assert answer.headers[VERSION_HEADER] == expected == answer.json()["model_version"]
            truth = np.argmax(challenger.run(None, {"image": images})[0], axis=1)
            noise = rng.random(ROWS) < 0.1
            truth[noise] = rng.integers(0, 10, int(noise.sum()))
            reports.append({"id": answer.json()["id"], "labels": truth.tolist()})
        recorded = session.post(f"{url}{FEEDBACK}", json=reports, timeout=30)
        assert recorded.status_code == 200, recorded.text
        assert recorded.json() == {"recorded": requests_, "rows": requests_ * ROWS}
    return seen


def wait_for_rows(project: Path, rows: int) -> dict[str, Any]:
    """``handoff ab status`` once the payload and feedback logs (flushed every 1-2 s) hold ``rows``."""
    import time

    deadline = time.monotonic() + 20
    while True:
        found = ab.status(project)
        labelled = sum(arm["labelled_rows"] for arm in found["arms"].values())
        if labelled >= rows or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_an_ab_test_reaches_its_verdict_and_promotes_the_better_challenger(served: tuple[Path, Path]) -> None:
    project, challenger_onnx = served
    loaded = Project.load(project)
    challenger = ort.InferenceSession(str(challenger_onnx), providers=["CPUExecutionProvider"])
    before = local_server.current(loaded.state_dir, loaded.root)
    assert before is not None and before.version == "1"

    code, said = invoke(
        "ab", "start", "--challenger", "2", "--key-header", "x-user-id", "--project", str(project)
    )
    assert code == 0, said
    assert "champion v1 50%, challenger v2 50%" in said
    url = before.url  # the router took over the champion's port
    assert not local_server.alive(before)  # retired once the router accepted on its socket
    # Everything but inference goes to the champion's server: metadata, and a HEAD (no body) too.
    assert requests.get(f"{url}/v2/models/{MODEL}", timeout=10).json()["versions"] == ["1"]
    assert requests.head(f"{url}/v2/health/live", timeout=10).status_code < 500
    assert requests.get(f"{url}/ab", timeout=10).json()["arms"]["challenger"]["version"] == "2"

    # A deploy in the middle of the test would strand its arms: refused, saying how to end it.
    code, said = invoke("deploy", "--local", "--version", "2", "--project", str(project))
    assert code == 1 and "handoff ab stop --promote" in said

    # Too little data: the verdict says so, and promotion is refused.
    traffic(url, challenger, 8, seed=1)
    early = wait_for_rows(project, 8 * ROWS)
    assert early["outcome"] == "not enough data"
    assert any("not enough data" in reason for reason in early["reasons"])
    code, said = invoke("ab", "stop", "--promote", "--project", str(project))
    assert code == 1 and "'not enough data'" in said
    assert alias_version(use_tracking(loaded), MODEL, CHAMPION) == "1"

    # Enough: the challenger is better, with the statistics that say so.
    seen = traffic(url, challenger, 160, seed=2)
    assert all(len(arms) == 1 for arms in seen.values()), seen  # each user stuck to one arm
    assert {next(iter(a)) for a in seen.values()} == {"champion", "challenger"}
    for user, arms in seen.items():  # and to the arm the stable hash gives
        assert arms == {arm_for(user, 50)}
    found = wait_for_rows(project, 168 * ROWS)
    assert found["outcome"] == "challenger better", found["reasons"]
    assert found["metric"] == "accuracy" and found["difference"] > 0.05 and found["p_value"] < 0.05
    for arm in ("champion", "challenger"):
        report = found["arms"][arm]
        assert report["labelled_rows"] >= found["required_rows"]
        assert report["p99_ms"] is not None and report["errors"] == 0
    assert sum(found["arms"][a]["requests"] for a in ("champion", "challenger")) == 168
    code, said = invoke("ab", "status", "--project", str(project))
    assert code == 0 and "verdict: challenger better" in said and "z-test of the accuracy difference" in said

    arms = ab.running_ab(loaded)
    assert arms is not None
    code, said = invoke("ab", "stop", "--promote", "--project", str(project))
    assert code == 0, said

    # The registry and the served model agree: v2 is champion and serves the port alone.
    client = MlflowClient()
    assert alias_version(use_tracking(loaded), MODEL, CHAMPION) == "2"
    served_now = local_server.current(loaded.state_dir, loaded.root)
    assert served_now is not None and served_now.version == "2" and served_now.url == url
    metadata = requests.get(f"{url}/v2/models/{MODEL}", timeout=10).json()
    assert metadata["versions"] == ["2"]
    answer, _ = send(url, requests.Session(), np.random.default_rng(3), "user-1")
    assert ARM_HEADER not in answer.headers and answer.json()["model_version"] == "2"
    assert not any(local_server.alive(handle) for handle in arms.handles())
    assert ab.running_ab(loaded) is None
    tags = client.get_model_version(MODEL, "2").tags
    assert tags[ab.OUTCOME_TAG] == "challenger better"
    assert tags[ab.DECISION_TAG] == "promoted vs v1"
    run = client.get_model_version(MODEL, "2").run_id
    card = Path(client.download_artifacts(run, "ab/model_card.md")).read_text()
    assert "## A/B test" in card and "Verdict: challenger better. Decision: promoted." in card


def test_feedback_that_cannot_be_recorded_says_what_was_expected(served: tuple[Path, Path]) -> None:
    project, _ = served
    handle = local_server.current(Project.load(project).state_dir)
    assert handle is not None
    for body, expected in (
        (b"{", "not JSON"),
        (b'{"id": "r1"}', "labels must be a non-empty list"),
        (b'{"id": "r1", "labels": ["cat"]}', "labels must hold numbers"),
        (b'[{"id": "r1", "labels": [1], "label": 2}]', "feedback[0] has unknown field(s) label"),
        # Checked against the contract as it arrives: one bad label never stops a verdict later.
        (b'{"id": "r1", "labels": [12]}', "labels must be class ids 0..9 (logits scores 10 classes)"),
        (b'{"id": "r1", "labels": [2.5]}', "labels must be whole class ids (0..9)"),
        (
            b'[{"id": "r0", "labels": [1]}, {"id": "r1", "labels": [[1]]}]',
            "feedback[1] (id 'r1'): labels must be one",
        ),
    ):
        answer = requests.post(f"{handle.url}{FEEDBACK}", data=body, timeout=10)
        assert answer.status_code == 400 and expected in answer.json()["error"], answer.text


def test_a_challenger_that_fails_its_checks_leaves_the_champion_serving_alone(
    served: tuple[Path, Path],
) -> None:
    project, _ = served
    loaded = Project.load(project)
    before = local_server.current(loaded.state_dir, loaded.root)
    assert before is not None
    champion = before.version
    challenger = "1" if champion == "2" else "2"
    contract = project / "contract.yaml"
    saved = contract.read_text()
    replace_in(contract, "latency_p99_ms: 250", "latency_p99_ms: 0.001")  # no server meets it
    try:
        code, said = invoke("ab", "start", "--challenger", challenger, "--project", str(project))
    finally:
        contract.write_text(saved)
    assert code == 1 and f"the challenger arm ({MODEL} v{challenger}) failed a check" in said
    assert ab.running_ab(loaded) is None and not (loaded.state_dir / "ab.json").exists()
    after = local_server.current(loaded.state_dir, loaded.root)
    assert after == before and local_server.alive(before)  # never stopped serving
    assert requests.get(f"{before.url}/v2/models/{MODEL}", timeout=10).json()["versions"] == [champion]
    arms = [p for p in psutil.process_iter(["cmdline"]) if any("/ab/" in a for a in p.info["cmdline"] or [])]
    assert arms == []  # both arm servers were stopped


def test_rollback_keeps_the_champion_and_stop_ends_every_server_of_a_test(served: tuple[Path, Path]) -> None:
    project, _ = served
    loaded = Project.load(project)
    champion = alias_version(use_tracking(loaded), MODEL, CHAMPION)
    challenger = "1" if champion == "2" else "2"
    code, said = invoke("ab", "start", "--challenger", challenger, "--share", "30", "--project", str(project))
    assert code == 0, said
    code, said = invoke("ab", "start", "--challenger", challenger, "--project", str(project))
    assert code == 1 and "already running" in said
    code, said = invoke("ab", "stop", "--rollback", "--project", str(project))
    assert code == 0 and f"v{challenger} rolled back; champion is v{champion}" in said
    assert alias_version(use_tracking(loaded), MODEL, CHAMPION) == champion
    serving = local_server.current(loaded.state_dir, loaded.root)
    assert serving is not None and serving.version == champion
    tags = MlflowClient().get_model_version(MODEL, challenger).tags
    assert tags[ab.DECISION_TAG] == f"rolled back vs v{champion}"

    code, said = invoke("ab", "start", "--challenger", challenger, "--project", str(project))
    assert code == 0, said
    running = ab.running_ab(loaded)
    assert running is not None
    code, said = invoke("stop", "--project", str(project))
    assert code == 0, said
    assert not any(local_server.alive(handle) for handle in running.handles())
    assert ab.running_ab(loaded) is None
    code, said = invoke("ab", "status", "--project", str(project))
    assert code == 1 and "no A/B test is running" in said
