"""A platform team with its own package index: `make release` builds the wheels, projects install them.

The team sets `_package_index` in its template's cookiecutter.json and cuts a release with the real
`make release` script, which builds both wheels. Those wheels are served as a PEP 503 simple index
on 127.0.0.1 by a real HTTP server. A project generated from the release pins the packages by
version and records the index in its Makefile; in a shell that cannot see this checkout's .venv,
`make setup` fetches them from that index, then the project checks, runs and serves.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

from handoff import __version__

from .first_minutes import fresh_env, installed, setup_check_run_and_ask
from .template_repo import git, next_minor, publish, release, template_repo

pytestmark = [pytest.mark.bake, pytest.mark.slow]

PACKAGES = ("ml-handoff", "ml-handoff-pipelines")


class SimpleIndex:
    """A folder served over HTTP as a PEP 503 index; ``fetched`` lists every path asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetched: list[str] = []
        index = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                index.fetched.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    def add(self, wheels: list[Path]) -> None:
        """One page per project, linking its wheels with their sha256 (as pip checks them)."""
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        for wheel in wheels:
            project = wheel.name.split("-")[0].replace("_", "-")  # PEP 503 normalized name
            content = wheel.read_bytes()
            (self.root / "files" / wheel.name).write_bytes(content)
            digest = hashlib.sha256(content).hexdigest()
            page = self.root / "simple" / project / "index.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            link = f'<a href="/files/{html.escape(wheel.name)}#sha256={digest}">{html.escape(wheel.name)}</a>'
            page.write_text(f"<!DOCTYPE html><html><body>{link}</body></html>\n")

    def __enter__(self) -> SimpleIndex:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleIndex]:
    with SimpleIndex(tmp_path_factory.mktemp("index")) as served:
        yield served


@pytest.fixture(scope="module")
def released(index: SimpleIndex, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The team's template, pointed at its index, released with `make release`'s script; the
    release's wheels published to the index. Returns the template's address and the version."""
    root = tmp_path_factory.mktemp("team-template")
    repo = template_repo(root / "ml-template", tag=f"v{__version__}")
    settings = json.loads((repo / "cookiecutter.json").read_text())
    settings["_package_index"] = index.url
    (repo / "cookiecutter.json").write_text(json.dumps(settings, indent=2) + "\n")
    git(repo, "commit", "-qam", "Projects install the platform from our package index")
    version = next_minor(__version__)
    cut = release(repo, version, "--skip-tests")
    assert cut.returncode == 0, cut.stderr
    index.add(sorted((repo / "dist").glob(f"*-{version}-py3-none-any.whl")))
    return publish(repo, root / "ml-template.git"), version


def test_project_installs_the_release_from_the_teams_index_checks_runs_and_serves(
    released: tuple[str, str], index: SimpleIndex, tmp_path: Path
) -> None:
    url, version = released
    project = Path(cookiecutter(url, checkout=f"v{version}", no_input=True, output_dir=str(tmp_path)))
    dependencies = (project / "pyproject.toml").read_text()
    for package in PACKAGES:
        assert f'"{package}=={version}",' in dependencies
    assert f"PACKAGE_INDEX := $(or $(PACKAGE_INDEX),{index.url})" in (project / "Makefile").read_text()
    assert index.url in (project / "README.md").read_text()  # the researcher is told where they come from

    setup_check_run_and_ask(project, fresh_env(tmp_path / "home"))
    for package in PACKAGES:
        found = installed(project, package)
        assert found == {"version": version, "direct_url": None}  # from an index, not a folder or URL
        wheel = f"/files/{package.replace('-', '_')}-{version}-py3-none-any.whl"
        assert wheel in index.fetched, index.fetched
