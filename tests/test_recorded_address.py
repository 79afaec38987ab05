"""The template address and commit a project records must be ones cruft and git can use.

A project generated with plain `cookiecutter` from a repository gets the `.cruft.json` that
`cruft create` would write: an address git can clone (cookiecutter's `git+` prefix is its own
notation, which git does not understand) and the exact commit, whatever the user's cookiecutter
configuration (a relative `cookiecutters_dir` puts cookiecutter's clone where the post-generation
hook, running in the new project, cannot see it). The pins in pyproject.toml use the same address.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from handoff import __version__

from .conftest import BIN, TEMPLATE
from .template_repo import CRUFT, commit_of, publish, template_repo

pytestmark = pytest.mark.bake

TAG = f"v{__version__}"
COOKIECUTTER = str(BIN / "cookiecutter")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """This tree as a repository with a release tag, and its bare "GitHub" copy."""
    root = tmp_path_factory.mktemp("published")
    repo = template_repo(root / "ml-template", tag=TAG)
    publish(repo, root / "ml-template.git")
    return repo, root / "ml-template.git"


def cookiecutter(
    template: str, checkout: str, where: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `cookiecutter` command, run in ``where`` as a user runs it."""
    return subprocess.run(
        [COOKIECUTTER, template, "--checkout", checkout, "--no-input", *options],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_git_plus_address_is_recorded_as_one_git_and_cruft_can_use(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, bare = published
    made = cookiecutter(f"git+{bare.as_uri()}", TAG, tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    project = tmp_path / "digits-classifier"
    record = json.loads((project / ".cruft.json").read_text())
    assert (record["template"], record["commit"], record["checkout"]) == (
        str(bare),
        commit_of(repo, TAG),
        TAG,
    )
    assert record["context"]["cookiecutter"]["_template"] == str(bare)

    checked = subprocess.run([CRUFT, "check"], cwd=project, capture_output=True, text=True, timeout=120)
    assert "remote-git+file" not in checked.stdout + checked.stderr
    assert checked.stdout.strip() == (
        "SUCCESS: Good work! Project's cruft is up to date and as clean as possible :)."
    )
    assert checked.returncode == 0

    platform = tomllib.loads((project / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert platform["platform"] == [
        f"ml-handoff @ git+{bare.as_uri()}@{TAG}#subdirectory=components",
        f"ml-handoff-pipelines @ git+{bare.as_uri()}@{TAG}#subdirectory=pipelines",
    ]


@pytest.mark.parametrize(
    "started",
    ["shell-short-commit", "no-shell-tag", "no-shell-branch"],
)
def test_a_relative_cookiecutters_dir_still_records_the_exact_commit(
    published: tuple[Path, Path], started: str, tmp_path: Path
) -> None:
    """From a shell (PWD names the folder cookiecutter starts in) the hook finds the clone, so even
    an abbreviated commit is exact; started otherwise, with the project written elsewhere, it asks
    the repository what the tag or branch names."""
    repo, bare = published
    config = tmp_path / "cookiecutter.yaml"
    config.write_text("cookiecutters_dir: rel/dir\nreplay_dir: rel/replay\n")
    env = {**os.environ, "COOKIECUTTER_CONFIG": str(config)}
    if started == "shell-short-commit":
        commit = commit_of(repo, TAG)
        made = cookiecutter(bare.as_uri(), commit[:10], tmp_path, env={**env, "PWD": str(tmp_path)})
        project = tmp_path / "digits-classifier"
    else:
        env.pop("PWD", None)
        ref = TAG if started == "no-shell-tag" else "main"
        commit = commit_of(repo, ref)
        made = cookiecutter(bare.as_uri(), ref, tmp_path, "--output-dir", "out", env=env)
        project = tmp_path / "out" / "digits-classifier"
    assert made.returncode == 0, made.stdout + made.stderr
    assert (tmp_path / "rel" / "dir" / "ml-template").is_dir()  # cookiecutter's clone, relative to here
    assert "local folder" not in made.stderr
    record = json.loads((project / ".cruft.json").read_text())
    assert (record["template"], record["commit"]) == (str(bare), commit)


def test_pins_name_a_git_plus_https_template_by_its_git_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As cookiecutter renders pyproject.toml for `cookiecutter git+https://...`: `_template` is
    the address as given, and pip's own `git+` goes in front of the address git understands."""
    from cookiecutter.generate import generate_context, generate_files
    from cookiecutter.prompt import prompt_for_config

    monkeypatch.syspath_prepend(str(TEMPLATE))  # the template's Jinja extension, as cookiecutter adds it
    context = generate_context(str(TEMPLATE / "cookiecutter.json"))
    context["cookiecutter"] = prompt_for_config(context, no_input=True)
    context["cookiecutter"]["_template"] = "git+https://git.example.com/org/ml-template.git"
    project = Path(
        generate_files(str(TEMPLATE), context=context, output_dir=str(tmp_path), accept_hooks=False)
    )
    platform = tomllib.loads((project / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    address = "https://git.example.com/org/ml-template.git"
    assert platform["platform"] == [
        f"ml-handoff @ git+{address}@{TAG}#subdirectory=components",
        f"ml-handoff-pipelines @ git+{address}@{TAG}#subdirectory=pipelines",
    ]
