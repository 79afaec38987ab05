"""Git for the project's repository and the template's: one call, and git's own words on failure."""

from __future__ import annotations

import subprocess
from pathlib import Path

from handoff.errors import HandoffError


def git_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run git and return what it did, whatever its exit status; a clear error without git."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise HandoffError("git is not installed (or not on PATH); install it and try again") from exc


def git(*args: str, cwd: Path) -> str:
    """Git's stdout (stripped); a failure is a ``HandoffError`` quoting git's last line."""
    done = git_run(*args, cwd=cwd)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise HandoffError(f"`git {' '.join(args)}` failed in {cwd}: {said[-1] if said else 'no output'}")
    return done.stdout.strip()
