"""The CHANGELOG a release writes: the notes under its ``## X.Y.Z (unreleased)`` heading, dated.

The platform team writes what a release brings under ``## X.Y.Z (unreleased)`` as it lands; the
release of X.Y.Z dates that heading and keeps the notes as they are (the commit subjects they
summarise are not repeated: ``git log vPREVIOUS..vX.Y.Z`` lists them). A release without such
notes gets one bullet per commit subject since the last tag. An ``(unreleased)`` heading of a
version that is already tagged (left by a release that did not date it) gets the tag's date; one
of any other version is refused, before the tests run, rather than shipped under the wrong number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

FILE = "CHANGELOG.md"
HEADER = "# Changelog\n\nEach release of the template, newest first (written by `make release`).\n\n"
UNRELEASED = "unreleased"
HEADING = re.compile(r"^## (?P<version>\S+) \((?P<when>[^)]*)\)\s*$")


class NotesError(ValueError):
    """The CHANGELOG cannot take this release as it stands; the message says which line and why."""


@dataclass
class Section:
    """One ``## version (when)`` heading and the lines under it, up to the next heading."""

    line: int  # the heading's line number in the file, for messages
    version: str
    when: str
    body: list[str]

    def text(self) -> str:
        return f"## {self.version} ({self.when})\n" + "".join(self.body)

    def has_notes(self) -> bool:
        return any(line.strip() for line in self.body)


def parse(text: str) -> tuple[str, list[Section]]:
    """The text before the first release heading, and the sections in file order.

    A ``## `` line that is not ``## version (when)`` stays in the body of the section above it.
    """
    preamble: list[str] = []
    sections: list[Section] = []
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        match = HEADING.match(line)
        if match:
            sections.append(Section(number, match["version"], match["when"], []))
        elif sections:
            sections[-1].body.append(line)
        else:
            preamble.append(line)
    return "".join(preamble), sections


def released(text: str, version: str, today: date, subjects: list[str], tagged: dict[str, str]) -> str:
    """The CHANGELOG once ``version`` is released ``today``.

    ``text`` is the CHANGELOG now ('' when there is none), ``subjects`` the commit subjects since
    the last tag (the notes when none are written), ``tagged`` each tagged version's tag date.
    """
    preamble, sections = parse(text)
    if not preamble.strip():
        preamble = HEADER
    elif not preamble.endswith("\n\n"):
        preamble = preamble.rstrip("\n") + "\n\n"
    ours: Section | None = None
    for section in sections:
        heading = f"'## {section.version} ({section.when})'"
        if section.version == version and section.when != UNRELEASED:
            raise NotesError(
                f"{FILE}: line {section.line}: {version} already has a section ({heading}); "
                f"remove it or merge its notes under '## {version} ({UNRELEASED})'"
            )
        if section.when != UNRELEASED:
            continue
        if section.version == version:
            if ours is not None:
                raise NotesError(
                    f"{FILE}: line {section.line}: a second {heading} (the first is on line {ours.line}); "
                    "merge the two"
                )
            ours = section
        elif section.version in tagged:
            section.when = tagged[section.version]
        else:
            raise NotesError(
                f"{FILE}: line {section.line}: {heading} is not the version being released ({version}): "
                f"rename it '## {version} ({UNRELEASED})' if its notes are this release's, "
                f"or release {section.version}"
            )
    when = today.isoformat()
    if ours is None:
        ours = Section(0, version, when, bullets(subjects, more=bool(sections)))
        sections.insert(0, ours)
    else:
        ours.when = when
        if not ours.has_notes():
            ours.body = bullets(subjects, more=ours is not sections[-1])
    return preamble + "".join(section.text() for section in sections)


def bullets(subjects: list[str], *, more: bool) -> list[str]:
    """A blank line, one bullet per subject, and a blank line before the next section if any."""
    return ["\n", *(f"- {subject}\n" for subject in subjects), *(["\n"] if more else [])]
