"""`handoff compile`: the image CI pushed (by digest) and the labels every step's pod carries."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from handoff import __version__
from handoff.kube.images import is_image_reference
from handoff.labels import TEMPLATE_VERSION_LABEL, labels
from handoff.project import Project
from handoff.settings import IMAGE_ENV
from handoff.steps.train_launch import in_this_image

from .conftest import edit_yaml, handoff

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "0123456789abcdef" * 4
PINNED = f"registry.example.com/ml/digits-classifier@{DIGEST}"


def executor_images(pipeline_file: Path) -> set[str]:
    pipeline = next(yaml.safe_load_all(pipeline_file.read_text()))
    return {e["container"]["image"] for e in pipeline["deploymentSpec"]["executors"].values()}


@pytest.mark.parametrize(
    "image",
    [
        PINNED,
        "registry.example.com/ml/digits-classifier:1.4.2",
        f"registry.example.com:5000/ml/digits-classifier:1.4.2@{DIGEST}",
        "localhost:5000/digits-classifier",
        "digits-classifier",
        "[::1]:5000/ml/digits-classifier:v1",
    ],
)
def test_image_references_that_a_runtime_can_pull(image: str) -> None:
    assert is_image_reference(image)


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Registry.example.com/ML/digits-classifier",  # a repository path is lowercase
        "registry.example.com/ml/digits classifier",
        "https://registry.example.com/ml/digits-classifier",
        "registry.example.com/ml/digits-classifier:",
        "registry.example.com/ml/digits-classifier:-rc1",
        "registry.example.com/ml/digits-classifier@sha256:abc",  # too short to be a digest
        "registry.example.com/ml/",
    ],
)
def test_strings_that_are_not_image_references(image: str) -> None:
    assert not is_image_reference(image)


def test_image_option_pins_every_step_and_the_train_job(project: Path) -> None:
    edit_yaml(
        project / "handoff.yaml",
        lambda s: s["training"].update(nodes=2, job={"workspace_claim": "shared-workspace"}),
    )
    tagged = yaml.safe_load((project / "handoff.yaml").read_text())["image"]
    assert handoff("compile", "--out", "by-tag", cwd=project).returncode == 0
    result = handoff("compile", "--image", PINNED, cwd=project)
    assert result.returncode == 0, result.stderr
    assert executor_images(project / "compiled/pipeline.kfp.yaml") == {PINNED}
    # The train step hands its own image to the job it launches at run time.
    pipeline = next(yaml.safe_load_all((project / "compiled/pipeline.kfp.yaml").read_text()))
    train_env = pipeline["deploymentSpec"]["executors"]["exec-train"]["container"]["env"]
    assert {"name": IMAGE_ENV, "value": PINNED} in train_env
    job = yaml.safe_load((project / "compiled/train-job.yaml").read_text())
    assert job["spec"]["trainer"]["image"] == PINNED
    # The image is the only difference, with how it is pulled: a tag at every pod start (it may
    # have been pushed again), a digest once per node. handoff.yaml keeps its tag.
    for name in ("pipeline.kfp.yaml", "train-job.yaml"):
        by_tag = (project / "by-tag" / name).read_text()
        assert tagged in by_tag
        pinned = by_tag.replace(tagged, PINNED).replace("PullPolicy: Always", "PullPolicy: IfNotPresent")
        assert pinned == (project / "compiled" / name).read_text()
    assert "imagePullPolicy: Always" in (project / "by-tag/pipeline.kfp.yaml").read_text()
    assert yaml.safe_load((project / "handoff.yaml").read_text())["image"] == tagged


@pytest.mark.parametrize("image", ["", "Digits Classifier:latest", "registry.example.com/ml/x@sha256:abc"])
def test_a_bad_image_is_refused_naming_the_option(project: Path, image: str) -> None:
    result = handoff("compile", "--image", image, cwd=project)
    assert result.returncode == 1
    assert result.stderr.startswith("error: --image expects an image reference")
    assert repr(image) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "compiled").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("image", "said"),
    [
        ("registry.example.com/ml/digits-classifier", "has no tag"),
        ("registry.example.com/ml/digits-classifier:latest", "is tagged :latest"),
    ],
)
def test_compiling_an_untagged_or_latest_image_warns_and_says_to_pin_a_digest(
    project: Path, image: str, said: str
) -> None:
    result = handoff("compile", "--image", image, cwd=project)
    assert result.returncode == 0, result.stderr  # a warning: a dev cluster may run such an image
    assert (
        f"handoff: warning: image {image} {said}: every pod pulls whatever it points at when it starts"
        in result.stderr
    )
    assert "pass --image REPOSITORY@sha256:<digest>" in result.stderr
    for pinned in (PINNED, "registry.example.com/ml/digits-classifier:1.4.2"):
        quiet = handoff("compile", "--image", pinned, cwd=project)
        assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_the_train_step_launches_its_job_in_the_image_the_pipeline_gave_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = Project.load(project)
    monkeypatch.delenv(IMAGE_ENV, raising=False)
    assert in_this_image(loaded).settings.image == loaded.settings.image
    monkeypatch.setenv(IMAGE_ENV, PINNED)
    assert in_this_image(loaded).settings.image == PINNED


def test_every_step_pod_carries_the_project_and_template_version(project: Path) -> None:
    assert handoff("compile", cwd=project).returncode == 0
    ir, platform = yaml.safe_load_all((project / "compiled/pipeline.kfp.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(ir["deploymentSpec"]["executors"])
    for name, executor in executors.items():
        assert executor["podMetadata"]["labels"] == labels("digits-classifier"), name
    assert labels("digits-classifier")[TEMPLATE_VERSION_LABEL] == __version__
    assert f"(ml-template {__version__})" in ir["pipelineInfo"]["description"]
