"""A pruned matrix of answers: each project is generated, then checked the way its user checks it.

Five projects instead of the full product of answers: together they cover every orchestrator,
names that are odd but pass the hook (non-ASCII project names, a slug and package name derived
from punctuation, a slug at the 63-character limit with a digit right after its first letter, an
all-digit namespace, a non-ASCII package name), non-default namespaces, registries and MLflow
tracking URIs. The default project is covered by test_bake.py and not repeated here.

Each project runs in one test, in the order a user meets the checks: `handoff check`, what the
answers became in its files, ruff (lint and format, with the project's own config), its own
pytest, `handoff compile`. The costs (two CPU cores) set the pruning:

* bake, ruff, compile and the file checks: about 2 s a project, so every project gets them;
* `handoff check`: about 8 s (half of it imports), and it is where a bad answer shows first, so
  every project gets it;
* the project's pytest: about 15 s, and it re-runs `handoff check` in process, then exports and
  scores model.py, which no answer changes beyond the project name in its docstring; it runs
  once, on the project whose model.py carries a non-ASCII name. (Each starter's own tests and
  check run in test_starters.py.)

The file costs about a minute on two cores (about 70 s once every project passes).

One project also switches to multi-node training before compiling, so the compiled train job
shows the namespace and a job name cut to fit the Kubernetes limit from a 63-character slug.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.utils import InvalidName, canonicalize_name

from handoff.project import Project

from .conftest import BIN, TEMPLATE, edit_yaml, generate, handoff, project_tests

pytestmark = [pytest.mark.bake, pytest.mark.slow]

RUFF = str(BIN / "ruff")
# The Kubernetes limit on a DNS-1123 label, and a slug that uses all of it; a digit comes right after
# its first letter (KServe's InferenceService names must start with a letter).
LABEL_MAX = 63
LONG_SLUG = "d3-handwritten-digit-recognition-for-postal-codes-and-forms-v21"
assert len(LONG_SLUG) == LABEL_MAX
# Answers a case leaves out take the template's defaults (the first option of a choice).
DEFAULTS = {
    key: value[0] if isinstance(value, list) else value
    for key, value in json.loads((TEMPLATE / "cookiecutter.json").read_text()).items()
}


@dataclass(frozen=True, kw_only=True)
class Case:
    """One generated project: the answers given and what they must become."""

    answers: dict[str, str]
    slug: str  # the folder, handoff.yaml's project and contract.yaml's name
    package: str  # pyproject.toml's [project] name
    run_pytest: bool = False
    multi_node: bool = False  # compile a multi-node train job too

    def answer(self, name: str) -> str:
        return self.answers.get(name, DEFAULTS[name])


MATRIX = [
    pytest.param(
        Case(
            answers={
                "project_name": "Zählwerk: Ziffern für Ärzte (v2)",
                "project": "zaehlwerk-v2",
                "package_name": "zaehlwerk",
                "description": "Erkennt handgeschriebene Ziffern – klein & schnell.",
                "orchestrator": "kfp",
                "namespace": "forschung-2",
                "container_registry": "localhost:5000/team-a",
            },
            slug="zaehlwerk-v2",
            package="zaehlwerk",
            run_pytest=True,
        ),
        id="kfp-non-ascii-name",
    ),
    pytest.param(
        Case(
            # No slug or package name given: both are derived from the project name.
            answers={
                "project_name": "R2_D2 Digits v2",
                "orchestrator": "argo",
                "namespace": "argo-workflows",
                "container_registry": "ghcr.io/acme-research/models",
                "mlflow_tracking_uri": "sqlite:///tracking-v2.db",
            },
            slug="r2-d2-digits-v2",
            package="r2_d2_digits_v2",
        ),
        id="argo-derived-names",
    ),
    pytest.param(
        Case(
            answers={
                "project_name": "3D Handwritten Digits",
                "project": LONG_SLUG,
                "package_name": "digits3d",
                "orchestrator": "both",
                "namespace": "n" * LABEL_MAX,
                "container_registry": "europe-west4-docker.pkg.dev/acme-ml/models",
                "mlflow_tracking_uri": "http://mlflow.mlflow.svc.cluster.local:5000",
            },
            slug=LONG_SLUG,
            package="digits3d",
            multi_node=True,
        ),
        id="both-63-char-slug",
    ),
    pytest.param(
        Case(
            # An all-digit namespace: a valid DNS-1123 label that YAML would read as a number
            # unless quoted (a slug must start with a letter: test_bake.py).
            answers={
                "project_name": "Game 2048",
                "package_name": "game_2048",
                "namespace": "2048",
                "orchestrator": "kfp",
            },
            slug="game-2048",
            package="game_2048",
        ),
        id="kfp-all-digit-namespace",
    ),
]


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def is_distribution_name(name: str) -> bool:
    """Whether ``name`` is valid as pyproject.toml's [project] name (PEP 508: ASCII only)."""
    try:
        canonicalize_name(name, validate=True)
    except InvalidName:
        return False
    return True


