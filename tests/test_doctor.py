"""`handoff doctor`: each thing that would fail a cluster run is found, and says what to do.

The Kubernetes API is the fake API server (namespaces, discovery, nodes and access reviews as the
real one answers them, through the official client); MLflow is the real tracking server's app;
the image registry speaks the registry API's manifest and bearer-token endpoints; KFP and Argo
are the same fakes `handoff submit` is tested against.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.tracking import MlflowClient

from handoff.doctor import Finding, check_image, run_doctor
from handoff.errors import HandoffError
from handoff.project import Project

from .conftest import edit_yaml, handoff
from .fake_kube import FakeKube, fake_kube
from .test_submit import fake_argo, fake_kfp

pytestmark = pytest.mark.unit

GPU_POOL = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
DIGEST = "sha256:" + "ab" * 32
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real MLflow tracking server's app, served on loopback (doctor asks its /health, and where
    it keeps the experiment's artifacts: s3://, as `mlflow server --default-artifact-root` sets)."""
    from mlflow.server import ARTIFACT_ROOT_ENV_VAR, BACKEND_STORE_URI_ENV_VAR, app
    from werkzeug.serving import make_server

    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    saved = {key: os.environ.get(key) for key in (BACKEND_STORE_URI_ENV_VAR, ARTIFACT_ROOT_ENV_VAR)}
    os.environ.update(
        {BACKEND_STORE_URI_ENV_VAR: f"sqlite:///{store}", ARTIFACT_ROOT_ENV_VAR: "s3://mlflow/"}
    )
    server = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def fake_registry(images: dict[str, str], *, anonymous: bool = True) -> Iterator[str]:
    """A registry holding ``images`` (repository:tag -> digest), behind the bearer-token dance."""
    token = "anonymous-pull-token"

    class Registry(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/token":
                scope = parse_qs(parts.query).get("scope", [""])[0]
                ok = anonymous and scope.startswith("repository:") and scope.endswith(":pull")
                self.answer(200 if ok else 401, b'{"token": "%s"}' % token.encode() if ok else b"{}")
                return
            if self.headers.get("Authorization") != f"Bearer {token}":
                host = self.headers["Host"]
                challenge = f'Bearer realm="http://{host}/token",service="fake",scope="repository:x:pull"'
                self.answer(401, b"{}", {"WWW-Authenticate": challenge})
                return
            repository, _, ref = parts.path.removeprefix("/v2/").partition("/manifests/")
            digest = images.get(f"{repository}:{ref}")
            if digest is None or "manifest" not in self.headers.get("Accept", ""):
                self.answer(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}')
                return
            self.answer(200, b"{}", {"Docker-Content-Digest": digest})

        def answer(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"localhost:{server.server_address[1]}"
    finally:
        server.shutdown()


def healthy_cluster(fake: FakeKube) -> None:
    fake.namespaces["ml-models"] = RESTRICTED
    fake.served["argoproj.io/v1alpha1"] = {"workflows", "workflowtemplates"}
    fake.add_node("gpu-a", labels=GPU_POOL, gpus=1)
    fake.add_node("cpu-a", labels={}, gpus=0)


def configure(project: Path, *, registry: str, mlflow: str, kfp: str, argo: str) -> None:
    def change(settings: dict[str, Any]) -> None:
        settings["image"] = f"{registry}/ml/digits-classifier:1.4.2"
        settings["orchestrator"] = "both"
        settings["training"].update(gpus=1, node_selector=GPU_POOL)
        settings["cluster"].update(mlflow_tracking_uri=mlflow, kfp_endpoint=kfp, argo_server=argo)

    edit_yaml(project / "handoff.yaml", change)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def test_a_ready_cluster_passes_every_check(project: Path, mlflow_url: str) -> None:
    with (
        fake_kube() as fake,
        fake_registry({"ml/digits-classifier:1.4.2": DIGEST}) as registry,
        fake_kfp(token=None) as kfp,
        fake_argo(token=None) as argo,
    ):
        healthy_cluster(fake)
        configure(project, registry=registry, mlflow=mlflow_url, kfp=kfp.url, argo=argo.url)
        MlflowClient(tracking_uri=mlflow_url).create_experiment("digits-classifier")
        findings = run_doctor(Project.load(project), connect=fake.api_client)
    found = by_check(findings)
    assert [f for f in findings if f.outcome != "pass"] == []
    assert set(found) == {
        "api server",
        "namespace",
        "api inferenceservices.serving.kserve.io",
        "api workflows.argoproj.io",
        "api workflowtemplates.argoproj.io",
        "access",
        "gpus",
        "image",
        "mlflow",
        "mlflow artifacts",
        "kfp",
        "argo",
    }
    assert found["mlflow artifacts"].detail.startswith(
        "experiment 'digits-classifier' keeps its artifacts at s3://mlflow/"
    )
    assert "Pod Security enforce: restricted" in found["namespace"].detail
    assert found["gpus"].detail.endswith("gpu-a")
    assert DIGEST in found["image"].detail


def test_each_problem_is_named_with_what_to_do(project: Path) -> None:
    with fake_kube() as fake, fake_registry({}) as registry:
        fake.add_node("gpu-a", labels=GPU_POOL, gpus=1, unschedulable=True)
        fake.denied = {("serving.kserve.io", "inferenceservices", "patch")}
        configure(project, registry=registry, mlflow="sqlite:///mlflow.db", kfp="", argo="")
        edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update(mlflow_tracking_uri=None))
        found = by_check(run_doctor(Project.load(project), connect=fake.api_client))
    assert found["namespace"].outcome == "fail"
    assert "'ml-models' (handoff.yaml namespace) does not exist" in found["namespace"].detail
    assert found["api workflows.argoproj.io"].outcome == "fail"
    assert "install its operator" in found["api workflows.argoproj.io"].detail
    assert found["api inferenceservices.serving.kserve.io"].outcome == "pass"
    assert found["access"].outcome == "fail"
    assert "you may not: patch inferenceservices.serving.kserve.io;" in found["access"].detail
    assert found["gpus"].outcome == "fail"  # the only GPU node is cordoned
    assert "1 node(s) with 1 allocatable nvidia.com/gpu each; 0 of 1 nodes matching" in found["gpus"].detail
    assert found["image"].outcome == "fail" and "build and push it" in found["image"].detail
    assert found["mlflow"].outcome == "fail"
    assert "set cluster.mlflow_tracking_uri" in found["mlflow"].detail
    assert (found["kfp"].outcome, found["argo"].outcome) == ("skip", "skip")


def test_no_cluster_credentials_still_checks_the_rest(project: Path, mlflow_url: str) -> None:
    def no_credentials() -> Any:
        raise HandoffError("no Kubernetes credentials: set KUBECONFIG")

    edit_yaml(project / "handoff.yaml", lambda s: s["cluster"].update(mlflow_tracking_uri=mlflow_url))
    found = by_check(run_doctor(Project.load(project), connect=no_credentials))
    assert found["api server"] == Finding("api server", "fail", "no Kubernetes credentials: set KUBECONFIG")
    assert "namespace" not in found
    assert found["mlflow"].outcome == "pass"


def test_image_reference_forms_reach_the_right_registry_path() -> None:
    asked: list[str] = []

    def get(url: str, **_: Any) -> Any:
        asked.append(url)
        raise __import__("requests").ConnectionError("offline")

    for image in ("digits:1.0", "team/digits@" + DIGEST, "localhost:5000/ml/digits", "ghcr.io/org/digits:2"):
        assert check_image(image, get).outcome == "fail"
    assert asked == [
        "https://registry-1.docker.io/v2/digits/manifests/1.0",
        f"https://registry-1.docker.io/v2/team/digits/manifests/{DIGEST}",
        "http://localhost:5000/v2/ml/digits/manifests/latest",
        "https://ghcr.io/v2/org/digits/manifests/2",
    ]


def test_cli_prints_one_line_per_check_and_exits_1_on_a_failure(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    edit_yaml(project / "handoff.yaml", lambda s: s.update(image="localhost:1/ml/digits:1"))
    result = handoff("doctor", cwd=project, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("FAIL  api server") for line in lines), lines
    assert any(
        line.startswith("FAIL  image") and "cannot reach registry localhost:1" in line for line in lines
    )
