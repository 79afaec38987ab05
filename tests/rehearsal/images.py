"""The rehearsal's images, built here with podman and cached by a hash of what goes into them.

No registry is reachable, so every image starts from Debian itself:

* ``base``: stands in for ``python:3.11-slim-bookworm`` (Debian bookworm's Python 3.11, with
  ``python``, venv and CA certificates), made by ``debootstrap --variant=minbase`` from the Debian
  mirror this machine's apt uses, then ``podman import``.
* ``platform``: ``components/Dockerfile`` unchanged, ``--build-arg PYTHON_IMAGE=<base>``.
* ``project``: a generated project's own ``Dockerfile``, ``--build-arg PLATFORM_IMAGE=<platform>``.
* ``storage_initializer``: KServe's storage initializer (``kserve-storage``, the code of KServe's
  ``kserve/storage-initializer`` image) in a venv on the base image, entered as KServe's image is.

Builds reach the package index as this machine's pip does: pip's settings (index URLs, find-links,
CA bundle) are read from ``pip config list`` at run time, written into a pip.conf mounted at
``/etc/pip.conf``, and the local folders they name are mounted read-only at the same paths. None
of those paths or hosts is written in the repository.

Each image is tagged ``localhost/handoff-rehearsal/<name>:<...>-<hash>``, the hash covering the
Dockerfile, every file its ``COPY`` instructions send (after ``.dockerignore``), the build
arguments (base images by id) and the pip settings. An existing tag is used without calling
``podman build``; any change builds a new tag. Images live in podman's storage, so the cache
outlives test sessions; older tags of the same image are removed (a few are kept for sessions of
other checkouts on the same machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser

from .containers import ContainerSpec
from .podman import Podman, RehearsalError, tail

TEMPLATE = Path(__file__).resolve().parents[2]
REPOSITORY = "localhost/handoff-rehearsal"
# Bump to rebuild everything when the recipes below change in a way the hashes cannot see.
RECIPE_VERSION = "1"
KEEP_TAGS = 3  # per image name: this checkout's newest plus a couple for other checkouts

DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# What python:3.11-slim-bookworm's own config says (an imported root file system has none).
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
PLATFORM_DOCKERFILE = TEMPLATE / "components" / "Dockerfile"

KSERVE_STORAGE_VERSION = "0.21.0"  # the KServe release the manifests target
# KServe's storage-initializer image: a venv at /prod_venv, user 1000, /work, the entrypoint script.
# kserve-storage brings boto3 (its S3 client) and the other stores' clients as dependencies.
STORAGE_INITIALIZER_DOCKERFILE = f"""\
ARG BASE_IMAGE
FROM ${{BASE_IMAGE}}
ENV VIRTUAL_ENV=/prod_venv \\
    PATH=/prod_venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv /prod_venv \\
    && /prod_venv/bin/pip install --no-cache-dir --disable-pip-version-check \\
        kserve-storage=={KSERVE_STORAGE_VERSION}
RUN useradd kserve -m -u 1000 -d /home/kserve && mkdir /work
COPY initializer-entrypoint /storage-initializer/scripts/initializer-entrypoint
RUN chmod 0755 /storage-initializer/scripts/initializer-entrypoint
WORKDIR /work
USER 1000
ENTRYPOINT ["/storage-initializer/scripts/initializer-entrypoint"]
"""
# KServe's storage-initializer/scripts/initializer-entrypoint, with the kserve_storage package
# (KServe moved the storage code out of `kserve` into `kserve-storage`).
INITIALIZER_ENTRYPOINT = """\
#!/usr/bin/env python3
import sys

from kserve_storage import Storage, configure_logging, logger

configure_logging()

if len(sys.argv) < 3 or len(sys.argv) % 2 != 1:
    print("Usage: initializer-entrypoint src_uri_0 dest_path_0 ... src_uri_n dest_path_n")
    sys.exit(1)

src_uris = sys.argv[1::2]
dest_paths = sys.argv[2::2]
logger.info("Initializing, args: (src_uri, dest_path): %s", list(zip(src_uris, dest_paths)))
Storage.download_files(src_uris, dest_paths)
"""


@dataclass(frozen=True)
class Image:
    """An image ready in podman's storage: its ref, and whether this call had to build it."""

    ref: str
    built: bool
    seconds: float  # the cache check, or the whole build


# -- the machine's configuration, read at run time -----------------------------------------------


@dataclass(frozen=True)
class DebianMirror:
    """Where this machine's apt gets a suite from (a ``deb`` source with ``main``)."""

    uri: str
    suite: str
    keyring: Path | None


