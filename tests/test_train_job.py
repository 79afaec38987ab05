"""Multi-node training: the TrainJob / PyTorchJob the train step emits, launches and waits for.

The manifests are validated against the published CRD schemas (and their pod specs against the
Kubernetes Pod schema, strictly). Launching and waiting run through the real ``kubernetes``
client against ``tests/fake_kube.py``; in the end-to-end test its controller plays the operator
by starting every node's command as a real process with the ``PET_*`` variables Trainer injects,
so two "nodes" rendezvous and train with torch.distributed (gloo) on this machine.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import torch
import yaml

from handoff.errors import HandoffError
from handoff.kube import train_job
from handoff.kube.train_job import PYTORCHJOB, TRAINJOB, WORKSPACE, JobClient, job_manifest, train_on_cluster
from handoff.project import Project
from handoff.settings import PROJECT_DIR_IN_IMAGE
from handoff.step_entry import LOCAL_RUN_ENV
from handoff.steps import train_launch as train_launch_module
from handoff.steps.train_launch import train_step
from handoff_pipelines.graph import WORKSPACE_MOUNT

from .conftest import HANDOFF, edit_yaml, handoff, mlflow_state_restored
from .fake_kube import RESOURCES, FakeKube, condition, fake_kube

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
K8S_VERSION = "1.31.0"


def multi_node(project: Path, api: str = "trainjob", **training: Any) -> Project:
    def change(settings: dict[str, Any]) -> None:
        settings["training"].update(
            nodes=2,
            job={"api": api, "workspace_claim": "shared-workspace"},
            overrides={"epochs": 1},
            **training,
        )

    edit_yaml(project / "handoff.yaml", change)
    return Project.load(project)


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """What the CRD schema (strict about unknown fields) says about ``manifest``."""
    resource = next(r for r in RESOURCES if r.kind == manifest["kind"])
    return [e.message for e in resource.validator().iter_errors(manifest)]


def pod_errors(pod_spec: dict[str, Any]) -> list[str]:
    """Validate a pod spec as a Pod, strictly: unknown fields (typos) are errors too."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod_spec}
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


