"""The fork-server client stands in for Python: anything it cannot fork runs on the real interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from handoff_pipelines import forkserver

pytestmark = pytest.mark.unit

CLIENT = str(Path(sys.executable).with_name("handoff-step-python"))


def test_client_runs_plain_commands_on_the_real_interpreter() -> None:
    env = {**os.environ, forkserver.PYTHON_ENV: sys.executable}
    result = subprocess.run(
        [CLIENT, "-c", "import sys; print(sys.executable)"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert result.stdout.strip() == sys.executable


def test_client_without_a_server_falls_back_and_keeps_the_exit_code(tmp_path: Path) -> None:
    env = {
        **os.environ,
        forkserver.PYTHON_ENV: sys.executable,
        forkserver.SOCKET_ENV: str(tmp_path / "absent.sock"),
    }
    result = subprocess.run(
        [CLIENT, "-m", "json.tool", "--no-such-flag"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def test_forked_step_gets_argv_cwd_env_streams_and_exit_code(tmp_path: Path) -> None:
    module = tmp_path / "probe_step.py"
    module.write_text(
        "import os, sys\n"
        "print('args', sys.argv[1:], 'cwd', os.getcwd(), 'var', os.environ['PROBE'])\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    (tmp_path / "model.py").write_text("print('model.py may print at import')\n")
    with forkserver.running(tmp_path) as server:
        assert server is not None
        step_python = server.wait()
        assert step_python is not None and step_python.executable == CLIENT
        env = {
            **os.environ,
            forkserver.PYTHON_ENV: sys.executable,
            "PROBE": "42",
            forkserver.SOCKET_ENV: step_python.socket_path,
            "PYTHONPATH": str(tmp_path),
        }
        result = subprocess.run(
            [step_python.executable, "-m", "probe_step", "3"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
    assert result.returncode == 3
    assert result.stdout.strip() == f"args ['3'] cwd {tmp_path} var 42"
    assert result.stderr.strip() == "to stderr"


def run_through_server(project: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    (project / "probe_step.py").write_text(code)
    with forkserver.running(project) as server:
        assert server is not None
        step_python = server.wait()
        assert step_python is not None
        env = {
            **os.environ,
            forkserver.PYTHON_ENV: sys.executable,
            forkserver.SOCKET_ENV: step_python.socket_path,
            "PYTHONPATH": str(project),
        }
        return subprocess.run(
            [step_python.executable, "-m", "probe_step", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=project,
            timeout=60,
        )


def test_server_imports_model_py_imports_but_never_runs_model_py(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text("import json\nopen('ran-at-import', 'a').write('x')\n")
    result = run_through_server(tmp_path, "import sys\nprint('json' in sys.modules)\n")
    assert result.stdout.strip() == "True"  # model.py's imports were preloaded
    assert not (tmp_path / "ran-at-import").exists()  # its top-level code was not run


def test_exit_code_is_the_steps_own_even_when_it_forks_and_atexit_runs(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text("")
    code = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "if os.fork() == 0:\n"
        "    sys.exit(0)\n"
        "os.wait()\n"
        "sys.exit(5)\n"
    )
    result = run_through_server(tmp_path, code)
    assert result.returncode == 5
    assert "atexit ran" in result.stdout
