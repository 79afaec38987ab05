"""The model card (``model_card.md``): required sections, checked before a model may be registered,
and the copy attached to each registered version with the measured facts filled in.

The researcher writes the parts only a person can (intended use, data, limitations, ethics,
owners); the platform appends what it measured (metrics, gates, contract, lineage, plots), so
the card in the registry can never disagree with the evaluation it describes.

A generated project's card is filled in for its starter model (so the starter registers as it
is), and says so in a comment that records the sha256 of the starter's model.py. Once model.py
no longer has that sha256, the card describes a model that is no longer there: it is refused,
naming the sections to rewrite, until the researcher rewrites them and deletes the comment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handoff.errors import HandoffError
from handoff.model_source import MODEL_FILE

CARD_FILE = "model_card.md"
REQUIRED_SECTIONS = (
    "Intended use",
    "Training data",
    "Evaluation data",
    "Limitations",
    "Ethical considerations",
    "Owners",
)
FILLED_IN_HEADING = "## Measured by handoff"
# Words that mark a section as unfinished, as people write them in drafts.
PLACEHOLDER = re.compile(r"\b(TODO|TBD|FIXME)\b|<[^>\n]*(fill|describe|write)[^>\n]*>", re.IGNORECASE)
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# The generated card's claim (hooks/post_gen_project.py writes the sha256): "I describe this
# starter's model.py".
STARTER_CLAIM = re.compile(
    r"<!--\s*handoff: this card describes the (?P<starter>[\w.-]+) starter, "
    r"model\.py sha256 (?P<sha256>[0-9a-f]{64})\b.*?-->",
    re.DOTALL,
)
# The sections a starter's card fills in for the starter's model; Owners stays true of any model.
STARTER_SECTIONS = REQUIRED_SECTIONS[:-1]


def model_sha256(model_source: str) -> str:
    """model.py's sha256 as the generated card records it (line endings normalised)."""
    return hashlib.sha256(model_source.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def sections(text: str) -> dict[str, str]:
    """``## Heading`` -> the text under it (up to the next level-2 heading), headings as written."""
    found: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            if current is not None:
                found[current] = "\n".join(lines).strip()
            current, lines = line[3:].strip(), []
        elif current is not None:
            lines.append(line)
    if current is not None:
        found[current] = "\n".join(lines).strip()
    return found


def card_problems(text: str, model_source: str | None = None) -> list[str]:
    """One entry per required section that is missing, empty or still a placeholder; with
    ``model_source`` (model.py's text), also a card that still describes the starter model."""
    present = {name.casefold(): body for name, body in sections(text).items()}
    problems = []
    for name in REQUIRED_SECTIONS:
        body = present.get(name.casefold())
        if body is None:
            problems.append(f"'{name}' is missing (add a '## {name}' section)")
            continue
        visible = COMMENT.sub("", body).strip()
        if not visible:
            problems.append(f"'{name}' is empty")
        elif match := PLACEHOLDER.search(visible):
            problems.append(f"'{name}' still says {match.group(0)!r}")
    if model_source is not None:
        problems.extend(starter_problems(text, model_source))
    return problems


def starter_problems(text: str, model_source: str) -> list[str]:
    """The card still claims to describe the starter's model.py, but model.py has changed."""
    claim = STARTER_CLAIM.search(text)
    if claim is None or claim.group("sha256") == model_sha256(model_source):
        return []
    named = ", ".join(f"'{name}'" for name in STARTER_SECTIONS)
    return [
        f"it still describes the {claim.group('starter')} starter, but {MODEL_FILE} has changed "
        f"since (its sha256 is no longer the one the card's comment records): rewrite {named} "
        "for your model, then delete the comment that starts 'handoff: this card describes'"
    ]


def project_card_problems(project_root: Path) -> list[str]:
    """``card_problems`` for a project folder: its card read beside its model.py."""
    path = project_root / CARD_FILE
    if not path.is_file():
        return [f"{CARD_FILE} is missing"]
    model = project_root / MODEL_FILE
    return card_problems(
        path.read_text(encoding="utf-8"), model.read_text(encoding="utf-8") if model.is_file() else None
    )


def check_model_card(project_root: Path) -> str:
    """The card's text, or a HandoffError listing every section that blocks registration."""
    path = project_root / CARD_FILE
    if not path.is_file():
        raise HandoffError(
            "missing: every registered model needs a model card with the sections "
            + ", ".join(REQUIRED_SECTIONS),
            file=path,
        )
    text = path.read_text(encoding="utf-8")
    model = project_root / MODEL_FILE
    problems = card_problems(text, model.read_text(encoding="utf-8") if model.is_file() else None)
    if problems:
        raise HandoffError("incomplete, so the model cannot be registered: " + "; ".join(problems), file=path)
    return text


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """One Markdown table cell: a value's own pipes and line breaks (optimize's candidates, one per
    line) must not end the row."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def filled_in_card(card: str, facts: Mapping[str, Mapping[str, Any]], images: Mapping[str, str]) -> str:
    """The researcher's card with a measured section appended: one table per group of facts
    (metrics, gates, contract, lineage) and the report's plots by relative file name."""
    own = card.split(FILLED_IN_HEADING)[0].rstrip()
    note = "Filled in at registration; edit the sections above instead."
    parts = [own, "", FILLED_IN_HEADING, "", note, ""]
    for title, rows in facts.items():
        parts += [f"### {title}", "", _table(rows), ""]
    for caption, file in images.items():
        parts += [f"![{caption}]({file})", ""]
    return "\n".join(parts)
