"""This template as a git repository made inside a test: what users clone, tag by tag.

Release and upgrade tests need real commits, tags and branches of *this* tree. The copy takes
the files git would ship (tracked, plus new files not ignored), as they are in the working tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import TEMPLATE

IDENT = ["-c", "user.name=Platform Team", "-c", "user.email=platform@example.com"]
CRUFT = str(Path(sys.executable).parent / "cruft")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *IDENT, *args], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def template_repo(path: Path, tag: str | None = None) -> Path:
    """A repository at ``path`` holding this tree as one commit on ``main`` (annotated ``tag``)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=TEMPLATE,
        capture_output=True,
        check=True,
    )
    for name in dict.fromkeys(listed.stdout.decode().split("\0")):
        if name and (TEMPLATE / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TEMPLATE / name, path / name)
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "Everything up to the last release")
    if tag:
        git(path, "tag", "-a", tag, "-m", "previous release")
    return path


def publish(repo: Path, remote: Path) -> str:
    """Push every branch and tag to a bare repository (the "GitHub" of the test); its address."""
    if not remote.exists():
        git(repo.parent, "init", "-q", "--bare", "-b", "main", str(remote))
    git(repo, "push", "-q", "--force", "--all", str(remote))
    git(repo, "push", "-q", "--force", "--tags", str(remote))
    return remote.as_uri()


def commit_of(repo: Path, ref: str) -> str:
    return git(repo, "rev-parse", f"{ref}^{{commit}}")


def release(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``make release``'s script, run in ``repo``."""
    script = repo / "scripts" / "release.py"
    return subprocess.run([sys.executable, str(script), *args], cwd=repo, capture_output=True, text=True)


def next_minor(version: str) -> str:
    major, minor, _ = (int(p) for p in version.split("."))
    return f"{major}.{minor + 1}.0"
