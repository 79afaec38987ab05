"""What ``handoff ab start`` left running, recorded in the project's state folder (``ab.json``):
read by ``handoff ab`` itself, and by ``handoff deploy`` and ``handoff stop``, which must not strand
an A/B test's servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from handoff.files import read_json
from handoff.project import Project
from handoff.serving import local_server
from handoff.serving.local_server import ServerHandle

AB_FILE = "ab.json"


@dataclass
class AbTest:
    """What ``handoff ab start`` left running (``ab.json``)."""

    model_name: str
    champion: str
    challenger: str
    share: int
    key_header: str | None
    started: float  # unix seconds
    target: str  # "local" or "cluster"
    url: str
    router: dict[str, Any] | None = None  # local: the router's ServerHandle
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # local: arm -> ServerHandle
    cluster: dict[str, Any] | None = None  # cluster: ab_cluster.ClusterAb

    def handles(self) -> list[ServerHandle]:
        return [ServerHandle(**h) for h in ([self.router] if self.router else []) + list(self.arms.values())]


def load_ab(project: Project) -> AbTest | None:
    try:
        return AbTest(**read_json(project.state_dir / AB_FILE))
    except (OSError, ValueError, TypeError):
        return None


def running_ab(project: Project) -> AbTest | None:
    """The A/B test serving this project, if any (a local one whose router has exited is not)."""
    ab = load_ab(project)
    if ab is None:
        return None
    if ab.target == "local" and (ab.router is None or not local_server.alive(ServerHandle(**ab.router))):
        return None
    return ab
