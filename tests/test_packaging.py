"""The two packages as a release ships them, and the template repository's own CI.

Wheels: both packages are built with `python -m build` (an sdist, then the wheel from the sdist,
as any builder of a release tag does) from a copy of this tree, so no build output lands beside
the editable install. Each wheel must hold every module of its source tree and ``py.typed``, and
carry its README as the long description. Then the two wheel files alone, with the lock as
constraints, go into a fresh venv (no system site packages, a shell that cannot see this
checkout's .venv), where `handoff` runs from a folder outside the repository and every module
comes from the venv's site-packages.

CI: every action in .github/workflows/ is pinned by a full commit SHA with its release in a
comment, and ci.yml's answer matrix is test_template_matrix.py's (actionlint on both workflows:
tests/test_project_workflow.py). `make lock` is checked as a dry run: a real one re-resolves
every pin.
"""

from __future__ import annotations

import email.parser
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from handoff import __version__

from .conftest import TEMPLATE
from .first_minutes import fresh_env
from .test_template_matrix import MATRIX

WORKFLOWS = TEMPLATE / ".github/workflows"
LOCK = TEMPLATE / "requirements/lock.txt"
# What a package copy leaves out: caches and earlier builds (as .dockerignore does for the image).
BUILD_NOISE = shutil.ignore_patterns("__pycache__", "*.egg-info", ".mypy_cache", "build", "dist")
# `uses: owner/repo[/path]@<40 hex> # vX.Y.Z`: a tag can be moved, a commit cannot.
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*$")


@dataclass(frozen=True)
class Package:
    folder: str  # under the repository root
    distribution: str
    module: str

    @property
    def wheel_prefix(self) -> str:
        return self.distribution.replace("-", "_")


PACKAGES = (
    Package("components", "ml-handoff", "handoff"),
    Package("pipelines", "ml-handoff-pipelines", "handoff_pipelines"),
)


def pyproject(package: Package) -> dict[str, object]:
    return tomllib.loads((TEMPLATE / package.folder / "pyproject.toml").read_text())


@pytest.mark.unit
@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.folder)
def test_pyproject_names_a_readme_that_exists(package: Package) -> None:
    project = pyproject(package)["project"]
    assert isinstance(project, dict)
    readme = TEMPLATE / package.folder / project["readme"]
    assert readme.is_file(), f"{package.folder}/pyproject.toml: readme {project['readme']!r} does not exist"
    assert readme.read_text().startswith(f"# {package.distribution}\n")


def uses_lines(workflow: Path) -> list[str]:
    """Each `uses:` value as written, its comment included (YAML drops comments)."""
    found = re.findall(r"^\s*(?:- )?uses:\s*(.+?)\s*$", workflow.read_text(), flags=re.MULTILINE)
    parsed = yaml.safe_load(workflow.read_text())
    steps = [step for job in parsed["jobs"].values() for step in job.get("steps", [])]
    assert len(found) == sum("uses" in step for step in steps), f"{workflow.name}: a `uses:` the scan missed"
    return found


@pytest.mark.unit
def test_every_action_of_the_template_workflows_is_pinned_by_commit_sha() -> None:
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert {w.name for w in workflows} == {"ci.yml", "release.yml"}
    unpinned = [
        f"{workflow.name}: uses: {value}"
        for workflow in workflows
        for value in uses_lines(workflow)
        if not PINNED.match(value)
    ]
    assert not unpinned, "pin each action as owner/repo@<40-hex commit> # vX.Y.Z:\n" + "\n".join(unpinned)
    # One action, one pin: both workflows move together.
    pins: dict[str, set[str]] = {}
    for workflow in workflows:
        for value in uses_lines(workflow):
            action, _, ref = value.partition("@")
            pins.setdefault(action, set()).add(ref)
    assert {action: refs for action, refs in pins.items() if len(refs) > 1} == {}


@pytest.mark.unit
def test_ci_runs_ci_run_and_each_answer_set_of_the_template_matrix() -> None:
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    suite = [step.get("run", "") for step in ci["jobs"]["suite"]["steps"]]
    assert any(".ci/run" in run for run in suite)
    answers = ci["jobs"]["answers"]
    assert answers["strategy"]["matrix"]["case"] == [param.id for param in MATRIX]
    assert any(
        "tests/test_template_matrix.py::test_generated_project_passes_its_own_checks[$CASE]"
        in step.get("run", "")
        for step in answers["steps"]
    )


@pytest.mark.unit
def test_make_lock_re_resolves_within_the_constraints_and_keeps_setuptools(tmp_path: Path) -> None:
    listed = subprocess.run(["make", "--no-print-directory"], cwd=TEMPLATE, capture_output=True, text=True)
    assert re.search(r"^  make lock ", listed.stdout, flags=re.MULTILINE), listed.stdout
    out = tmp_path / "lock.txt"
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "lock", f"LOCK={out}", "TORCH_CPU_INDEX=file:///cpu-wheels"],
        cwd=TEMPLATE,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    recipe = dry.stdout
    for part in (
        "-c requirements/constraints.txt",
        "-r requirements/dev.txt",
        "pip check",
        "freeze --all --exclude pip --exclude ml-handoff --exclude ml-handoff-pipelines",
        f'mv "$tmp/lock.txt" {out}',
        # torch from the CPU index where one is given; a resolution that brought CUDA is refused.
        "--extra-index-url file:///cpu-wheels",
        "grep -qiE '^(nvidia-|triton==)'",
        "make lock: torch came with its CUDA packages",
    ):
        assert part in recipe, part
    assert not out.exists()
    # Every overlap requirements/README.md says to keep is in the constraints the resolver reads.
    constraints = (TEMPLATE / "requirements/constraints.txt").read_text()
    for overlap in ("protobuf<7", "kubernetes<31", "requests==", "urllib3==", "pandas<3", "psutil<6"):
        assert re.search(rf"^{re.escape(overlap)}", constraints, flags=re.MULTILINE), overlap
    assert re.search(r"^grpcio-tools<=", constraints, flags=re.MULTILINE)
    assert re.search(r"^ml_dtypes==0\.5\.4", constraints, flags=re.MULTILINE)
    # torch is held: the lock pins the constraint's version, without a local label.
    held = re.search(r"^torch==(\S+)", constraints, flags=re.MULTILINE)
    assert held and f"\ntorch=={held.group(1)}\n" in LOCK.read_text()


