"""What the model server takes from KServe and uvicorn beyond their public API
(``handoff.serving.kserve_internals``): each internal is still there with the expected signature
in the installed versions, the pinned range holds only the versions verified, and a KServe or
uvicorn that moved one fails at one place, naming it."""

from __future__ import annotations

import importlib
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import kserve.protocol.rest.server
import pytest
import uvicorn.server
from packaging.requirements import Requirement

from handoff.errors import HandoffError
from handoff.serving import kserve_internals
from handoff.serving.kserve_internals import INTERNALS, VERIFIED, Internal

pytestmark = pytest.mark.unit

TEMPLATE = Path(__file__).resolve().parents[1]
# kserve/__init__.py rebinds ``kserve.constants`` to this module, so it is looked up by name.
CONSTANTS = importlib.import_module("kserve.constants.constants")


@pytest.mark.parametrize("internal", INTERNALS, ids=[i.path for i in INTERNALS])
def test_each_internal_is_there_as_the_server_uses_it(internal: Internal) -> None:
    assert internal.problems() == [], internal.path


def test_the_pin_holds_only_the_kserve_minor_the_internals_were_verified_on() -> None:
    dependencies = tomllib.loads((TEMPLATE / "components/pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    (pin,) = [Requirement(d) for d in dependencies if Requirement(d).name == "kserve"]
    major, minor, _ = VERIFIED["kserve"].split(".")
    assert version("kserve") in pin.specifier and VERIFIED["kserve"] in pin.specifier
    assert f"{major}.{minor}.99" in pin.specifier
    assert (
        f"{major}.{int(minor) - 1}.99" not in pin.specifier
        and f"{major}.{int(minor) + 1}.0" not in pin.specifier
    )
    # What is installed, here and in generated projects, is what was verified.
    assert {name: version(name) for name in VERIFIED} == VERIFIED
    constraints = (TEMPLATE / "{{cookiecutter.project}}/constraints.txt").read_text().splitlines()
    assert {f"{name}=={v}" for name, v in VERIFIED.items()} <= set(constraints)


def test_the_check_passes_on_the_installed_versions() -> None:
    kserve_internals.check()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda m: m.delattr(kserve.protocol.rest.server.RESTServer, "_add_middlewares"),
            "kserve.protocol.rest.server:RESTServer._add_middlewares is not found",
        ),
        (
            lambda m: m.setattr(uvicorn.server.Server, "on_tick", lambda self, tick: False),
            "uvicorn.server:Server.on_tick takes (self, tick), not (self, counter, ...)",
        ),
        (
            lambda m: m.setattr(
                "kserve.protocol.rest.server.RESTServer.create_application", lambda self: None
            ),
            "kserve.protocol.rest.server:RESTServer._add_middlewares is no longer used by "
            "kserve.protocol.rest.server:RESTServer.create_application",
        ),
        (
            lambda m: m.setattr(CONSTANTS, "FASTAPI_APP_IMPORT_STRING", "kserve.app:app"),
            "kserve.constants.constants:FASTAPI_APP_IMPORT_STRING is 'kserve.app:app', not "
            "'kserve.model_server:app'",
        ),
    ],
    ids=["gone", "signature", "no-longer-called", "value"],
)
def test_a_moved_internal_stops_the_check_naming_it(
    monkeypatch: pytest.MonkeyPatch, change: object, expected: str
) -> None:
    change(monkeypatch)  # type: ignore[operator]
    with pytest.raises(HandoffError) as raised:
        kserve_internals.check()
    message = str(raised.value)
    assert message.startswith(expected), message
    assert "verified on kserve 0.21.0, uvicorn 0.54.0" in message and "components/pyproject.toml" in message


def test_a_missing_base_class_fails_the_import_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(kserve.protocol.rest.server, "_RefreshingServer")
    monkeypatch.delitem(sys.modules, "handoff.serving.kserve_internals")
    with pytest.raises(HandoffError, match=r"cannot import name '_RefreshingServer'"):
        importlib.import_module("handoff.serving.kserve_internals")
