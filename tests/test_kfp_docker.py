"""The kfp.local DockerRunner wrapper (``tests/rehearsal/kfp_docker.py``) proved on a tiny pipeline.

What a rehearsal of the project's pipeline relies on: a failed step is reported FAILURE (kfp.local
over podman would log it SUCCESS); steps run as their pods would (uid 10001, read-only root, no
capabilities, their limits); the env from Secrets and from the cluster arrives; a missing Secret
fails its step before a container starts; no container is left behind.

No ``from __future__ import annotations``: KFP reads the components' annotations when they are
defined.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import json_format
from kfp import dsl, kubernetes

from handoff.project import Project

from .rehearsal.kfp_docker import FAILURE, LABEL, SUCCESS, project_pipeline, run_pipeline, step_config
from .rehearsal.podman import Podman, quantity

if TYPE_CHECKING:  # imported by pytest as a plugin (below), not before it
    from .rehearsal.fixtures import RehearsalImages

SECRETS = {"creds": {"token": "s3cr3t"}}
EXTRA_ENV = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}


def probe_pipeline(image: str) -> Any:
    """produce -> consume -> fail -> never: an artifact handed on, then a step that writes to the
    (read-only) root and so exits non-zero, then one that must not run."""

    def component(function: Any) -> Any:
        return dsl.component(function, base_image=image, install_kfp_package=False)

    @component
    def produce(greeting: str, data: dsl.Output[dsl.Artifact]) -> None:
        import errno
        import json
        import os

        try:  # /var/tmp is world-writable in the image: only a read-only root refuses it
            open("/var/tmp/probe", "w").close()
            var_tmp = "written"
        except OSError as error:
            var_tmp = errno.errorcode[error.errno]
        names = ("TOKEN", "STEP", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
        found = {
            "greeting": greeting,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "var_tmp": var_tmp,
            "env": {name: os.environ.get(name) for name in names},
        }
        with open(data.path, "w") as out:
            json.dump(found, out)

    @component
    def consume(data: dsl.Input[dsl.Artifact], record: dsl.Output[dsl.Artifact]) -> None:
        import json

        with open(data.path) as given, open(record.path, "w") as out:
            json.dump({"read": json.load(given)}, out)

    @component
    def fail() -> None:
        open("/var/tmp/probe", "w").close()  # OSError: Read-only file system

    @component
    def never() -> None:
        pass

    @dsl.pipeline(name="kfp-docker-probe")
    def probe(greeting: str) -> None:
        produced = produce(greeting=greeting)
        produced.set_env_variable(name="STEP", value="produce")
        produced.set_cpu_limit("500m").set_memory_limit("512Mi")
        kubernetes.use_secret_as_env(produced, secret_name="creds", secret_key_to_env={"token": "TOKEN"})
        consumed = consume(data=produced.outputs["data"])
        failed = fail().after(consumed)
        never().after(failed)

    return probe


def specs(pipeline: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compiled IR and kfp-kubernetes platform spec, as ``run_pipeline`` reads them."""
    pipeline_spec = json_format.MessageToDict(pipeline.pipeline_spec)
    return pipeline_spec, json_format.MessageToDict(pipeline.platform_spec)


def left_over(podman: Podman, run_id: str) -> list[str]:
    listed = podman.call("ps", "-a", "--filter", f"label={LABEL}={run_id}", "--format", "{{.Names}}")
    return listed.stdout.split()


@pytest.mark.unit
def test_step_config_reads_what_the_pod_would_get() -> None:
    pipeline_spec, platform_spec = specs(probe_pipeline("unused:1"))
    config = step_config(pipeline_spec, platform_spec, "produce", SECRETS)
    assert config.env == {"TOKEN": "s3cr3t"} and config.missing == ()
    assert (config.user, config.nano_cpus, config.mem_limit) == ("10001:10001", 500_000_000, 512 * 2**20)
    assert set(config.tmpfs) == {"/tmp", "/run", "/var/tmp"} and config.tmpfs["/var/tmp"] == "ro"
    missing = step_config(pipeline_spec, platform_spec, "produce", {"creds": {}})
    assert missing.missing == ('couldn\'t find key token in Secret "creds" (for TOKEN)',)
    assert step_config(pipeline_spec, platform_spec, "consume", {}).nano_cpus is None


