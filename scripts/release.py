"""Cut a template release: one version, written everywhere it appears, a CHANGELOG section, a tag.

``make release VERSION=x.y.z`` runs this. It refuses a dirty tree, a version that does not move
forward and a CHANGELOG that cannot take the release, then runs what CI runs (``.ci/run``: the
system packages the tests need, from ``scripts/install-test-deps.sh``, then ``make test``; not with
``--skip-tests``), rewrites every place in ``PLACES``, writes the CHANGELOG section (the notes
under ``## x.y.z (unreleased)``, dated, or the commit subjects since the last tag; see
``release_notes.py``), commits and tags ``vX.Y.Z``, then builds the two wheels that projects
install (``dist/``) from the tagged tree. Generated projects pick the version up from
``cookiecutter.json`` (their pins, image tags, Dockerfile base and ``template_version``), so those
need no edit of their own.

The version a tree is at may be released while it has no tag (a tree's first release, or a
version set by hand): ``make release VERSION=x.y.z`` on a tree at x.y.z tags it as it is, with its
CHANGELOG section and wheels.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import release_notes

ROOT = Path(__file__).resolve().parents[1]
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
CHANGELOG = release_notes.FILE
# The packages a generated project installs, built into DIST for the platform's package index.
PACKAGES = ("components", "pipelines")
DIST = "dist"
# What CI runs before a release is cut, as .ci/run runs it (tests/test_release.py holds the two
# to the same steps): the system packages the suite needs (apt), then the suite itself.
TEST_STEPS = (("scripts/install-test-deps.sh",), ("make", "test"))
# runc and debootstrap live in /usr/sbin, which a non-login PATH may lack (.ci/run adds it too).
SYSTEM_PATH = "/usr/sbin:/sbin"


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
    Place(
        "manifests/monitoring/collector.yaml", "          image: registry.example.com/platform/ml-handoff:{v}"
    ),
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


def release_tags(root: Path) -> dict[str, str]:
    """Each released version (a ``vMAJOR.MINOR.PATCH`` tag) and its tag's date, oldest first."""
    listed = git(root, "for-each-ref", "--format=%(refname:strip=2) %(creatordate:short)", "refs/tags/v*")
    found = {}
    for line in listed.splitlines():
        tag, _, when = line.partition(" ")
        if SEMVER.match(tag[1:]):
            found[tag[1:]] = when
    return dict(sorted(found.items(), key=lambda item: as_tuple(item[0])))


def check_moves_forward(version: str, current: str, tagged: dict[str, str]) -> None:
    """After the current version, or the current version itself while it is not tagged (the tree's
    first release, or one whose version was set by hand); after every release tag either way."""
    if as_tuple(version) < as_tuple(current) or (version == current and version in tagged):
        which = f", which is tagged v{current}" if version == current else ""
        raise SystemExit(f"release: {version} does not come after the current version {current}{which}")
    newest = next(reversed(tagged), None)
    if newest is not None and as_tuple(version) <= as_tuple(newest):
        raise SystemExit(f"release: {version} does not come after the newest release tag v{newest}")


def commit_subjects(root: Path, tagged: dict[str, str]) -> list[str]:
    """The commit subjects since the newest release tag (or since the start), newest first."""
    newest = next(reversed(tagged), None)
    span = f"v{newest}..HEAD" if newest else "HEAD"
    return [s for s in git(root, "log", "--format=%s", "--no-merges", span).splitlines() if s]


def as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def run_tests_as_ci(root: Path) -> None:
    """``TEST_STEPS``, as CI runs them; the first that fails stops the release before any write."""
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', os.defpath)}:{SYSTEM_PATH}"}
    for step in TEST_STEPS:
        shown = " ".join(step)
        print(f"release: {shown}", flush=True)
        done = subprocess.run(step, cwd=root, env=env)
        if done.returncode != 0:
            raise SystemExit(
                f"release: `{shown}` failed (exit {done.returncode}); nothing was changed or tagged"
            )


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
    tagged = release_tags(root)
    check_moves_forward(version, old, tagged)
    # The CHANGELOG is checked before the tests run: a heading to fix should not cost a test run.
    changelog = root / CHANGELOG
    try:
        notes = release_notes.released(
            changelog.read_text() if changelog.is_file() else "",
            version,
            today,
            commit_subjects(root, tagged),
            tagged,
        )
    except release_notes.NotesError as exc:
        raise SystemExit(f"release: {exc}") from None
    if run_tests:
        run_tests_as_ci(root)
    # Every place is written even when the version stays (a first release): each must still match.
    changed = set_version(root, version)
    changelog.write_text(notes)
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
    if old != version:
        moved = f"{old} -> {version}"
    elif tagged:
        moved = f"{version} (the version the tree was at)"
    else:
        moved = f"{version} (the first release)"
    print(f"released {moved}: tagged v{version}; built {built} in {DIST}/")
    print(
        "publish: `git push --follow-tags` (the release workflow attaches the wheels to the GitHub "
        "release and uploads them to the index named by the PACKAGE_INDEX_UPLOAD_URL setting), or "
        f"by hand: `twine upload --repository-url <your index's upload URL> {DIST}/*-{version}-*.whl`"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("version", nargs="?", help="the new version, MAJOR.MINOR.PATCH")
    parser.add_argument(
        "--skip-tests",
        action="store_true",
        help="do not run the test dependencies' install and `make test` first",
    )
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
