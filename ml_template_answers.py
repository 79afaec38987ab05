"""The Jinja extension cookiecutter.json names in ``_extensions``: the answers check.

cookiecutter and cruft import it from the template's folder, which they add to the import path
while they render; a module name nothing else has, so no installed or local ``hooks`` package can
stand in for it. The rules themselves live in hooks/pre_gen_project.py (also the pre-generation
hook) and are loaded from that file each time an environment is made, from the template being
rendered now (the last folder on the import path that holds this file): cruft renders two commits,
and `handoff upgrade` more, in one process, and a module cached from the first would judge the
next by older rules, or look for them in a clone since deleted. Keep this file small and stable,
since a newer release's rules are found through it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from jinja2 import Environment
from jinja2.ext import Extension

RULES = Path("hooks") / "pre_gen_project.py"


def rules_file() -> Path:
    """hooks/pre_gen_project.py of the template being rendered: cookiecutter and cruft append its
    folder to the import path, so it is the last one there with this file beside the rules."""
    for entry in reversed(sys.path):
        folder = Path(entry or ".")
        if (folder / RULES).is_file() and (folder / Path(__file__).name).is_file():
            return folder / RULES
    return Path(__file__).resolve().parent / RULES


class AnswersCheck(Extension):
    """Adds the rules' filters (``FILTERS``: ``check_answers``), from the rules file as it is now."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        path = rules_file()
        spec = importlib.util.spec_from_file_location("ml_template_answer_rules", path)
        assert spec is not None and spec.loader is not None, path
        rules = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rules)
        environment.filters.update(rules.FILTERS)