@pytest.mark.unit
def test_trainjob_manifest_is_valid_and_asks_for_what_handoff_yaml_says(project: Path) -> None:
    loaded = multi_node(
        project,
        gpus=4,
        cpu="8",
        memory="64Gi",
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    manifest = job_manifest(loaded, "train-digits-classifier-0123456789", "/app")
    assert schema_errors(manifest) == []
    trainer = manifest["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 4}
    assert trainer["command"][:4] == ["torchrun", "-m", "handoff", "train"]  # nodes from PET_* variables
    assert f"{WORKSPACE}/train-digits-classifier-0123456789/checkpoint.pt" in trainer["command"]
    assert manifest["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    (patch,) = manifest["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod_errors(pod) == []
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["shared-workspace"]


@pytest.mark.unit
def test_legacy_pytorchjob_is_one_master_and_workers_meeting_by_rendezvous(project: Path) -> None:
    multi_node(project, api="pytorchjob", gpus=2)
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(nodes=3))
    loaded = Project.load(project)
    manifest = job_manifest(loaded, "train-digits-classifier-0123456789", "/app")
    assert schema_errors(manifest) == []
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 2)
    assert manifest["spec"]["nprocPerNode"] == "2"
    (container,) = specs["Worker"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"
    assert "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in container["command"]
    assert "--nnodes=3" in container["command"]
    assert pod_errors(specs["Worker"]["template"]["spec"]) == []


@pytest.mark.unit
def test_job_names_are_rfc1035_and_stable_per_run() -> None:
    long_digit_first = "9" + "a" * 62
    for project in ("digits-classifier", long_digit_first, "a", "a-" * 31 + "b"):
        name = train_job.job_name(project, "run-1")
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        # What the operators name after it must stay DNS labels too: JobSet's pods (with a
        # 5-character suffix) and PyTorchJob's per-replica services.
        assert len(f"{name}-node-0-99-xxxxx") <= 63 and len(f"{name}-worker-999") <= 63, name
    assert train_job.job_name("p", "run-1") == train_job.job_name("p", "run-1")
    assert train_job.job_name("p", "run-1") != train_job.job_name("p", "run-2")


@pytest.mark.unit
@pytest.mark.parametrize("command", ["check", "compile", "train"])
def test_multi_node_without_a_shared_volume_is_refused_naming_the_field(project: Path, command: str) -> None:
    # Without a volume the nodes share, a restarted node would start over: no command gets past
    # handoff.yaml (check, compile which writes the job, train which the nodes run).
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(nodes=2))
    result = handoff(command, cwd=project)
    assert result.returncode == 1
    assert "handoff.yaml: line" in result.stderr
    assert "training.job.workspace_claim" in result.stderr and "ReadWriteMany" in result.stderr
    assert not (project / "compiled").exists() and not (project / "checkpoint.pt").exists()


@pytest.mark.unit
def test_bad_tolerations_and_quantities_are_refused(project: Path) -> None:
    edit_yaml(
        project / "handoff.yaml",
        lambda s: s["training"].update(memory="lots", tolerations=[{"key": "gpu", "operator": "Equals"}]),
    )
    result = handoff("check", cwd=project)
    assert result.returncode == 1
    assert "training.memory" in result.stderr and "'lots'" in result.stderr
    assert "training.tolerations[0].operator" in result.stderr and "'Equal' or 'Exists'" in result.stderr


def _fails_like_trainer(fake: FakeKube, obj: dict[str, Any]) -> None:
    name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
    fake.add_pod(f"{name}-node-0-0", {TRAINJOB.pod_label: name}, exit_code=0)
    fake.add_pod(
        f"{name}-node-0-1",
        {TRAINJOB.pod_label: name},
        exit_code=1,
        message="error: model.py: loss: loss() returned nan at epoch 1, step 3",
    )
    fake.set_status("trainjobs", namespace, name, condition("Failed", "FailedJobs", "jobset failed: node-0"))


@pytest.mark.unit
def test_a_failed_job_fails_the_step_with_the_jobs_and_the_nodes_reasons(
    project: Path, tmp_path: Path
) -> None:
    loaded = multi_node(project)
    with fake_kube(_fails_like_trainer) as fake, pytest.raises(HandoffError) as caught:
        train_on_cluster(
            loaded, tmp_path / "out.pt", run_key="r1", project_dir_in_image="/app",
            workspace=tmp_path, api=fake.api_client(), poll_s=0.05,
        )  # fmt: skip
    message = str(caught.value)
    assert re.search(r"TrainJob \S+/train-\S+ failed: Failed: FailedJobs: jobset failed", message)
    assert "node-0-1: error: model.py: loss: loss() returned nan at epoch 1, step 3" in message
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.unit
def test_a_retried_step_re_attaches_to_its_job_instead_of_starting_another(
    project: Path, tmp_path: Path
) -> None:
    loaded = multi_node(project)
    name = train_job.job_name(loaded.settings.project, "r1")
    files = tmp_path / name
    files.mkdir()
    torch.save({"model": {}}, files / "checkpoint.pt")
    (files / "record.json").write_text(json.dumps({"world_size": 2, "steps": 7}))
    with fake_kube() as fake:
        jobs = JobClient(TRAINJOB, loaded.settings.namespace, fake.api_client())
        jobs.create_or_attach(job_manifest(loaded, name, "/app"))  # the first attempt's launch
        fake.set_status(
            "trainjobs", loaded.settings.namespace, name, condition("Complete", "JobSetCompleted", "")
        )
        record = train_on_cluster(
            loaded, tmp_path / "out.pt", run_key="r1", project_dir_in_image="/app",
            workspace=tmp_path, api=fake.api_client(), poll_s=0.05,
        )  # fmt: skip
        posts = [path for method, path in fake.requests if method == "POST"]
    assert record == {"world_size": 2, "steps": 7}
    assert len(posts) == 2 and len(fake.objects) == 1  # the retry's create met 409 and attached
    assert (tmp_path / "out.pt").read_bytes() == (files / "checkpoint.pt").read_bytes()


@pytest.mark.unit
def test_polling_rides_out_a_restarting_api_server_but_not_forever(project: Path) -> None:
    loaded = multi_node(project)
    name = train_job.job_name(loaded.settings.project, "r1")
    with fake_kube() as fake:
        jobs = JobClient(TRAINJOB, loaded.settings.namespace, fake.api_client())
        jobs.create_or_attach(job_manifest(loaded, name, "/app"))
        fake.set_status("trainjobs", loaded.settings.namespace, name, condition("Complete", "Done", ""))
        fake.unavailable_gets = train_job.MAX_POLL_FAILURES - 1
        done = train_job.wait_for_job(jobs, name, timeout_s=60, sleep=lambda s: None)
        assert done["metadata"]["name"] == name
        fake.unavailable_gets = train_job.MAX_POLL_FAILURES
        expected = r"gave up on TrainJob .* after 30 failed polls in a row: HTTP 503"
        with pytest.raises(HandoffError, match=expected):
            train_job.wait_for_job(jobs, name, timeout_s=60, sleep=lambda s: None)


@pytest.mark.unit
def test_the_fake_api_server_refuses_a_misspelt_field(project: Path) -> None:
    manifest = job_manifest(multi_node(project), "train-x-1", "/app")
    manifest["spec"]["trainer"]["numNode"] = manifest["spec"]["trainer"].pop("numNodes")
    assert any("'numNode' was unexpected" in e for e in schema_errors(manifest))


@pytest.mark.unit
def test_a_job_past_its_timeout_is_deleted_and_the_step_says_so(project: Path, tmp_path: Path) -> None:
    loaded = multi_node(project)
    with fake_kube() as fake:
        jobs = JobClient(TRAINJOB, loaded.settings.namespace, fake.api_client())
        name = train_job.job_name(loaded.settings.project, "r1")
        jobs.create_or_attach(job_manifest(loaded, name, "/app"))
        ticks = iter(range(1000))
        with pytest.raises(
            HandoffError, match=r"did not finish within training.job.timeout_s = 5 s.*deleted"
        ):
            train_job.wait_for_job(jobs, name, timeout_s=5, clock=lambda: next(ticks), sleep=lambda s: None)
        assert fake.objects == {}


@pytest.mark.unit
def test_the_fake_api_server_rejects_what_the_crd_schema_rejects(project: Path) -> None:
    loaded = multi_node(project)
    manifest = job_manifest(loaded, "train-x-1", "/app")
    manifest["spec"]["trainer"]["numNodes"] = "two"
    with fake_kube() as fake:
        jobs = JobClient(TRAINJOB, loaded.settings.namespace, fake.api_client())
        with pytest.raises(HandoffError) as caught:
            jobs.create_or_attach(manifest)
    assert "could not create TrainJob" in str(caught.value)
    assert "HTTP 422" in str(caught.value) and "spec.trainer.numNodes: 'two' is not of type 'integer'" in str(
        caught.value
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def expand(arg: str, env: dict[str, str]) -> str:
    """What the kubelet does to ``$(VAR)`` in a container's command."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def run_nodes_here(workspace: Path) -> Any:
    """A controller that plays Trainer / training-operator: each node's command as a local process.

    Trainer v2 gives every node ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
    ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``; training-operator v1 gives ``MASTER_ADDR`` and
    ``MASTER_PORT``, which the kubelet expands in ``$(VAR)`` arguments. The volume's mount path is
    mapped to ``workspace``; a failed node's last ``error:`` line stands in for its termination message.
    """

    def run(fake: FakeKube, obj: dict[str, Any]) -> None:
        try:
            play(fake, obj)
        except Exception as exc:  # noqa: BLE001 - a broken controller must fail the job, not hang the test
            plural = "trainjobs" if obj["kind"] == "TrainJob" else "pytorchjobs"
            failed = condition("Failed", "ControllerError", repr(exc)[:500])
            fake.set_status(plural, obj["metadata"]["namespace"], obj["metadata"]["name"], failed)

    def play(fake: FakeKube, obj: dict[str, Any]) -> None:
        name, namespace, spec = obj["metadata"]["name"], obj["metadata"]["namespace"], obj["spec"]
        if obj["kind"] == "TrainJob":
            kind, plural, command = TRAINJOB, "trainjobs", spec["trainer"]["command"]
            nodes, per_node = spec["trainer"]["numNodes"], spec["trainer"]["numProcPerNode"]
        else:
            kind, plural = PYTORCHJOB, "pytorchjobs"
            replicas = spec["pytorchReplicaSpecs"]
            command = replicas["Master"]["template"]["spec"]["containers"][0]["command"]
            nodes = 1 + replicas.get("Worker", {}).get("replicas", 0)
            per_node = int(spec["nprocPerNode"])
        port = _free_port()
        processes = []
        for rank in range(nodes):
            env = {
                **os.environ,
                "PET_NNODES": str(nodes),
                "PET_NPROC_PER_NODE": str(per_node),
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            argv = [expand(arg, env) for arg in command]
            argv = [TORCHRUN, *(a.replace(str(WORKSPACE), str(workspace)) for a in argv[1:])]
            processes.append(
                subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        failed = False
        for rank, process in enumerate(processes):
            _, err = process.communicate(timeout=300)
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            fake.add_pod(f"{name}-node-{rank}", {kind.pod_label: name}, exit_code=process.returncode,
                         message=errors[-1] if errors else err[-300:])  # fmt: skip
            failed = failed or process.returncode != 0
        done = (
            condition("Failed", "FailedJobs", "a node failed")
            if failed
            else condition(kind.succeeded, "Done", "")
        )
        fake.set_status(plural, namespace, name, done)

    return lambda fake, obj: threading.Thread(target=run, args=(fake, obj), daemon=True).start()


@pytest.mark.local
@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_two_nodes_train_through_the_job_and_the_step_collects_the_model(
    project: Path, tmp_path: Path, api: str
) -> None:
    loaded = multi_node(project, api=api)
    workspace = tmp_path / "workspace"
    with fake_kube(run_nodes_here(workspace)) as fake:
        record = train_on_cluster(
            loaded, tmp_path / "out.pt", run_key="run-1", project_dir_in_image=str(project),
            workspace=workspace, api=fake.api_client(), poll_s=0.2,
        )  # fmt: skip
    assert record["world_size"] == 2 and record["epochs"] == 1
    assert record["val_metrics"]["accuracy"] > 0.5
    saved = torch.load(tmp_path / "out.pt", map_location="cpu", weights_only=True)
    assert saved["steps"] == record["steps"] and saved["model"]


@pytest.mark.local
def test_a_local_run_trains_here_whatever_training_nodes_says(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    multi_node(project)
    monkeypatch.setenv(LOCAL_RUN_ENV, "1")
    result = train_step(project, tmp_path / "out.pt", run_key="local")
    assert result.world_size == 1 and (tmp_path / "out.pt").is_file()
    assert "training.nodes = 2 applies on a cluster" in capsys.readouterr().err


@pytest.mark.local
def test_train_writes_the_record_the_step_collects(project: Path) -> None:
    result = subprocess.run(
        [HANDOFF, "train", "--set", "epochs=1", "--record", "rec.json"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((project / "rec.json").read_text())["world_size"] == 1


@pytest.mark.unit
def test_compile_emits_the_train_job_and_mounts_its_volume_in_the_train_step(project: Path) -> None:
    multi_node(project, gpus=8)
    first = handoff("compile", cwd=project)
    assert first.returncode == 0, first.stderr
    assert "wrote compiled/train-job.yaml" in first.stdout
    job_text = (project / "compiled/train-job.yaml").read_text()
    manifest = yaml.safe_load(job_text)
    assert manifest["kind"] == "TrainJob" and schema_errors(manifest) == []
    assert manifest["spec"]["trainer"]["numProcPerNode"] == 8
    command = manifest["spec"]["trainer"]["command"]
    assert command[command.index("--project") + 1] == PROJECT_DIR_IN_IMAGE
    pipeline = list(yaml.safe_load_all((project / "compiled/pipeline.kfp.yaml").read_text()))
    (platform,) = [doc for doc in pipeline if "platforms" in doc]
    train_config = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert train_config["pvcMount"][0]["mountPath"] == str(WORKSPACE) == WORKSPACE_MOUNT
    assert "shared-workspace" in json.dumps(train_config["pvcMount"][0])
    pipeline_text = (project / "compiled/pipeline.kfp.yaml").read_text()
    assert f"Contract sha256 {Project.load(project).contract.sha256}" in pipeline_text
    assert handoff("compile", cwd=project).returncode == 0  # deterministic: same bytes again
    assert (project / "compiled/pipeline.kfp.yaml").read_text() == pipeline_text
    assert (project / "compiled/train-job.yaml").read_text() == job_text
    edit_yaml(
        project / "handoff.yaml",
        lambda s: s["training"].update(
            nodes=1,
            gpus=2,
            node_selector={"pool": "gpu"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
    )
    assert handoff("compile", cwd=project).returncode == 0
    assert not (project / "compiled/train-job.yaml").exists()  # one node trains inside the step
    pipeline, platform = yaml.safe_load_all((project / "compiled/pipeline.kfp.yaml").read_text())
    resources = pipeline["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    accelerator = resources["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
    assert resources["resourceCpuLimit"] == "2" and resources["resourceMemoryLimit"] == "8Gi"
    train_config = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert train_config["nodeSelector"]["labels"] == {"pool": "gpu"}
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert train_config["tolerations"] == [gpu_taint]
    # The claim is still set: one node keeps its resumable state there.
    assert [mount["mountPath"] for mount in train_config["pvcMount"]] == [WORKSPACE_MOUNT]


@pytest.mark.local
def test_one_node_with_a_workspace_claim_mounts_it_and_keeps_its_state_there(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claimed = {"workspace_claim": "shared-workspace"}
    edit_yaml(project / "handoff.yaml", lambda s: s["training"].update(job=claimed, overrides={"epochs": 1}))
    compiled = handoff("compile", "--target", "all", cwd=project)
    assert compiled.returncode == 0, compiled.stderr
    _, platform = yaml.safe_load_all((project / "compiled/pipeline.kfp.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert [m["mountPath"] for m in executors["exec-train"]["pvcMount"]] == [WORKSPACE_MOUNT]
    assert "pvcMount" not in executors["exec-export"]
    argo = yaml.safe_load((project / "compiled/workflow-template.argo.yaml").read_text())
    (claim,) = [v for v in argo["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"] == {"claimName": "shared-workspace"}
    templates = {t["name"]: t["container"] for t in argo["spec"]["templates"] if "container" in t}
    mounts = {name: [m["name"] for m in c["volumeMounts"]] for name, c in templates.items()}
    assert claim["name"] in mounts["train"] and claim["name"] not in mounts["export"]
    args = templates["train"]["args"]
    assert args[args.index("--run-key") + 1] == "{{workflow.uid}}"

    # The step (here with the claim at a folder of this machine) keeps its state on the claim, in
    # the run's folder: a retried pod mounts the same claim and resumes; nothing goes to MLflow.
    workspace = tmp_path / "workspace"
    monkeypatch.setattr(train_launch_module, "WORKSPACE", workspace)
    with mlflow_state_restored():
        result = train_step(project, tmp_path / "out.pt", run_key="run-1")
    states = workspace / train_job.job_name("digits-classifier", "run-1") / "train-state"
    assert result.resumed_from_step == 0 and list(states.glob("step-*.pt"))
    assert not list(project.glob("mlartifacts/**/train-state/*"))
    with mlflow_state_restored():
        again = train_step(project, tmp_path / "again.pt", run_key="run-1")
    assert again.resumed_from_step == result.steps  # a later attempt of the run finds it