@pytest.mark.unit
def test_the_projects_pipeline_gives_train_shared_memory(default_project: Path) -> None:
    project = Project.load(default_project)
    pipeline_spec, platform_spec = specs(project_pipeline(project, "localhost/unused:1"))
    train = step_config(pipeline_spec, platform_spec, "train", {})
    assert train.user == "10001:10001" and train.mem_limit == int(quantity(project.settings.training.memory))
    export = step_config(pipeline_spec, platform_spec, "export", {})
    assert "/dev/shm" in train.tmpfs and "/dev/shm" not in export.tmpfs


@pytest.mark.unit
def test_extra_env_may_not_change_what_was_compiled(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="STEP"):
        run_pipeline(
            probe_pipeline("unused:1"),
            {"greeting": "hi"},
            docker_host="unix:///nowhere.sock",
            pipeline_root=tmp_path,
            extra_env={"STEP": "other"},
        )


@pytest.mark.rehearsal
@pytest.mark.slow
def test_steps_run_as_pods_and_failures_are_reported(
    podman: Podman, docker_host: str, rehearsal_images: "RehearsalImages", tmp_path: Path
) -> None:
    run = run_pipeline(
        probe_pipeline(rehearsal_images.platform.ref),
        {"greeting": "hello"},
        docker_host=docker_host,
        pipeline_root=tmp_path / "root",
        secrets=SECRETS,
        extra_env=EXTRA_ENV,
    )
    assert run.status == FAILURE, run.log
    assert {name: task.status for name, task in run.tasks.items()} == {
        "produce": SUCCESS,
        "consume": SUCCESS,
        "fail": FAILURE,
    }, run.log  # `never` never ran
    assert run.tasks["fail"].exit_code != 0 and "Read-only file system" in run.tasks["fail"].log

    produced = json.loads(run.tasks["produce"].outputs["data"].read_text())
    assert run.records == {"consume": {"read": produced}}
    assert run.tasks["consume"].outputs["record"].is_relative_to(run.pipeline_root)
    assert produced["uid"] == produced["gid"] == 10001 and produced["var_tmp"] == "EROFS"
    assert produced["env"] == {
        "TOKEN": "s3cr3t",
        "STEP": "produce",
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "6443",
    }

    assert [container.task for container in run.containers] == ["produce", "consume", "fail"]
    for container in run.containers:
        assert (container.user, container.read_only, container.network_mode) == ("10001:10001", True, "host")
        assert container.image == rehearsal_images.platform.ref
        assert "no-new-privileges" in container.security_opt and "SYS_CHROOT" in container.cap_drop
        assert "/tmp" in container.tmpfs and not any("pip install" in part for part in container.command)
    limited = run.containers[0]
    assert (limited.nano_cpus, limited.memory) == (500_000_000, 512 * 2**20)
    assert "TOKEN" in limited.env_keys and "TOKEN" not in run.containers[1].env_keys
    assert left_over(podman, run.run_id) == []


@pytest.mark.rehearsal
def test_a_missing_secret_fails_its_step_before_a_container_starts(
    podman: Podman, docker_host: str, tmp_path: Path
) -> None:
    run = run_pipeline(
        probe_pipeline("localhost/never-started:1"),
        {"greeting": "hello"},
        docker_host=docker_host,
        pipeline_root=tmp_path / "root",
        secrets={},
    )
    assert run.status == FAILURE and run.containers == []
    produce = run.tasks["produce"]
    assert (produce.status, produce.exit_code) == (FAILURE, None)
    assert produce.error == 'CreateContainerConfigError: secret "creds" not found (for TOKEN)'
    assert produce.error in run.log and list(run.tasks) == ["produce"]
    assert left_over(podman, run.run_id) == []
