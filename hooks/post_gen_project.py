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
   clone cookiecutter made: template address, commit, checkout and answers. A project generated
   from a local folder gets no record (its files may differ from any commit); the hook says how to
   link it instead.
3. **The first commit**, so lineage has a commit from the first run and `cruft update` a clean
   tree: `git init` and commit everything, as the configured git user or, where git has none, as
   the project's author at a placeholder address (said so, with the command to fix it). Skipped,
   with a note, where git is not installed or the project lands inside another repository; and
   under cruft, which writes .cruft.json after this hook and renders projects through it again
   on every `cruft update` (a repository there would enter the update's diff).
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

# The rendered answers, machine-local keys included (dropped below).
context = json.loads({{ cookiecutter | jsonify | tojson }})
LOCAL_KEYS = ("_output_dir", "_repo_dir", "_checkout")
STARTERS = Path("starters")
STARTER_FILES = ("model.py", "contract.yaml", "model_card.md")
CARD_SHA_PLACEHOLDER = "STARTER_MODEL_SHA256"
FIRST_COMMIT_MESSAGE = "New project from ml-template {{ cookiecutter._template_version }}"


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


def template_address(template: str) -> str | None:
    """The clone address for a repository template (gh:/gl:/bb: expanded), None for a folder."""
    from cookiecutter.config import BUILTIN_ABBREVIATIONS
    from cookiecutter.repository import expand_abbreviations, is_repo_url

    address = expand_abbreviations(template, BUILTIN_ABBREVIATIONS)
    if not is_repo_url(address):
        return None
    if address.startswith("file://"):  # as cruft records it: the path itself
        return urlparse(address).path
    return address


def clone_commit(repo_dir: str) -> str | None:
    if not Path(repo_dir).is_absolute():
        return None
    found = git("rev-parse", "HEAD", cwd=repo_dir)
    return found.stdout.strip() if found and found.returncode == 0 else None


def git(*args: str, cwd: str = ".") -> subprocess.CompletedProcess[str] | None:
    """Run git; None where it is not installed."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
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
        note(f"the project is inside the git repository at {inside.stdout.strip()}: not making "
             "another; commit it there")
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
    address = template_address(context["_template"])
    commit = clone_commit(context.get("_repo_dir", "")) if address else None
    if not address or not commit:
        note(
            "generated from a local folder, so no template commit is recorded; to enable "
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
