"""Record the exact template commit in `.cruft.json`, so the project can `cruft update` later.

`cruft create` writes that file itself (its context carries `_commit`); plain
`cookiecutter gh:org/ml-template --checkout vX.Y.Z` does not, so this hook writes the same record
from the clone cookiecutter made: template address, commit, checkout and answers. A project
generated from a local folder gets no record (its files may differ from any commit); the hook
says how to link it instead.
"""

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

# The rendered answers, machine-local keys included (dropped below).
context = json.loads({{ cookiecutter | jsonify | tojson }})
LOCAL_KEYS = ("_output_dir", "_repo_dir", "_checkout")


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
    found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def main() -> None:
    if "_commit" in context:  # cruft: it writes .cruft.json after generation
        return
    address = template_address(context["_template"])
    commit = clone_commit(context.get("_repo_dir", "")) if address else None
    if not address or not commit:
        print(
            "note: generated from a local folder, so no template commit is recorded; to enable "
            "`cruft update`, generate from the repository (`cruft create <url> --checkout vX.Y.Z`) "
            "or run `cruft link <url>` in the project",
            file=sys.stderr,
        )
        if not context["_package_index"]:
            # pyproject.toml could name no repository to install the platform's packages from.
            version = context["_template_version"]
            print(
                f"note: pyproject.toml pins ml-handoff=={version} by version, so `make setup` "
                "needs a package index that serves it: `make setup PACKAGE_INDEX=<index URL>`",
                file=sys.stderr,
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