# --- wheels, built and installed (slow) -----------------------------------------------------------


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both packages' wheels, distribution name -> file, built as a release builds them from a copy
    of each package (in ``<copies>/<folder>``, the wheel's parent's parent)."""
    root = tmp_path_factory.mktemp("packages")
    dist = root / "dist"
    for package in PACKAGES:
        source = shutil.copytree(TEMPLATE / package.folder, root / package.folder, ignore=BUILD_NOISE)
        built = subprocess.run(
            [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    found = {
        package.distribution: dist / f"{package.wheel_prefix}-{__version__}-py3-none-any.whl"
        for package in PACKAGES
    }
    assert all(wheel.is_file() for wheel in found.values()), sorted(p.name for p in dist.iterdir())
    return found


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.folder)
def test_wheel_holds_every_module_py_typed_and_its_readme(package: Package, wheels: dict[str, Path]) -> None:
    wheel_file = wheels[package.distribution]
    source = wheel_file.parent.parent / package.folder / "src"  # the copy it was built from
    modules = {
        path.relative_to(source).as_posix()
        for path in source.rglob("*.py")
        if "__pycache__" not in path.parts and ".mypy_cache" not in path.parts
    }
    with zipfile.ZipFile(wheel_file) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"{package.wheel_prefix}-{__version__}.dist-info/METADATA").decode()
    assert modules - names == set(), "modules the wheel lacks (a folder without __init__.py?)"
    assert f"{package.module}/py.typed" in names
    message = email.parser.Parser().parsestr(metadata)
    assert message["Name"] == package.distribution
    assert message["License-Expression"] == "Apache-2.0"
    assert message["Description-Content-Type"] == "text/markdown"
    readme = (source.parent / "README.md").read_text()
    assert message.get_payload().strip() == readme.strip()


@pytest.fixture(scope="module")
def venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding the two wheels and what they need, within the lock; and its shell."""
    root = tmp_path_factory.mktemp("wheels-alone")
    env = fresh_env(root / "home")
    (root / "home").mkdir()
    made = subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    python = root / "venv/bin/python"
    started = time.monotonic()
    install = subprocess.run(
        # --no-compile: byte-compiling some 2 GB of dependencies is most of the install's CPU time,
        # and Python compiles what it imports anyway.
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            "-c",
            str(LOCK),
            *map(str, wheels.values()),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"wheels alone: installed in {time.monotonic() - started:.0f} s")
    return root / "venv", env


def run_in(venv: tuple[Path, dict[str, str]], *command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    folder, env = venv
    return subprocess.run(
        [str(folder / "bin" / command[0]), *command[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_wheels_alone_install_and_run_outside_the_repository(
    venv: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    assert not tmp_path.is_relative_to(TEMPLATE)
    version = run_in(venv, "handoff", "version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == __version__

    helped = run_in(venv, "handoff", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    commands = set(re.findall(r"^│ (\w+) ", helped.stdout, flags=re.MULTILINE))
    steps = {"check", "train", "export", "optimize", "evaluate", "register", "deploy"}
    assert steps | {"run", "compile", "submit"} <= commands, helped.stdout
    # The pipelines wheel's handoff.commands entry point replaced the stand-ins of its commands.
    assert "needs ml-handoff-pipelines" not in helped.stdout, helped.stdout
    run_help = run_in(venv, "handoff", "run", "--help", cwd=tmp_path)
    assert run_help.returncode == 0 and "--local" in run_help.stdout, run_help.stdout + run_help.stderr
    assert (venv[0] / "bin/handoff-step-python").is_file()

    where = run_in(
        venv,
        "python",
        "-c",
        "import json, sysconfig, importlib.metadata as m, handoff, handoff_pipelines, handoff.cli, "
        "handoff_pipelines.graph; print(json.dumps({'site': sysconfig.get_paths()['purelib'], "
        "'files': [handoff.__file__, handoff_pipelines.__file__, handoff.cli.__file__, "
        "handoff_pipelines.graph.__file__], 'origins': [json.loads(m.distribution(d).read_text("
        "'direct_url.json'))['url'] for d in ('ml-handoff', 'ml-handoff-pipelines')]}))",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    found = json.loads(where.stdout)
    site = Path(found["site"])
    assert site.is_relative_to(venv[0])
    for file in map(Path, found["files"]):
        assert file.is_relative_to(site), f"{file} is not from the venv's site-packages"
        assert not file.resolve().is_relative_to(TEMPLATE)
    wheels = [f"{package.wheel_prefix}-{__version__}-py3-none-any.whl" for package in PACKAGES]
    assert [url.rsplit("/", 1)[-1] for url in found["origins"]] == wheels  # pip's record of each origin

    # `pip install ml-handoff` alone: the pipeline's commands say which package brings them.
    removed = run_in(venv, "python", "-m", "pip", "uninstall", "--yes", "ml-handoff-pipelines", cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    alone = run_in(venv, "handoff", "run", "--local", cwd=tmp_path)
    assert alone.returncode == 1, alone.stdout + alone.stderr
    assert "ml-handoff-pipelines" in alone.stderr and "Traceback" not in alone.stderr, alone.stderr
