"""Cut a template release: one version, written everywhere it appears, a CHANGELOG section, a tag.

``make release VERSION=x.y.z`` runs this. It refuses a dirty tree or a version that does not move
forward, runs the test suite (unless ``--skip-tests``), rewrites every place in ``PLACES``,
prepends the CHANGELOG section built from the commit subjects since the last tag, commits and
tags ``vX.Y.Z``, then builds the two wheels that projects install (``dist/``) from the tagged
tree. Generated projects pick the version up from ``cookiecutter.json`` (their pins, image tags,
Dockerfile base and ``template_version``), so those need no edit of their own.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
CHANGELOG = "CHANGELOG.md"
# The packages a generated project installs, built into DIST for the platform's package index.
PACKAGES = ("components", "pipelines")
DIST = "dist"


@dataclass(frozen=True)
class Place:
    """One line pattern holding the version; ``{v}`` marks it."""

    path: str
    pattern: str

    def regex(self) -> re.Pattern[str]:
        before, after = (re.escape(part) for part in self.pattern.split("{v}"))
        return re.compile(f"(?m)^({before})([0-9][0-9A-Za-z.+-]*)({after})$")


PLACES = (
    Place("cookiecutter.json", '  "_template_version": "{v}",'),
    Place("components/pyproject.toml", 'version = "{v}"'),
    Place("components/src/handoff/__init__.py", '__version__ = "{v}"'),
    Place("pipelines/pyproject.toml", 'version = "{v}"'),
    Place("pipelines/pyproject.toml", '    "ml-handoff=={v}",'),
    Place("components/Dockerfile", "ARG VERSION={v}"),
    Place("manifests/base/serving-runtime.yaml", "      image: registry.example.com/platform/ml-handoff:{v}"),
)


def current_version(root: Path) -> str:
    match = PLACES[2].regex().search((root / PLACES[2].path).read_text())
    if not match:
        raise SystemExit(f"release: no version found in {PLACES[2].path}")
    return match.group(2)


def set_version(root: Path, version: str) -> list[str]:
    """Rewrite every place; each must match exactly once (a missed place is an error, not a skip)."""
    changed = []
    for place in PLACES:
        path = root / place.path
        text, count = place.regex().subn(lambda m: f"{m.group(1)}{version}{m.group(3)}", path.read_text())
        if count != 1:
            raise SystemExit(
                f"release: {place.path}: expected one line like {place.pattern!r}, found {count}"
            )
        path.write_text(text)
        changed.append(place.path)
    return changed


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def changelog_section(root: Path, version: str, today: date) -> str:
    """``## x.y.z (date)`` and one bullet per commit subject since the last tag (or the start)."""
    tags = git(root, "tag", "--list", "v*", "--sort=-v:refname").splitlines()
    span = f"{tags[0]}..HEAD" if tags else "HEAD"
    subjects = [s for s in git(root, "log", "--format=%s", "--no-merges", span).splitlines() if s]
    lines = [f"## {version} ({today.isoformat()})", ""] + [f"- {s}" for s in subjects]
    return "\n".join(lines) + "\n"


def prepend_changelog(root: Path, section: str) -> None:
    path = root / CHANGELOG
    header = "# Changelog\n\nEach release of the template, newest first (written by `make release`).\n\n"
    body = path.read_text()[len(header) :] if path.is_file() and path.read_text().startswith(header) else ""
    path.write_text(header + section + ("\n" + body if body else ""))


def as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def build_wheels(root: Path, version: str) -> list[Path]:
    """Both packages' wheels in ``dist/``, built by pypa/build in isolated environments as any
    builder of the tag would; earlier wheels there are kept (an index holds every release)."""
    out = root / DIST
    for package in PACKAGES:
        subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(root / package)],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    wheels = sorted(out.glob(f"ml_handoff*-{version}-py3-none-any.whl"))
    if len(wheels) != len(PACKAGES):
        raise SystemExit(f"release: expected {len(PACKAGES)} wheels of {version} in {out}, found {wheels}")
    return wheels


def release(root: Path, version: str, *, run_tests: bool, today: date) -> None:
    if not SEMVER.match(version):
        raise SystemExit(f"release: VERSION must be MAJOR.MINOR.PATCH (e.g. 0.2.0), got {version!r}")
    if git(root, "status", "--porcelain"):
        raise SystemExit("release: the working tree has uncommitted changes; commit or stash them first")
    old = current_version(root)
    if as_tuple(version) <= as_tuple(old):
        raise SystemExit(f"release: {version} does not come after the current version {old}")
    if run_tests:
        subprocess.run(["make", "test"], cwd=root, check=True)
    section = changelog_section(root, version, today)
    changed = set_version(root, version)
    prepend_changelog(root, section)
    git(root, "add", CHANGELOG, *changed)
    git(root, "commit", "-q", "-m", f"Release {version}")
    git(root, "tag", "-a", f"v{version}", "-m", f"ml-template {version}")
    try:
        wheels = build_wheels(root, version)
    except subprocess.CalledProcessError as exc:
        last = "\n".join((exc.stderr or exc.stdout or "").strip().splitlines()[-5:])
        raise SystemExit(
            f"release: tagged v{version}, but its wheels did not build:\n{last}\n"
            "fix the build, then run `python scripts/release.py --wheels` on the tag"
        ) from exc
    built = ", ".join(wheel.name for wheel in wheels)
    print(f"released {old} -> {version}: tagged v{version}; built {built} in {DIST}/")
    print(
        "publish: `git push --follow-tags` (the release workflow attaches the wheels to the GitHub "
        "release and uploads them to the index named by the PACKAGE_INDEX_UPLOAD_URL setting), or "
        f"by hand: `twine upload --repository-url <your index's upload URL> {DIST}/*-{version}-*.whl`"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("version", nargs="?", help="the new version, MAJOR.MINOR.PATCH")
    parser.add_argument("--skip-tests", action="store_true", help="do not run `make test` first")
    parser.add_argument(
        "--wheels", action="store_true", help="only build the current version's wheels into dist/ (on a tag)"
    )
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args()
    if args.wheels == bool(args.version):
        parser.error("give either a VERSION to release or --wheels")
    try:
        if args.wheels:
            version = current_version(args.root)
            print(" ".join(str(wheel) for wheel in build_wheels(args.root, version)))
            return
        release(args.root, args.version, run_tests=not args.skip_tests, today=date.today())
    except subprocess.CalledProcessError as exc:
        sys.exit(f"release: `{' '.join(exc.cmd)}` failed: {(exc.stderr or '').strip()}")


if __name__ == "__main__":
    main()
