"""The platform and project Dockerfiles: linted, and their build steps run here without Docker.

No Docker engine is available, so each image is checked three ways: hadolint lints the file; the
file's own instructions are read (numeric non-root user, the platform base at the pinned
version, the git sha build argument); and its ``RUN`` commands are executed as ``/bin/sh -c``
would run them in the build, with the image's paths (``/opt/handoff``, ``/app``) mapped to a
fresh virtual environment and a copy of the build context. The environment that comes out must
run ``handoff check`` on a generated project, as the project image would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from handoff import __version__

from .conftest import TEMPLATE, replace_in

pytestmark = pytest.mark.bake

PLATFORM_DOCKERFILE = TEMPLATE / "components" / "Dockerfile"
HADOLINT = str(Path(sys.executable).parent / "hadolint")
NUMERIC_NON_ROOT = re.compile(r"^[1-9][0-9]*(:[0-9]+)?$")
# What .dockerignore keeps out of the platform build's context.
BUILD_NOISE = shutil.ignore_patterns("__pycache__", "*.egg-info", ".mypy_cache", "Dockerfile")


def instructions(dockerfile: Path, name: str) -> list[str]:
    return [i["value"] for i in DockerfileParser(str(dockerfile)).structure if i["instruction"] == name]


def last_stage_user(dockerfile: Path) -> str:
    """The USER the final stage runs as (what a pod gets without a securityContext)."""
    structure = DockerfileParser(str(dockerfile)).structure
    last_from = max(n for n, i in enumerate(structure) if i["instruction"] == "FROM")
    users = [i["value"] for i in structure[last_from:] if i["instruction"] == "USER"]
    assert users, f"{dockerfile}: the final stage sets no USER"
    return users[-1]


def copy_into(source: Path, context: Path, destination: str) -> None:
    """One COPY source, as the builder copies it: a folder's content into ``destination``; a file
    into it when it ends with ``/``, else to that path."""
    if source.is_dir():
        shutil.copytree(source, context / destination, ignore=BUILD_NOISE, dirs_exist_ok=True)
        return
    target = context / destination / source.name if destination.endswith("/") else context / destination
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def run_build_step(command: str, cwd: Path, paths: dict[str, Path], env: dict[str, str]) -> None:
    """One RUN instruction through /bin/sh -c, as the builder runs it, with image paths mapped."""
    for image_path, here in paths.items():
        command = command.replace(image_path, str(here))
    result = subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("which", ["platform", "project"])
def test_dockerfiles_pass_hadolint_and_run_as_a_numeric_non_root_user(
    which: str, default_project: Path
) -> None:
    dockerfile = PLATFORM_DOCKERFILE if which == "platform" else default_project / "Dockerfile"
    linted = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert NUMERIC_NON_ROOT.match(last_stage_user(dockerfile)), last_stage_user(dockerfile)


def test_hadolint_reports_a_root_user_and_an_unpinned_install(tmp_path: Path) -> None:
    """The lint can fail: the mistakes it exists to catch are reported with their rule and line."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\nUSER root\n")
    linted = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True)
    assert linted.returncode != 0
    assert "Dockerfile:2 DL3013" in linted.stdout and "Dockerfile:3 DL3002" in linted.stdout, linted.stdout


def test_project_image_builds_on_the_platform_image_at_the_pinned_version(default_project: Path) -> None:
    dockerfile = default_project / "Dockerfile"
    (base_arg,) = [a for a in instructions(dockerfile, "ARG") if a.startswith("PLATFORM_IMAGE=")]
    assert base_arg.endswith(f"/ml-handoff:{__version__}")
    assert instructions(dockerfile, "FROM") == ["${PLATFORM_IMAGE}"]
    assert "HANDOFF_GIT_SHA=unknown" in instructions(dockerfile, "ARG")
    assert "HANDOFF_GIT_SHA=${HANDOFF_GIT_SHA}" in instructions(dockerfile, "ENV")
    assert f"ARG VERSION={__version__}\n" in PLATFORM_DOCKERFILE.read_text()
    # The user the platform image creates is the one the project image and the pods run as.
    assert last_stage_user(dockerfile) == last_stage_user(PLATFORM_DOCKERFILE)


@pytest.mark.slow
def test_build_steps_install_the_pinned_platform_and_run_a_project(
    default_project: Path, tmp_path: Path
) -> None:
    """The platform build's RUN, then the project build's RUN, in a fresh venv: then ``handoff check``."""
    context = tmp_path / "context"
    context.mkdir()
    venv = tmp_path / "opt-handoff"
    python_dir = str(Path(sys.executable).resolve().parent)
    build_env = {"PATH": f"{python_dir}:{os.environ['PATH']}", "TORCH_INDEX_URL": ""}
    # The build stage's COPY and RUN instructions in order: the dependency layer sees only the lock
    # and the pyproject files, the code layer the packages' code.
    build_stage = DockerfileParser(str(PLATFORM_DOCKERFILE)).structure
    build_stage = build_stage[: [n for n, i in enumerate(build_stage) if i["instruction"] == "FROM"][1]]
    runs = 0
    for step in build_stage:
        if step["instruction"] == "COPY":
            *sources, destination = step["value"].split()
            for source in sources:
                copy_into(TEMPLATE / source, context, destination)
        elif step["instruction"] == "RUN":
            run_build_step(step["value"], context, {"/opt/handoff": venv}, build_env)
            runs += 1
    assert runs == 2  # the dependency layer, then the packages' code over it
    assert (venv / "constraints.txt").read_text() == (TEMPLATE / "requirements/lock.txt").read_text()

    app = tmp_path / "app"
    app.mkdir()
    shutil.copy2(default_project / "pyproject.toml", app)
    # As a project generated from a template repository pins the platform (here a file:// address,
    # which older pips cannot even parse): the image already has it, so the build must not fetch it
    # (no git, no access to the repository in a build).
    replace_in(
        app / "pyproject.toml",
        f'"ml-handoff=={__version__}"',
        f'"ml-handoff @ git+file:///nowhere/ml-template.git@v{__version__}#subdirectory=components"',
    )
    image_env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    (project_install,) = instructions(default_project / "Dockerfile", "RUN")
    run_build_step(project_install, app, {"/opt/handoff": venv, "/app": app}, image_env)
    for name in ("model.py", "contract.yaml", "model_card.md", "handoff.yaml"):
        shutil.copy2(default_project / name, app)
    assert sorted(p.name for p in app.iterdir()) == sorted(
        ["pyproject.toml", "model.py", "contract.yaml", "model_card.md", "handoff.yaml"]
    )

    handoff = str(venv / "bin" / "handoff")
    version = subprocess.run(
        [handoff, "version"], capture_output=True, text=True, env={**os.environ, **image_env}
    )
    assert version.stdout.strip() == __version__, version.stderr
    consistent = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True
    )
    assert consistent.returncode == 0, consistent.stdout
    checked = subprocess.run(
        [handoff, "check"],
        cwd=app,
        capture_output=True,
        text=True,
        env={**os.environ, **image_env},
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert "contract" in checked.stdout.lower()
