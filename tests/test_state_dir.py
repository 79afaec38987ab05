"""A project's machine-local state lives outside its folder: pods mount the folder read-only, and a
copy of the folder must not carry the original's server record along."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handoff.files import write_json
from handoff.project import STATE_DIR_ENV, Project, state_dir_of
from handoff.serving import local_server
from handoff.serving.local_server import ServerHandle

pytestmark = pytest.mark.unit


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_state_goes_outside_the_project_folder_and_a_copy_gets_its_own(
    default_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    project = Path(shutil.copytree(default_project, tmp_path / "a" / default_project.name))
    before = tree(project)
    state = Project.load(project).state_dir
    assert state.is_dir() and state.parent == tmp_path / "state"
    assert state.name.startswith(f"{project.name}-")
    assert (state / "project.txt").read_text().strip() == str(project)
    assert tree(project) == before  # nothing written into the project
    copy = Path(shutil.copytree(project, tmp_path / "b" / project.name))
    assert Project.load(copy).state_dir != state


def state_dir_with(home: str, project: Path) -> Path:
    """The state folder a fresh process picks with this HOME and neither variable set."""
    env = {k: v for k, v in os.environ.items() if k not in (STATE_DIR_ENV, "XDG_CACHE_HOME")}
    code = "from handoff.project import Project; import sys; print(Project.load(sys.argv[1]).state_dir)"
    out = subprocess.run(
        [sys.executable, "-c", code, str(project)],
        env={**env, "HOME": home},
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def test_without_the_variable_state_goes_to_the_users_cache(default_project: Path, tmp_path: Path) -> None:
    assert (
        state_dir_with(str(tmp_path / "home"), default_project).parent
        == tmp_path / "home" / ".cache" / "handoff"
    )
    # No writable home (a container's): /tmp.
    assert state_dir_with("/proc/no-such-home", default_project).parent.name == f"handoff-{os.getuid()}"


def test_a_server_recorded_for_another_folder_is_not_this_projects(tmp_path: Path) -> None:
    import psutil

    me = psutil.Process()
    handle = ServerHandle(
        pid=me.pid,
        started=me.create_time(),
        spec=me.cmdline()[0],  # "alive": this very process stands in for the server
        url="http://127.0.0.1:1",
        model_name="m",
        version="1",
        log="",
        project=str(tmp_path / "original"),
    )
    write_json(tmp_path / "server.json", handle.__dict__)
    assert local_server.current(tmp_path, tmp_path / "original") == handle
    assert local_server.current(tmp_path, tmp_path / "copy") is None
    assert local_server.stop(tmp_path, project=tmp_path / "copy") is None
    assert (tmp_path / "server.json").exists()  # left for the project it belongs to
    assert state_dir_of(tmp_path / "original") != state_dir_of(tmp_path / "copy")
