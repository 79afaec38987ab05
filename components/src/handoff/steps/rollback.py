"""rollback: point ``champion`` back at the version it replaced and serve that one locally.

The version to return to is the one recorded when the current champion was promoted (its
``handoff.previous_champion`` tag), or an explicit ``--to``. It is deployed first (downloaded,
sha256-checked, smoke-tested) and ``champion`` moves only once it serves, so a failed rollback
leaves the registry as it was. It moves under the registry's promotion lock, and only if the
champion is still the one it rolled back from (a register may have promoted meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from handoff.deployment import DeployResult, deploy_locally
from handoff.errors import HandoffError
from handoff.project import Project
from handoff.registry import PREVIOUS_CHAMPION_TAG, describe_registered_model, move_champion, version_tags
from handoff.tracking import CHAMPION, alias_version, use_tracking


@dataclass(frozen=True)
class RollbackResult:
    """The champion before and after, and where it now serves."""

    model_name: str
    from_version: str
    to_version: str
    deployed: DeployResult


def rollback(project_dir: Path | str, to: str | None = None) -> RollbackResult:
    """Make ``to`` (default: the version the champion replaced) champion again and serve it."""
    project = Project.load(project_dir)
    client = use_tracking(project)
    name = project.contract.name
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise HandoffError(
            f"model {name!r} has no champion in the registry ({project.tracking_uri}): nothing to roll back"
        )
    if to is None:
        to = client.get_model_version(name, current).tags.get(PREVIOUS_CHAMPION_TAG)
        if not to:
            raise HandoffError(
                f"{name} v{current} is champion and replaced no earlier champion (no "
                f"{PREVIOUS_CHAMPION_TAG} tag): nothing to roll back to; name a version with --to",
                field="--to",
            )
    if to == current:
        raise HandoffError(f"{name} v{to} is already champion: nothing to roll back", field="--to")
    version_tags(project, name, to, field="--to")  # one the registry has
    # Serves, or raises with nothing changed; under the contract it was registered (and served)
    # with: a rollback restores what served before, whatever the working tree says since.
    deployed = deploy_locally(project.root, name, to, registered_contract=True)
    move = move_champion(client, name, to, expected=current, holder=f"rollback of {name} to v{to}")
    if not move.moved:
        raise HandoffError(
            f"champion moved from v{current} to v{move.before} while rolling back to v{to}; champion left "
            f"at v{move.before} (the local server serves v{to}): run `handoff rollback` again if still wanted"
        )
    describe_registered_model(client, name, project)
    return RollbackResult(model_name=name, from_version=current, to_version=to, deployed=deployed)
