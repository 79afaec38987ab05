"""The template's migrations: found and ordered by release, and `yaml_keys` edits that keep what
users wrote around a renamed key (a migration must leave every other byte of the file alone)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from handoff import migrations
from handoff.errors import HandoffError

from .conftest import TEMPLATE, generate

pytestmark = pytest.mark.unit

STARTERS = ("image-classification", "text-classification", "tabular-regression")


def _yaml_keys():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("yaml_keys", TEMPLATE / "migrations" / "yaml_keys.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["yaml_keys"] = module
    spec.loader.exec_module(module)
    return module


yaml_keys = _yaml_keys()


@pytest.fixture(scope="module")
def starters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("starters")
    return {name: generate(root / name, starter=name) for name in STARTERS}


@pytest.mark.parametrize("starter", STARTERS)
@pytest.mark.parametrize("name", ["handoff.yaml", "contract.yaml"])
def test_an_edit_that_changes_nothing_leaves_every_byte(
    starters: dict[str, Path], starter: str, name: str
) -> None:
    path = starters[starter] / name
    before = path.read_bytes()
    with yaml_keys.edit(path) as document:
        first = next(iter(document))
        document[first] = document[first]  # a write of the same value
        assert yaml_keys.rename(document, "no.such.key", "other") is False
    assert path.read_bytes() == before


def test_rename_keeps_place_comment_and_value_and_runs_twice(tmp_path: Path) -> None:
    path = tmp_path / "contract.yaml"
    path.write_text(
        "slo:\n"
        "  p99_latency_ms: 40          # ONNX Runtime, one request\n"
        "  latency_batch_size: 1\n"
        "owners:\n"
        "  research: null   # who answers for the model\n"
    )
    for _ in range(2):
        with yaml_keys.edit(path) as document:
            yaml_keys.rename(document, "slo.p99_latency_ms", "slo.latency_p99_ms")
    assert path.read_text() == (
        "slo:\n"
        "  latency_p99_ms: 40          # ONNX Runtime, one request\n"
        "  latency_batch_size: 1\n"
        "owners:\n"
        "  research: null   # who answers for the model\n"
    )


def test_a_move_to_another_mapping_keeps_the_projects_value_over_the_templates(tmp_path: Path) -> None:
    path = tmp_path / "handoff.yaml"
    path.write_text("serving:\n  gpus: 2   # ours\n  kserve:\n    gpus: 0\n")
    with yaml_keys.edit(path) as document:
        assert yaml_keys.rename(document, "serving.gpus", "serving.kserve.gpus") is True
    # ruamel re-spaces a comment that moves to another mapping; the comment itself stays.
    assert re.fullmatch(r"serving:\n  kserve:\n    gpus: 2 +# ours\n", path.read_text()), path.read_text()


def test_a_file_with_conflict_markers_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "handoff.yaml"
    text = "serving:\n<<<<<<< ours\n  port: 9090\n=======\n  port: 8080\n>>>>>>> theirs\n"
    path.write_text(text)
    refused = r"handoff.yaml holds conflict markers \(<<<<<<< >>>>>>>\): resolve"
    with pytest.raises(ValueError, match=refused), yaml_keys.edit(path):
        pass
    assert path.read_text() == text


def test_migrations_are_ordered_by_release_and_picked_by_the_releases_crossed(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    for name in ("v0_10_0.py", "v0_2_0.py", "v0_3_1.py"):
        (folder / name).write_text(f'"""Migration {name}."""\n\n\ndef migrate(project):\n    pass\n')
    found = migrations.discover(folder)
    assert [m.name for m in found] == ["0.2.0", "0.3.1", "0.10.0"]
    assert [m.name for m in migrations.crossed(found, (0, 2, 0), (0, 10, 0))] == ["0.3.1", "0.10.0"]
    assert found[0].summary == "Migration v0_2_0.py."
    (folder / "v0.4.0.py").write_text("")
    with pytest.raises(
        HandoffError, match=r"v0.4.0.py is not named vMAJOR_MINOR_PATCH.py \(e.g. v0_2_0.py\)"
    ):
        migrations.discover(folder)


def test_a_migration_imports_the_helpers_beside_it(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "yaml_keys.py").write_text((TEMPLATE / "migrations" / "yaml_keys.py").read_text())
    (folder / "v1_0_0.py").write_text(
        '"""Rename a."""\n\nfrom .yaml_keys import edit, rename\n\n\n'
        "def migrate(project):\n"
        '    with edit(project / "handoff.yaml") as settings:\n'
        '        rename(settings, "a", "b")\n'
    )
    (tmp_path / "handoff.yaml").write_text("a: 1  # one\n")
    migrations.run(migrations.discover(folder)[0], tmp_path)
    assert (tmp_path / "handoff.yaml").read_text() == "b: 1  # one\n"
