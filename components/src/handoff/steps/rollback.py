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

from mlflow.exceptions import MlflowException

from handoff.errors import HandoffError
from handoff.project import Project
from handoff.promotion_lock import promotion_lock
from handoff.steps.deploy import DeployResult, deploy
from handoff.steps.register import PREVIOUS_CHAMPION_TAG, describe_registered_model
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
    try:
        client.get_model_version(name, to)
    except MlflowException:
        raise HandoffError(
            f"model {name!r} has no version {to!r} in the registry ({project.tracking_uri})", field="--to"
        ) from None
    # Serves, or raises with nothing changed; under the contract it was registered (and served)
    # with: a rollback restores what served before, whatever the working tree says since.
    deployed = deploy(project.root, name, to, cluster=False, registered_contract=True)
    with promotion_lock(client, name, f"rollback of {name} to v{to}"):
        now = alias_version(client, name, CHAMPION)
        if now != current:
            raise HandoffError(
                f"champion moved from v{current} to v{now} while rolling back to v{to}; champion left "
                f"at v{now} (the local server serves v{to}): run `handoff rollback` again if still wanted"
            )
        client.set_registered_model_alias(name, CHAMPION, to)
    describe_registered_model(client, name, project)
    return RollbackResult(model_name=name, from_version=current, to_version=to, deployed=deployed)
