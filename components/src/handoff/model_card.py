"""The model card (``model_card.md``): required sections, checked before a model may be registered,
and the copy attached to each registered version with the measured facts filled in.

The researcher writes the parts only a person can (intended use, data, limitations, ethics,
owners); the platform appends what it measured (metrics, gates, contract, lineage, plots), so
the card in the registry can never disagree with the evaluation it describes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handoff.errors import HandoffError

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


def card_problems(text: str) -> list[str]:
    """One entry per required section that is missing, empty or still a placeholder."""
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
    return problems


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
    problems = card_problems(text)
    if problems:
        raise HandoffError("incomplete, so the model cannot be registered: " + "; ".join(problems), file=path)
    return text


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


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
