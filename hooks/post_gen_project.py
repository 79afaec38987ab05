"""Finish the generated project: the chosen starter's files, the template commit, the first commit.

1. **The starter.** Every starter's model.py, contract.yaml and model_card.md are rendered under
   ``starters/<name>/``; the chosen one's move into place and the folder goes. (Per-starter files
   rather than Jinja conditionals: each starter stays a plain Python file, YAML file and Markdown
   file that reads, lints and diffs as the researcher will get it.) The card records the sha256
   of the starter model.py it describes, so handoff can tell a card that still describes the
   starter from one written for the researcher's own model (handoff.model_card).
2. **The template commit** in `.cruft.json`, so the project can `cruft update` later. `cruft
   create` writes that file itself (its context carries `_commit`); plain `cookiecutter
   gh:org/ml-template --checkout vX.Y.Z` does not, so this hook writes the same record from the
   clone cookiecutter made: template address, commit, checkout and answers. The address is one git
   and cruft can clone (cookiecutter's `git+` prefix dropped, a `file://` URL as its path, as `cruft
   create` records it), and the commit is found whatever the user's cookiecutter configuration
   (see template_commit). A project generated from a local folder gets no record (its files may
   differ from any commit); the hook says how to link it instead.
3. **The first commit**, so lineage has a commit from the first run and `cruft update` a clean
   tree: `git init` and commit everything, as the configured git user or, where git has none, as
   the project's author at a placeholder address (said so, with the command to fix it). Skipped,
   with a note, where git is not installed or the project lands inside another repository; and
   under cruft, which writes .cruft.json after this hook and renders projects through it again
   on every `cruft update` (a repository there would enter the update's diff).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

# The rendered answers, machine-local keys included (dropped below).
context = json.loads({{cookiecutter | jsonify | tojson}})  # noqa: F821 (rendered by cookiecutter)
LOCAL_KEYS = ("_output_dir", "_repo_dir", "_checkout")
STARTERS = Path("starters")
STARTER_FILES = ("model.py", "contract.yaml", "model_card.md")
CARD_SHA_PLACEHOLDER = "STARTER_MODEL_SHA256"
FIRST_COMMIT_MESSAGE = "New project from ml-template {{ cookiecutter._template_version }}"
# A whole commit id (SHA-1 or SHA-256) given as the checkout is the commit itself.
FULL_COMMIT = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def use_starter(name: str) -> None:
    """Move the chosen starter's files into place; record its model.py's sha256 in its card."""
    for file in STARTER_FILES:
        (STARTERS / name / file).replace(file)
    shutil.rmtree(STARTERS)
    # The same digest handoff.model_card computes: line endings normalised (a checkout with
    # CRLF endings is the same model.py).
    model = Path("model.py").read_text(encoding="utf-8").replace("\r\n", "\n")
    card = Path("model_card.md")
    digest = hashlib.sha256(model.encode("utf-8")).hexdigest()
    card.write_text(card.read_text(encoding="utf-8").replace(CARD_SHA_PLACEHOLDER, digest), encoding="utf-8")


def clone_url(template: str) -> str | None:
    """The address cookiecutter had git clone the template from; None for a folder or a zip file.

    cookiecutter reads a `git+` or `hg+` prefix as the kind of repository and hands git the rest;
    git itself does not understand the prefix (`git: 'remote-git+file' is not a git command`).
    """
    from cookiecutter.config import BUILTIN_ABBREVIATIONS
    from cookiecutter.exceptions import UnknownRepoType
    from cookiecutter.repository import expand_abbreviations, is_repo_url, is_zip_file
    from cookiecutter.vcs import identify_repo

    address = expand_abbreviations(template, BUILTIN_ABBREVIATIONS)
    if is_zip_file(address) or not is_repo_url(address):
        return None
    try:
        kind, url = identify_repo(address)
    except UnknownRepoType:
        return None
    return url.rstrip("/") if kind == "git" else None


def from_folder(template: str) -> bool:
    """True for a template given as a folder (not a repository address, not a zip file)."""
    from cookiecutter.config import BUILTIN_ABBREVIATIONS
    from cookiecutter.repository import expand_abbreviations, is_repo_url, is_zip_file

    address = expand_abbreviations(template, BUILTIN_ABBREVIATIONS)
    return not (is_repo_url(address) or is_zip_file(address))


def recorded_address(url: str) -> str:
    """The address .cruft.json records: a `file://` URL as its path, as `cruft create` records it."""
    return urlparse(url).path if url.startswith("file://") else url


def template_commit(url: str) -> str | None:
    """The commit the project was generated from, or None where it cannot be known for sure.

    cookiecutter's clone says it best, but ``_repo_dir`` is relative where the user's
    ``cookiecutters_dir`` is, and relative to the folder cookiecutter started in, not to this
    hook's (the new project). So each place the clone may be is accepted only when it is a clone
    of ``url`` sitting at the checkout; failing that, a full commit id names itself, and a branch,
    a tag or the default branch is looked up in the repository.
    """
    checkout = context.get("_checkout")
    for clone in candidate_clones(context.get("_repo_dir") or ""):
        commit = head_of_clone(clone, url, checkout)
        if commit:
            return commit
    if checkout and FULL_COMMIT.fullmatch(checkout):
        return checkout.lower()
    return remote_commit(url, checkout)


def candidate_clones(repo_dir: str) -> list[Path]:
    """Where cookiecutter's clone may be: ``_repo_dir`` itself, or under the folder cookiecutter
    started in (a shell's PWD; the output folder, which is that folder unless ``-o`` moved it)."""
    if not repo_dir:
        return []
    path = Path(repo_dir)
    if path.is_absolute():
        return [path]
    bases = [os.environ.get("PWD"), context.get("_output_dir")]
    return list(dict.fromkeys(Path(base) / path for base in bases if base))


def head_of_clone(clone: Path, url: str, checkout: str | None) -> str | None:
    """The clone's commit, if ``clone`` is a clone of ``url`` checked out at ``checkout``."""
    if not (clone / ".git").exists():
        return None
    origin = git("remote", "get-url", "origin", cwd=str(clone))
    head = git("rev-parse", "HEAD", cwd=str(clone))
    if not (origin and head and origin.returncode == head.returncode == 0):
        return None
    if origin.stdout.strip().rstrip("/") != url:
        return None
    # (Concatenated, not an f-string: cookiecutter renders this file with Jinja first.)
    wanted = git(
        "rev-parse", "--verify", "--quiet", (checkout or "origin/HEAD") + "^{commit}", cwd=str(clone)
    )
    if not (wanted and wanted.returncode == 0 and wanted.stdout.strip() == head.stdout.strip()):
        return None
    return head.stdout.strip()


def remote_commit(url: str, checkout: str | None) -> str | None:
    """The commit ``checkout`` (a tag, a branch, or the default branch for None) names in the
    repository at ``url``; None for anything else (an abbreviated commit id, say)."""
    # No password prompt from a hook: a repository that needs one was just cloned, so git's
    # credential helper or ssh agent has what it needs, or the lookup fails and says so.
    listed = git("ls-remote", "--", url, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}, timeout=60)
    if not listed or listed.returncode != 0:
        return None
    refs = dict(reversed(line.split("\t", 1)) for line in listed.stdout.splitlines() if "\t" in line)
    if checkout is None:
        names = ["HEAD"]
    else:  # as `git checkout` resolves a name in a fresh clone: a tag first, then a branch
        names = ["refs/tags/" + checkout + "^{}", "refs/tags/" + checkout, "refs/heads/" + checkout]
    return next((refs[name] for name in names if name in refs), None)