def debian_mirror(suite: str = DEBIAN_SUITE) -> DebianMirror:
    """The mirror apt's sources name for ``suite`` (one-line ``.list`` and deb822 ``.sources``)."""
    main_list, parts = Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")
    if shutil.which("apt-config"):
        shell = subprocess.run(
            ["apt-config", "shell", "LIST", "Dir::Etc::sourcelist/f", "PARTS", "Dir::Etc::sourceparts/d"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        found = dict(re.findall(r"^(LIST|PARTS)='(.*)'$", shell, flags=re.MULTILINE))
        main_list, parts = Path(found.get("LIST", main_list)), Path(found.get("PARTS", parts))
    files = [main_list, *sorted(parts.glob("*.list")), *sorted(parts.glob("*.sources"))]
    for path in files:
        if not path.is_file():
            continue
        entries = _deb822(path.read_text()) if path.suffix == ".sources" else _one_line(path.read_text())
        for entry in entries:
            if (
                "deb" in entry.get("types", "").split()
                and suite in entry.get("suites", "").split()
                and "main" in entry.get("components", "").split()
                and entry.get("enabled", "yes").lower() != "no"
            ):
                signed_by = entry.get("signed-by", "")
                keyring = Path(signed_by) if signed_by.startswith("/") and Path(signed_by).is_file() else None
                return DebianMirror(uri=entry["uris"].split()[0], suite=suite, keyring=keyring)
    raise RehearsalError(
        f"no apt source for Debian {suite} (main) in {', '.join(str(f) for f in files if f.exists())}: "
        "the base image is made with debootstrap from the mirror apt uses"
    )


def _deb822(text: str) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        entry: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:  # a continuation line (e.g. an inline key)
                entry[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                entry[key] = value.strip()
        if entry:
            entries.append(entry)
    return entries


def _one_line(text: str) -> list[dict[str, str]]:
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        options = re.search(r"\[(.*?)\]", line)
        words = re.sub(r"\[.*?\]", "", line).split()
        if len(words) < 3:
            continue
        entry = {"types": words[0], "uris": words[1], "suites": words[2], "components": " ".join(words[3:])}
        for option in options.group(1).split() if options else []:
            key, _, value = option.partition("=")
            entry[key.lower()] = value
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class PipSettings:
    """The pip settings of this machine that an image build needs to reach packages."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    cert: Path | None = None
    timeout: str | None = None

    def conf(self) -> str:
        """A pip.conf saying the same, for ``/etc/pip.conf`` in a build (a venv's pip reads it)."""
        lines = ["[global]"]
        if self.index_url:
            lines.append(f"index-url = {self.index_url}")
        if self.extra_index_urls:
            lines.append(f"extra-index-url = {' '.join(self.extra_index_urls)}")
        if self.find_links:
            lines.append(f"find-links = {' '.join(self.find_links)}")
        if self.cert:  # without it the venv's pip trusts certifi's bundle only
            lines.append(f"cert = {self.cert}")
        if self.timeout:
            lines.append(f"timeout = {self.timeout}")
        return "\n".join(lines) + "\n"

    def local_paths(self) -> list[Path]:
        """Files and folders the settings name on this machine: mounted at the same paths."""
        local = [loc.removeprefix("file://") for loc in (self.index_url or "", *self.extra_index_urls)]
        # A file:// index links its files relative to itself (../../files/x.whl): mount its parent.
        paths = [Path(loc).parent for loc in local if loc.startswith("/")]
        paths += [
            Path(loc.removeprefix("file://")) for loc in self.find_links if loc.startswith(("/", "file:///"))
        ]
        if self.cert:
            paths.append(self.cert)
        return sorted({path for path in paths if path.exists()})


def pip_settings(python: str = sys.executable) -> PipSettings:
    """This machine's pip settings, as ``pip config list`` reports them (files and PIP_* variables)."""
    listing = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    values: dict[str, str] = {}
    # ":env:.cert='...'" and "global.cert='...'": environment variables win, as in pip.
    for scope, key, value in re.findall(r"^([^.\s]*)\.([\w-]+)='(.*)'$", listing, flags=re.MULTILINE):
        if scope == ":env:" or key not in values:
            values[key] = value
    cert = values.get("cert")
    return PipSettings(
        index_url=values.get("index-url"),
        extra_index_urls=tuple(values.get("extra-index-url", "").split()),
        find_links=tuple(values.get("find-links", "").split()),
        cert=Path(cert) if cert else None,
        timeout=values.get("default-timeout") or values.get("timeout"),
    )


# -- what goes into an image ----------------------------------------------------------------------


@dataclass
class DockerIgnore:
    """``.dockerignore`` rules: the last matching pattern decides; ``!`` includes again."""

    rules: list[tuple[re.Pattern[str], bool]] = field(default_factory=list)

    @classmethod
    def load(cls, context: Path) -> DockerIgnore:
        path = context / ".dockerignore"
        rules = []
        for raw in path.read_text().splitlines() if path.is_file() else []:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.lstrip("!").strip().strip("/")
            rules.append((re.compile(_glob_regex(pattern)), include))
        return cls(rules)

    def excluded(self, relative: str) -> bool:
        """Whether the build context leaves out ``relative`` (a file path, '/'-separated)."""
        parts = relative.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for pattern, include in self.rules:
            # A pattern that matches a parent folder covers everything inside it.
            if any(pattern.fullmatch(prefix) for prefix in prefixes):
                excluded = not include
        return excluded


def _glob_regex(pattern: str) -> str:
    out = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            out.append(".*")
            index += 2
        elif pattern[index] == "*":
            out.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            out.append("[^/]")
            index += 1
        else:
            out.append(re.escape(pattern[index]))
            index += 1
    return "".join(out)


def copied_files(dockerfile: Path, context: Path) -> list[Path]:
    """The context files the Dockerfile's ``COPY``/``ADD`` instructions send into the image."""
    ignore = DockerIgnore.load(context)
    files: set[Path] = set()
    for instruction in DockerfileParser(str(dockerfile)).structure:
        if instruction["instruction"] not in ("COPY", "ADD"):
            continue
        value = instruction["value"].strip()
        words = json.loads(value) if value.startswith("[") else shlex.split(value)
        if any(word.startswith("--from") for word in words):
            continue  # from another stage, not from the context
        for source in [word for word in words if not word.startswith("--")][:-1]:
            matches = sorted(context.glob(source)) if any(c in source for c in "*?[") else [context / source]
            for path in matches:
                if not path.exists():
                    raise RehearsalError(f"{dockerfile}: COPY source {source} is not in {context}")
                for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                    if not ignore.excluded(file.relative_to(context).as_posix()):
                        files.add(file)
    return sorted(files)


def inputs_hash(*, dockerfile_text: str, context: Path, files: Sequence[Path], extra: dict[str, str]) -> str:
    """One hash of a build's inputs: the Dockerfile, each file sent (path and content), the rest."""
    digest = hashlib.sha256(f"recipe {RECIPE_VERSION}\n".encode())
    digest.update(dockerfile_text.encode() + b"\0")
    for path in files:
        digest.update(f"{path.relative_to(context).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for key in sorted(extra):
        digest.update(f"{key}={extra[key]}\0".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(ref: str) -> Iterator[None]:
    """One build of a ref at a time on this machine (test workers, other checkouts' sessions)."""
    folder = Path(tempfile.gettempdir()) / "handoff-rehearsal-locks"
    folder.mkdir(exist_ok=True)
    with (folder / f"{hashlib.sha256(ref.encode()).hexdigest()[:16]}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the builder ----------------------------------------------------------------------------------


class ImageBuilder:
    """Builds (or finds) the rehearsal's images; ``work_dir`` holds build logs and generated files."""

    def __init__(self, podman: Podman, work_dir: Path, *, template: Path = TEMPLATE) -> None:
        self.podman = podman
        self.work_dir = work_dir
        self.template = template
        work_dir.mkdir(parents=True, exist_ok=True)
        self.pip = pip_settings()
        self.pip_conf = work_dir / "pip.conf"
        self.pip_conf.write_text(self.pip.conf())
        self._ready: dict[str, Image] = {}

    def _pip_volumes(self) -> list[tuple[Path, str]]:
        return [(path, str(path)) for path in self.pip.local_paths()] + [(self.pip_conf, "/etc/pip.conf")]

    def _ensure(self, ref: str, build: Callable[[], None]) -> Image:
        """``ref`` if podman has it; otherwise build it (once per machine at a time)."""
        if ref in self._ready:
            return self._ready[ref]
        started = time.monotonic()
        built = False
        with _build_lock(ref):
            if not self.podman.image_exists(ref):
                build()
                built = True
                self._prune(ref)
        image = Image(ref=ref, built=built, seconds=time.monotonic() - started)
        self._ready[ref] = image
        return image

    def _prune(self, ref: str) -> None:
        repository = ref.rsplit(":", 1)[0]
        for old, _created in self.podman.image_tags(repository)[KEEP_TAGS:]:
            if old != ref:
                self.podman.remove_image(old)  # in use by a running container: stays

    def base(self) -> Image:
        """The stand-in for python:3.11-slim-bookworm."""
        recipe = json.dumps(
            {"suite": DEBIAN_SUITE, "variant": "minbase", "include": BASE_PACKAGES, "changes": BASE_CHANGES}
        )
        tag = hashlib.sha256(f"{RECIPE_VERSION}\0{recipe}".encode()).hexdigest()[:16]
        ref = f"{REPOSITORY}/python:3.11-slim-{DEBIAN_SUITE}-{tag}"
        return self._ensure(ref, lambda: self._debootstrap(ref))

    def _debootstrap(self, ref: str) -> None:
        if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
            raise RehearsalError("the base image needs debootstrap: `apt-get install -y debootstrap`")
        mirror = debian_mirror()
        rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.work_dir))
        log = self.work_dir / "logs" / "base-debootstrap.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            shutil.which("debootstrap") or "/usr/sbin/debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "--components=main",
            *([f"--keyring={mirror.keyring}"] if mirror.keyring else []),
            mirror.suite,
            str(rootfs),
            mirror.uri,
        ]
        try:
            with log.open("w") as out:
                result = subprocess.run(
                    command, stdout=out, stderr=subprocess.STDOUT, timeout=1200, check=False
                )
            if result.returncode != 0:
                raise RehearsalError(
                    f"debootstrap {mirror.suite} from {mirror.uri} failed; {log} ends:\n{tail(log)}"
                )
            # apt's downloaded packages are not part of a slim image
            for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                leftover.unlink()
            self.podman.import_rootfs(rootfs, ref, changes=BASE_CHANGES)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        version = self.podman.run(ContainerSpec(image=ref, command=["python", "--version"], network="none"))
        if version.exit_code != 0 or not version.stdout.startswith("Python 3.11."):
            self.podman.remove_image(ref)
            raise RehearsalError(f"{ref} should have Python 3.11 as `python`; got {version}")

    def platform(self) -> Image:
        """The platform image from components/Dockerfile, on the base image."""
        from handoff import __version__

        base = self.base().ref
        context = self.template
        dockerfile = context / "components" / "Dockerfile"
        args = {"PYTHON_IMAGE": base, "VERSION": __version__}
        digest = inputs_hash(
            dockerfile_text=dockerfile.read_text(),
            context=context,
            files=copied_files(dockerfile, context),
            extra={**args, "PYTHON_IMAGE": self.podman.image_id(base), "pip.conf": self.pip.conf()},
        )
        ref = f"{REPOSITORY}/ml-handoff:{__version__}-cpu-{digest}"
        # With layers: the Dockerfile's dependency layer (minutes of pip) is reused until the lock
        # or a pyproject.toml changes, so a change to the packages' code rebuilds in seconds.
        return self._ensure(ref, lambda: self._build(ref, context, dockerfile, args, "platform", layers=True))

    def project(self, project_dir: Path, *, git_sha: str | None = None) -> Image:
        """A generated project's image from its own Dockerfile, on the platform image."""
        platform = self.platform().ref
        dockerfile = project_dir / "Dockerfile"
        args = {"PLATFORM_IMAGE": platform, **({"HANDOFF_GIT_SHA": git_sha} if git_sha else {})}
        digest = inputs_hash(
            dockerfile_text=dockerfile.read_text(),
            context=project_dir,
            files=copied_files(dockerfile, project_dir),
            extra={**args, "PLATFORM_IMAGE": self.podman.image_id(platform), "pip.conf": self.pip.conf()},
        )
        name = re.sub(r"[^a-z0-9._-]+", "-", project_dir.name.lower()).strip("-._") or "project"
        ref = f"{REPOSITORY}/{name}:{digest}"
        return self._ensure(ref, lambda: self._build(ref, project_dir, dockerfile, args, f"project-{name}"))

    def storage_initializer(self) -> Image:
        """KServe's storage initializer (kserve-storage) on the base image."""
        base = self.base().ref
        context = self.work_dir / "storage-initializer"
        context.mkdir(exist_ok=True)
        dockerfile = context / "Dockerfile"
        dockerfile.write_text(STORAGE_INITIALIZER_DOCKERFILE)
        (context / "initializer-entrypoint").write_text(INITIALIZER_ENTRYPOINT)
        args = {"BASE_IMAGE": base}
        digest = inputs_hash(
            dockerfile_text=STORAGE_INITIALIZER_DOCKERFILE,
            context=context,
            files=copied_files(dockerfile, context),
            extra={"BASE_IMAGE": self.podman.image_id(base), "pip.conf": self.pip.conf()},
        )
        ref = f"{REPOSITORY}/storage-initializer:{KSERVE_STORAGE_VERSION}-{digest}"
        return self._ensure(ref, lambda: self._build(ref, context, dockerfile, args, "storage-initializer"))

    def _build(
        self,
        ref: str,
        context: Path,
        dockerfile: Path,
        args: dict[str, str],
        log_name: str,
        *,
        layers: bool = False,
    ) -> None:
        self.podman.build(
            context,
            tag=ref,
            dockerfile=dockerfile,
            build_args=args,
            volumes=self._pip_volumes(),
            network="host",  # pip reaches the index as this machine does
            layers=layers,
            log=self.work_dir / "logs" / f"{log_name}.log",
        )
