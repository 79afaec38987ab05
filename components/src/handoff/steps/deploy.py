"""deploy: serve a registered version and smoke-test it, on this machine or on a cluster.

Locally, the version is fetched from the registry, sha256-checked and served blue/green with the
KServe model server: it takes over the project's port only once it passed the smoke test and the
contract's latency SLO. On a cluster (``--cluster``, or a step running in a pod outside a local
run), the project's KServe InferenceService is rolled out to it with a canary, smoke-tested, then
promoted or rolled back. How each is done is ``handoff.deployment``'s; this step decides where.
"""

from __future__ import annotations

from pathlib import Path

from handoff.deployment import DeployResult, deploy_locally, deploy_to_cluster
from handoff.step_entry import in_cluster


def deploy(
    project_dir: Path | str,
    model_name: str,
    version: str,
    *,
    cluster: bool | None = None,
    champion_only: bool = False,
    registered_contract: bool = False,
) -> DeployResult:
    """Serve ``model_name`` version ``version`` and smoke-test it.

    The checks enforce the working tree's contract.yaml (its SLOs may have moved on since
    registration; its interface may not), or with ``registered_contract`` the one the version was
    registered with. Once the version serves, its ``handoff.served`` tag says where and when.

    ``champion_only`` (what the pipelines pass) refuses a version the ``champion`` alias no longer
    points at, before anything changes; and if the deploy fails, the promotion it was to complete
    is undone, so champion never stays on a version that never served.

    ``cluster`` None decides by where the step runs (``in_cluster``): the project's
    InferenceService (``deploy_to_cluster``), else this machine's model server, blue/green
    (``deploy_locally``: if the new version fails to start or fails a check, the old one never
    stopped serving, and the step fails saying why).
    """
    if cluster is None:
        cluster = in_cluster()
    if cluster:
        return deploy_to_cluster(
            project_dir,
            model_name,
            version,
            champion_only=champion_only,
            registered_contract=registered_contract,
        )
    return deploy_locally(
        project_dir, model_name, version, champion_only=champion_only, registered_contract=registered_contract
    )