def git(
    *args: str, cwd: str = ".", env: dict[str, str] | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str] | None:
    """Run git; None where it is not installed or did not answer in time."""
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None


def has_setting(name: str) -> bool:
    found = git("config", "--get", name)
    return bool(found and found.returncode == 0 and found.stdout.strip())


def first_commit() -> None:
    how = "to commit it yourself: git init -b main && git add -A && git commit -m 'New project'"
    if "_commit" in context:  # cruft (see the module docstring); README says to commit
        return
    inside = git("rev-parse", "--show-toplevel")
    if inside is None:
        note(f"git is not installed, so the project is not a git repository yet; {how}")
        return
    if inside.returncode == 0:
        note(
            f"the project is inside the git repository at {inside.stdout.strip()}: not making "
            "another; commit it there"
        )
        return
    identity: list[str] = []
    if not (has_setting("user.name") and has_setting("user.email")):
        author = context["author"]
        email = re.sub(r"[^a-z0-9]+", "-", author.lower()).strip("-") or "research"
        identity = ["-c", f"user.name={author}", "-c", f"user.email={email}@example.invalid"]
        note(
            f"git has no user.name or user.email here: committed as {author} "
            f"<{email}@example.invalid>; set yours (git config --global user.name/user.email), "
            "then `git commit --amend --reset-author --no-edit`"
        )
    steps = (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        [*identity, "commit", "-q", "-m", FIRST_COMMIT_MESSAGE],
    )
    for step in steps:
        done = git(*step)
        if done is None or done.returncode != 0:
            error = done.stderr.strip() if done else "git is not installed"
            note(f"`git {' '.join(step)}` failed ({error}); {how}")
            return


def main() -> None:
    use_starter(context["starter"])
    record_template_commit()
    first_commit()


def record_template_commit() -> None:
    if "_commit" in context:  # cruft: it writes .cruft.json after generation
        return
    url = clone_url(context["_template"])
    if url is None:
        source = (
            "a local folder" if from_folder(context["_template"]) else "a zip file or a Mercurial repository"
        )
        note(
            f"generated from {source}, so no template commit is recorded; to enable "
            "`cruft update`, generate from the repository (`cruft create <url> --checkout vX.Y.Z`) "
            "or run `cruft link <url>` in the project"
        )
        if not context["_package_index"]:
            # pyproject.toml could name no repository to install the platform's packages from.
            version = context["_template_version"]
            note(
                f"pyproject.toml pins ml-handoff=={version} by version, so `make setup` "
                "needs a package index that serves it: `make setup PACKAGE_INDEX=<index URL>`"
            )
        return
    address = recorded_address(url)
    commit = template_commit(url)
    if commit is None:
        note(
            f"could not tell which commit of {address} the project was generated from, so no "
            f"template commit is recorded; to enable `cruft update`, run `cruft link {address} "
            "--checkout vX.Y.Z` in the project"
        )
        return
    answers = {key: value for key, value in context.items() if key not in LOCAL_KEYS}
    answers.update(_template=address, _commit=commit)
    record = {
        "template": address,
        "commit": commit,
        "checkout": context.get("_checkout"),
        "context": {"cookiecutter": answers},
        "directory": None,
    }
    text = json.dumps(record, ensure_ascii=False, indent=2, separators=(",", ": ")) + "\n"
    Path(".cruft.json").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
