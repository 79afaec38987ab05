"""Answers as a user gives them to the real `cookiecutter` command: a bad one ends in one line.

Every invalid answer, a choice included, must stop generation with exit status 1, one line that
names the answer and the rule (no traceback, nothing on stdout), and no project folder. A value
derived from another answer (package_name from project) is blamed only when the user gave it;
otherwise the line is about the answer it came from. Valid registries and tracking URIs of each
accepted form must generate.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, TEMPLATE

COOKIECUTTER = str(BIN / "cookiecutter")
DNS_RULE = (
    "is not a DNS-1123 label: use lowercase letters, digits and '-', start and end with a letter or "
    "digit, at most 63 characters"
)
REGISTRY_RULE = "is not an image name prefix such as registry.example.com/team or localhost:5000/team"
PATH_RULE = "is not a path component (lowercase letters and digits, joined by '.', '_', '__' or '-')"


def cookiecutter(output: Path, *answers: str) -> subprocess.CompletedProcess[str]:
    """`cookiecutter <template> --no-input key=value...`, run from an empty folder as a user runs it."""
    return subprocess.run(
        [COOKIECUTTER, str(TEMPLATE), "--no-input", "--output-dir", str(output), *answers],
        cwd=output,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.unit  # refused before the project folder exists: under a second each
@pytest.mark.parametrize(
    ("answer", "line"),
    [
        ("orchestrator=airflow", "ERROR: orchestrator 'airflow' must be one of: kfp, argo, both"),
        (
            "starter=vision",
            "ERROR: starter 'vision' must be one of: image-classification, text-classification, "
            "tabular-regression",
        ),
        ("namespace=Bad_NS", f"ERROR: namespace 'Bad_NS' {DNS_RULE}"),
        # package_name is derived from project: only project is wrong.
        ("project=My_Project!", f"ERROR: project 'My_Project!' {DNS_RULE}"),
        # A slug derived from the project name: said about project_name, the answer given.
        (
            "project_name=Team Model!",
            f"ERROR: project_name 'Team Model!' gives project 'team-model!', which {DNS_RULE}; "
            "choose another project_name or give project yourself",
        ),
        # A valid project whose derived package name is not: said about project, the answer given.
        (
            "project=import",
            "ERROR: project 'import' gives package_name 'import', which is not a Python identifier "
            "that is also a valid package name: use ASCII letters, digits and '_', starting with a "
            "letter and not ending with '_'; choose another project or give package_name yourself",
        ),
        (
            "container_registry=https://registry.example.com/team",
            f"ERROR: container_registry 'https://registry.example.com/team' {REGISTRY_RULE}: "
            "drop the scheme 'https://'",
        ),
        (
            "container_registry=te$am",
            f"ERROR: container_registry 'te$am' {REGISTRY_RULE}: 'te$am' {PATH_RULE}",
        ),
        (
            "container_registry=-bad/x",
            f"ERROR: container_registry '-bad/x' {REGISTRY_RULE}: '-bad' {PATH_RULE}",
        ),
        (
            "container_registry=registry.example.com/Team",
            f"ERROR: container_registry 'registry.example.com/Team' {REGISTRY_RULE}: use lowercase",
        ),
        (
            "container_registry=registry.example.com/team/",
            f"ERROR: container_registry 'registry.example.com/team/' {REGISTRY_RULE}: drop the trailing '/'",
        ),
        (
            "container_registry=registry.example.com:port/team",
            f"ERROR: container_registry 'registry.example.com:port/team' {REGISTRY_RULE}: "
            "'registry.example.com:port' is not a registry host (a DNS name, localhost or an IP "
            "address, then an optional :port)",
        ),
        (
            "mlflow_tracking_uri=http://",
            "ERROR: mlflow_tracking_uri 'http://' needs a host, as in http://mlflow.example.com:5000",
        ),
        (
            "mlflow_tracking_uri=databricksfoo",
            "ERROR: mlflow_tracking_uri 'databricksfoo' must be databricks or databricks://<profile>",
        ),
        (
            "mlflow_tracking_uri=sqlite:///",
            "ERROR: mlflow_tracking_uri 'sqlite:///' needs a database file after sqlite:///, as in "
            "sqlite:///mlflow.db",
        ),
        (
            "mlflow_tracking_uri=file:",
            "ERROR: mlflow_tracking_uri 'file:' needs a path, as in file:///srv/mlruns",
        ),
        (
            "mlflow_tracking_uri=postgresql://db/mlflow",
            "ERROR: mlflow_tracking_uri 'postgresql://db/mlflow' must start with one of the schemes "
            "this template accepts: sqlite:///<path>, http://<host>, https://<host>, file:<path>, "
            "databricks or databricks://<profile>",
        ),
    ],
    ids=[
        "orchestrator",
        "starter",
        "namespace",
        "project",
        "derived-slug",
        "derived-package",
        "registry-scheme",
        "registry-character",
        "registry-dash",
        "registry-uppercase",
        "registry-trailing-slash",
        "registry-port",
        "tracking-no-host",
        "tracking-databricks",
        "tracking-sqlite-no-path",
        "tracking-file-no-path",
        "tracking-scheme",
    ],
)
def test_an_invalid_answer_ends_in_one_line_and_no_project(answer: str, line: str, tmp_path: Path) -> None:
    made = cookiecutter(tmp_path, answer)
    assert made.returncode == 1, made.stdout + made.stderr
    assert "Traceback" not in made.stdout + made.stderr
    assert made.stderr.splitlines() == [line]
    assert made.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_each_invalid_answer_gets_its_own_line(tmp_path: Path) -> None:
    made = cookiecutter(tmp_path, "namespace=Bad_NS", "orchestrator=airflow")
    assert made.returncode == 1
    assert made.stderr.splitlines() == [
        "ERROR: orchestrator 'airflow' must be one of: kfp, argo, both",
        f"ERROR: namespace 'Bad_NS' {DNS_RULE}",
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bake
@pytest.mark.parametrize(
    ("registry", "tracking"),
    [("localhost:5000/team", "databricks"), ("ghcr.io/org/sub-team", "https://mlflow.example.com")],
    ids=["port-databricks", "nested-https"],
)
def test_valid_registries_and_tracking_uris_generate(registry: str, tracking: str, tmp_path: Path) -> None:
    made = cookiecutter(
        tmp_path, "orchestrator=argo", f"container_registry={registry}", f"mlflow_tracking_uri={tracking}"
    )
    assert made.returncode == 0, made.stdout + made.stderr
    settings = yaml.safe_load((tmp_path / "digits-classifier" / "handoff.yaml").read_text())
    assert settings["image"].startswith(f"{registry}/digits-classifier:")
    assert settings["mlflow"]["tracking_uri"] == tracking
    assert settings["orchestrator"] == "argo"