def assert_answers_reached_the_files(project: Path, case: Case) -> None:
    settings = yaml.safe_load((project / "handoff.yaml").read_text())
    version = settings["template_version"]
    expected = {
        "project": case.slug,
        "orchestrator": case.answer("orchestrator"),
        "namespace": case.answer("namespace"),
        "image": f"{case.answer('container_registry')}/{case.slug}:{version}",
        "mlflow": {"tracking_uri": case.answer("mlflow_tracking_uri"), "experiment": case.slug},
    }
    assert {key: settings[key] for key in expected} == expected, "handoff.yaml"
    assert yaml.safe_load((project / "contract.yaml").read_text())["name"] == case.slug, "contract.yaml"

    name = tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]
    assert name == case.package, "pyproject.toml"
    assert is_distribution_name(name), f"pyproject.toml: [project] name {name!r} fails `pip install .`"

    project_name = case.answer("project_name")
    assert (project / "model.py").read_text().startswith(f'"""{project_name}: ')
    assert (project / "README.md").read_text().startswith(f"# {project_name}\n")
    assert f"# Model card: {project_name}\n" in (project / "model_card.md").read_text()


def assert_compiled(project: Path, case: Case) -> None:
    """What `handoff compile` wrote for the project's orchestrator names its image and contract."""
    compiled = project / "compiled"
    image = yaml.safe_load((project / "handoff.yaml").read_text())["image"]
    contract_sha256 = Project.load(project).contract.sha256  # of its content: comments do not count
    orchestrator = case.answers.get("orchestrator", "kfp")
    kfp_file, argo_file = compiled / "pipeline.kfp.yaml", compiled / "workflow-template.argo.yaml"
    assert kfp_file.exists() is (orchestrator in ("kfp", "both"))
    assert argo_file.exists() is (orchestrator in ("argo", "both") and not case.multi_node)
    if kfp_file.exists():
        pipeline = next(yaml.safe_load_all(kfp_file.read_text()))
        executors: dict[str, Any] = pipeline["deploymentSpec"]["executors"]
        assert {e["container"]["image"] for e in executors.values()} == {image}
        assert contract_sha256 in pipeline["pipelineInfo"]["description"]
    if argo_file.exists():
        template = yaml.safe_load(argo_file.read_text())
        assert template["metadata"]["namespace"] == case.answer("namespace")
        images = {t["container"]["image"] for t in template["spec"]["templates"] if "container" in t}
        assert images == {image}
        assert contract_sha256 in template["metadata"]["annotations"]["workflows.argoproj.io/description"]

    job_file = compiled / "train-job.yaml"
    if not case.multi_node:
        assert not job_file.exists()
        return
    job = yaml.safe_load(job_file.read_text())
    metadata = job["metadata"]
    assert metadata["namespace"] == case.answer("namespace")
    assert metadata["labels"]["app.kubernetes.io/name"] == case.slug
    assert metadata["name"].startswith("train-") and len(metadata["name"]) <= LABEL_MAX
    assert job["spec"]["trainer"]["image"] == image


def use_two_nodes(settings: dict[str, Any]) -> None:
    settings["training"]["nodes"] = 2
    settings["training"]["job"]["workspace_claim"] = "shared-checkpoints"


@pytest.mark.parametrize("case", MATRIX)
def test_generated_project_passes_its_own_checks(tmp_path: Path, case: Case) -> None:
    project = generate(tmp_path, **case.answers)
    assert project.name == case.slug

    checked = handoff("check", cwd=project)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    assert_answers_reached_the_files(project, case)

    for command in ([RUFF, "check", "."], [RUFF, "format", "--check", "."]):
        linted = run(command, cwd=project)
        assert linted.returncode == 0, linted.stdout + linted.stderr

    if case.run_pytest:
        tested = project_tests(project)
        assert tested.returncode == 0, tested.stdout[-3000:]

    target: list[str] = []
    if case.multi_node:
        edit_yaml(project / "handoff.yaml", use_two_nodes)
        # Multi-node training launches a TrainJob from the KFP train step; Argo says so and stops.
        refused = handoff("compile", "--target", "argo", cwd=project)
        assert refused.returncode == 1 and "training.nodes" in refused.stderr, refused.stderr
        target = ["--target", "kfp"]
    compiled = handoff("compile", *target, cwd=project)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert_compiled(project, case)
