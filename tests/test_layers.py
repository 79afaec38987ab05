"""The walls between the two packages and inside the step library stand, and say so when broken.

The import rules are import-linter contracts in pyproject.toml (``[tool.importlinter]``): ml-handoff
never imports ml-handoff-pipelines, a step imports no other step, and the CLI sits over the
commands, over the parts they are built from, over small helpers. ``lint-imports`` checks them here
on the working tree, and on a copy with a rule broken, for the message a developer then reads.

The pipelines package adds ``run``, ``compile`` and ``submit`` to the ``handoff`` CLI through its
``handoff.commands`` entry point: checked in this environment, and in a real virtual environment
that holds everything this one does except ml-handoff-pipelines.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

import handoff

from .conftest import BIN, TEMPLATE

pytestmark = pytest.mark.unit

SOURCES = (TEMPLATE / "components" / "src", TEMPLATE / "pipelines" / "src")
# Rich wraps at 80 columns when not on a terminal: wide enough that no line the tests read wraps.
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}
PIPELINES = "ml-handoff-pipelines"
ADDED = ("run", "compile", "submit", "schedule", "retrain")


def lint_imports(cwd: Path, *sources: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` as a developer runs it, on the packages under ``sources`` (first on the path)."""
    env = {**os.environ, **WIDE, "PYTHONPATH": os.pathsep.join(map(str, sources))}
    return subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_rules_hold() -> None:
    result = lint_imports(TEMPLATE, *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout
    # The one import between steps the contracts allow, and why, is declared, not silently skipped.
    assert "A step imports no other step KEPT (1 ignored import)" in result.stdout


@pytest.mark.parametrize(
    ("module", "added", "contract", "found", "summary"),
    [
        (
            "handoff/steps/evaluate.py",  # even inside a function, as evaluate once fetched the champion
            "def _champion() -> None:\n    from handoff.steps.deploy import deploy  # noqa: F401\n",
            "A step imports no other step BROKEN",
            "handoff.steps.evaluate is not allowed to import handoff.steps.deploy:\n\n"
            "- handoff.steps.evaluate -> handoff.steps.deploy (l.",
            "Contracts: 3 kept, 1 broken.",
        ),
        (
            "handoff/cli.py",
            "from handoff_pipelines.local import run_local  # noqa: F401\n",
            "ml-handoff never imports ml-handoff-pipelines (which adds its commands by entry point) BROKEN",
            "handoff is not allowed to import handoff_pipelines:\n\n"
            "-   handoff.cli -> handoff_pipelines.local (l.",
            "Contracts: 3 kept, 1 broken.",
        ),
        (
            "handoff/registry.py",
            "from handoff.deployment import DeployResult  # noqa: F401\n",
            "over small helpers BROKEN",
            "handoff.registry is not allowed to import handoff.deployment:\n\n"
            "- handoff.registry -> handoff.deployment (l.",
            "Contracts: 2 kept, 2 broken.",  # deployment imports registry: a cycle too
        ),
        (
            "handoff/model_card.py",  # one layer (the parts), so only the cycle is wrong
            "from handoff.readiness import ReadinessItem  # noqa: F401\n",
            "No import cycles among sibling modules",
            "It could be made acyclic by removing 1 dependency:\n\n- .readiness -> .model_card (1 import)",
            "Contracts: 3 kept, 1 broken.",
        ),
    ],
    ids=["step-imports-step", "handoff-imports-pipelines", "part-imports-upward", "siblings-cycle"],
)
def test_a_broken_rule_is_caught_and_named(
    tmp_path: Path, module: str, added: str, contract: str, found: str, summary: str
) -> None:
    """A copy of both packages with one import that breaks a rule: lint-imports fails, names the
    contract, and shows the import with its line."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", ".mypy_cache")
    for source in SOURCES:
        shutil.copytree(source, src, ignore=ignore, dirs_exist_ok=True)
    with (src / module).open("a") as file:
        file.write("\n\n" + added)
    shutil.copy(TEMPLATE / "pyproject.toml", tmp_path)
    result = lint_imports(tmp_path, src)
    assert result.returncode == 1, result.stdout + result.stderr
    assert contract in result.stdout
    assert found in result.stdout
    assert summary in result.stdout


def venv_without(tmp_path: Path, distribution: str) -> Path:
    """A virtual environment holding every package this one has except ``distribution``: this
    environment's site-packages entries linked in, the distribution's own files (its metadata with
    the entry points, its code or editable path) left out. Returns its python."""
    files = importlib.metadata.distribution(distribution).files or []
    theirs = {Path(f).parts[0] for f in files if not str(f).startswith("..")}
    assert any(name.endswith(".dist-info") for name in theirs), theirs
    home = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(home)
    python = home / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name not in theirs:
            (Path(site) / entry.name).symlink_to(entry)
    return python


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python args`` with the handoff these tests import, and nothing else added to the path (a
    PYTHONPATH naming the pipelines' sources would bring back what the environment left out)."""
    env = {**os.environ, **WIDE, "PYTHONPATH": str(Path(handoff.__file__).parents[1])}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def listed_commands(help_text: str) -> dict[str, str]:
    """The commands ``handoff --help`` lists, in its order, each with the first line of its help."""
    panel = help_text.split("─ Commands ", 1)[1].splitlines()
    rows = [
        line[2:].rstrip(" │").split(maxsplit=1) for line in panel if line.startswith("│ ") and line[2] != " "
    ]
    return {name: summary.strip() for name, summary in rows}


def test_without_the_pipelines_package_its_commands_say_what_to_install(tmp_path: Path) -> None:
    python = venv_without(tmp_path, PIPELINES)
    absent = run(python, "-c", "import handoff_pipelines", cwd=tmp_path)
    assert absent.returncode == 1 and "No module named 'handoff_pipelines'" in absent.stderr
    for command, args in (("run", ["--local"]), ("compile", ["--target", "argo"]), ("submit", [])):
        result = run(python, "-m", "handoff", command, *args, cwd=tmp_path)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == (
            f"error: `handoff {command}` comes with the {PIPELINES} package, which is not installed: "
            f"pip install {PIPELINES}\n"
        )
    listed = run(python, "-m", "handoff", "--help", cwd=tmp_path)
    assert listed.returncode == 0
    commands = listed_commands(listed.stdout)
    assert list(commands)[: len(ADDED) + 3] == ["version", "check", *ADDED, "train"]
    for command in ADDED:
        assert commands[command].endswith(f"(needs {PIPELINES}).")
    # The step library itself works as before.
    assert run(python, "-m", "handoff", "version", cwd=tmp_path).returncode == 0


def test_the_pipelines_package_adds_its_commands_by_entry_point(tmp_path: Path) -> None:
    (entry,) = importlib.metadata.entry_points(group="handoff.commands", name="pipelines")
    assert entry.dist is not None and entry.dist.name == PIPELINES
    listed = run(BIN / "handoff", "--help", cwd=tmp_path)
    assert listed.returncode == 0
    commands = listed_commands(listed.stdout)
    # In the place and with the help they always had, before the step commands.
    assert list(commands)[: len(ADDED) + 3] == ["version", "check", *ADDED, "train"]
    assert (
        commands["run"]
        == "Run the whole pipeline: train, export, optimize, evaluate, register, deploy and smoke-test."
    )
    assert PIPELINES not in listed.stdout
    # The real command answers: its own options, its own refusal.
    assert "--fork-server" in run(BIN / "handoff", "run", "--help", cwd=tmp_path).stdout
    refused = run(BIN / "handoff", "run", cwd=tmp_path)
    assert (refused.returncode, refused.stderr) == (
        1,
        "error: only local runs are available in this version: use `handoff run --local`\n",
    )


def fake_distribution(root: Path, name: str, module: str, source: str) -> None:
    """An installed distribution as importlib.metadata finds one: its ``.dist-info`` (metadata and a
    ``handoff.commands`` entry point) and its module, in ``root``."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[handoff.commands]\ncommands = {module}:app\n")
    (root / f"{module}.py").write_text(source)


def test_a_broken_or_clashing_plugin_is_named_and_the_steps_stay(tmp_path: Path) -> None:
    """A pipelines package that is installed but fails to import is not called "not installed",
    and a package naming one of handoff's own commands does not replace it."""
    python = venv_without(tmp_path, PIPELINES)
    plugins = tmp_path / "plugins"
    fake_distribution(plugins, PIPELINES, "broken_commands", "raise ImportError('kfp is missing')\n")
    fake_distribution(
        plugins,
        "extra-commands",
        "extra_commands",
        "import typer\n\napp = typer.Typer()\n\n\n"
        "@app.command()\ndef train() -> None:\n    print('not the step')\n\n\n"
        "@app.command()\ndef hello() -> None:\n    print('hello from a plugin')\n",
    )
    env = {**os.environ, **WIDE, "PYTHONPATH": f"{Path(handoff.__file__).parents[1]}:{plugins}"}

    def handoff_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), "-m", "handoff", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    refused = handoff_cli("run", "--local")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        f"error: `handoff run` comes with the {PIPELINES} package, which is installed but did not load "
        f"(ImportError: kfp is missing): pip install --force-reinstall {PIPELINES}"
    )
    assert (
        "warning: handoff: extra-commands's handoff.commands entry point extra_commands:app names "
        "handoff's own command(s) train; those are kept and its own skipped"
    ) in refused.stderr
    assert handoff_cli("hello").stdout == "hello from a plugin\n"
    step = handoff_cli("train", "--help")
    assert step.returncode == 0 and "--checkpoint" in step.stdout
