"""The model registry as the steps use it: which version is which, what it holds, who is champion.

Everything the steps do with MLflow's model registry, beyond logging a run, is here: the tags a
version carries (its identity, where its Triton repository is, how it became champion, whether it
served), finding the version a model was already registered as, downloading a version and
checking it is the file that was registered, moving ``champion`` under the registry's promotion
lock (``handoff.promotion_lock``), undoing a promotion whose deploy failed, and the registered
model's description. register writes these, deploy, evaluate and rollback read and move them.

The MLflow connection and the alias names (``use_tracking``, ``CHAMPION``, ``CHALLENGER``,
``alias_version``) sit one level down, in ``handoff.tracking``: the gates, the readiness report
and the CLI read them too, without the rest of this module.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from handoff.artifacts import EXAMPLE_FILE, EXTRA_DIR, ONNX_FILE
from handoff.contract import CONTRACT_FILE, Contract, load_contract
from handoff.errors import HandoffError
from handoff.files import read_json, sha256_of
from handoff.project import Project
from handoff.promotion_lock import promotion_lock
from handoff.tracking import CHAMPION, alias_version, use_tracking

SHA_TAG = "handoff.onnx_sha256"
# The artifact URI of the version's Triton model repository (its root; the model folder inside
# is named after the contract).
TRITON_TAG = "handoff.triton_uri"
# Set on a version when it becomes champion: the version it replaced (what rollback returns to).
PREVIOUS_CHAMPION_TAG = "handoff.previous_champion"
# Set by every register on its version: whether it was promoted, and if not, why ("promoted: ...",
# "not promoted: ..."); deploy's rollback of a failed promotion sets "promotion undone: ...". A
# champion registered again keeps the tag that says how it became champion.
PROMOTION_TAG = "handoff.promotion"
# The content hash of the contract the version was registered with (``Contract.sha256``): with the
# ONNX sha256, what identifies a version.
CONTRACT_TAG = "handoff.contract_sha256"
# With preprocess/postprocess (contract ``raw:``): the sha256 of the Python files the model server
# runs beside the model (export's copy, ``served_code_sha256``), part of the version's identity.
CODE_TAG = "handoff.served_code_sha256"
# Set by deploy once the version has served (passed its smoke test and latency check): where and
# when. A champion without it never served, and a failed deploy undoes its promotion.
SERVED_TAG = "handoff.served"
# When a drift verdict on this version last started a training run (UTC ISO time, then the runs):
# what keeps a drift that lasts from starting a run at every monitoring run (handoff retrain).
RETRAIN_TAG = "handoff.retrain.requested"


def version_tags(project: Project, name: str, version: str, *, field: str | None = None) -> dict[str, str]:
    """The tags of ``name`` version ``version``; a version the registry does not have is the user's
    error (a wrong ``--version`` or ``--to``, ``field``), said with the registry it was looked up in."""
    try:
        return dict(use_tracking(project).get_model_version(name, version).tags)
    except MlflowException:
        raise HandoffError(
            f"model {name!r} has no version {version!r} in the registry ({project.tracking_uri})", field=field
        ) from None


def existing_version(client: MlflowClient, name: str, identity: dict[str, str]) -> str | None:
    """The version already registered with exactly these identity tags, or None.

    The identity is the ONNX file's sha256 and the contract's, plus the served code's when the
    model has preprocess/postprocess. A retried register (a step restarted after a crash, a
    pipeline run again) then reuses it instead of adding a duplicate; the oldest wins if an
    earlier release left several. The same bytes under an edited contract (a new SLO) or with
    edited serving code are a new version: deploy and the gates enforce what it was registered with.
    """
    query = " and ".join([f"name='{name}'", *(f"tags.`{tag}`='{value}'" for tag, value in identity.items())])
    try:
        found = client.search_model_versions(query)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return str(min(int(v.version) for v in found)) if found else None


def verify_artifact(name: str, version: str, sha: str) -> None:
    """Download the version's stored model.onnx and check it is the file with sha256 ``sha``."""
    with tempfile.TemporaryDirectory(prefix="handoff-verify-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{name}/{version}/{ONNX_FILE}", dst_path=tmp
                )
            )
            actual = sha256_of(local) if local.is_file() else None
        except (MlflowException, OSError):
            actual = None
    if actual is None:
        raise HandoffError(
            f"registered version {name}/{version} has no {ONNX_FILE} in the artifact store; "
            "aliases left unchanged (register the model again)",
            field=SHA_TAG,
        )
    if actual != sha:
        raise HandoffError(
            f"registered version {name}/{version}: the stored {ONNX_FILE} has sha256 {actual[:12]}…, "
            f"expected {sha[:12]}… (the artifact store was changed); aliases left unchanged",
            field=SHA_TAG,
        )


def fetch_model(project: Project, name: str, version: str) -> Path:
    """Download a registered version into the project's state folder and verify its sha256."""
    expected = version_tags(project, name, version).get(SHA_TAG)
    models = project.state_dir / "models"
    models.mkdir(exist_ok=True)
    # Downloaded beside, then moved into place: a failed download never leaves half a model.
    download = Path(tempfile.mkdtemp(dir=models, prefix=".download-"))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(download))
        local = models / f"{name}-v{version}"
        shutil.rmtree(local, ignore_errors=True)  # a running server has already loaded its copy
        download.rename(local)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    for needed in (ONNX_FILE, f"{EXTRA_DIR}/{EXAMPLE_FILE}", f"{EXTRA_DIR}/{CONTRACT_FILE}"):
        if not (local / needed).is_file():
            raise HandoffError(
                f"registered version {name}/{version} has no {needed} artifact; "
                "register it again with `handoff register`"
            )
    actual = sha256_of(local / ONNX_FILE)
    if expected != actual:
        raise HandoffError(
            f"registered version {name}/{version}: artifact sha256 {actual[:12]}… does not "
            f"match its {SHA_TAG} tag {str(expected)[:12]}…; refusing to serve it"
        )
    return local


def registered_example(project: Project, name: str, version: str) -> tuple[Contract, dict[str, Any]]:
    """The contract and the contract example ``name`` version ``version`` was registered with, without
    the model (a cluster's predictor downloads that itself, from the Triton repository)."""
    with tempfile.TemporaryDirectory(dir=project.state_dir, prefix=".registered-") as tmp:
        try:
            files = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{name}/{version}/{EXTRA_DIR}", dst_path=tmp
                )
            )
        except (MlflowException, OSError):
            files = Path(tmp) / EXTRA_DIR  # reported below, with what to do
        if not (files / CONTRACT_FILE).is_file() or not (files / EXAMPLE_FILE).is_file():
            raise HandoffError(
                f"registered version {name}/{version} has no {CONTRACT_FILE} or {EXAMPLE_FILE} "
                "attached; register it again with `handoff register`"
            )
        return load_contract(files), read_json(files / EXAMPLE_FILE)


def mark_served(project: Project, name: str, version: str, where: str) -> None:
    """Record on the version that it served (what ``undo_promotion`` asks before demoting it)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    use_tracking(project).set_model_version_tag(name, version, SERVED_TAG, f"{where} {stamp}")


class ChampionMove(NamedTuple):
    """What ``move_champion`` found under the lock: the champion before it (None: there was none),
    and whether it then pointed ``champion`` at the version."""

    before: str | None
    moved: bool


def move_champion(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    expected: str | None,
    holder: str,
    record_previous: bool = False,
) -> ChampionMove:
    """Point ``champion`` at ``version`` if it still is ``expected`` (None: no champion), as one
    compare-and-set under the promotion lock: nothing moves it between this read and this write.

    Moves nothing when ``version`` already is champion, or when champion is another version than
    ``expected`` (another register or rollback moved it meanwhile); the caller says why. With
    ``record_previous`` (a promotion), the version records the champion it replaced
    (``handoff.previous_champion``: what ``handoff rollback`` returns to). ``holder`` says who holds
    the lock, for whoever waits on it.
    """
    with promotion_lock(client, name, holder):
        current = alias_version(client, name, CHAMPION)
        if current == version or current != expected:
            return ChampionMove(current, moved=False)
        if record_previous and current is not None:
            client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, current)
        client.set_registered_model_alias(name, CHAMPION, version)
    return ChampionMove(current, moved=True)


def undo_promotion(client: MlflowClient, name: str, version: str, why: str) -> str:
    """Undo the promotion of ``version`` when the deploy that followed it failed; returns what was
    done, as a sentence for the error ('' when nothing was to undo).

    Promotion and the deploy after it are one transaction: a champion that never served goes back
    to the version it replaced (its ``handoff.previous_champion`` tag) or, the first champion, is
    removed. A version that has served (``handoff.served``) stays champion: a failed redeploy of
    what is serving is not a reason to change what serves. Under the promotion lock, and only if
    ``version`` still is champion (another run may have promoted meanwhile).
    """
    with promotion_lock(client, name, f"undoing the promotion of {name} v{version}"):
        if alias_version(client, name, CHAMPION) != version:
            return ""
        tags = client.get_model_version(name, version).tags
        if tags.get(SERVED_TAG):
            return ""
        previous = tags.get(PREVIOUS_CHAMPION_TAG)
        if previous:
            client.set_registered_model_alias(name, CHAMPION, previous)
            done = f"champion moved back to v{previous}, which it replaced"
        else:
            client.delete_registered_model_alias(name, CHAMPION)
            done = f"champion removed: v{version} was the first champion and never served"
        client.set_model_version_tag(
            name, version, PROMOTION_TAG, f"promotion undone: its deploy failed ({why})"
        )
    print(f"handoff: {done}", file=sys.stderr, flush=True)
    return done


def describe_registered_model(client: MlflowClient, name: str, project: Project) -> str:
    """Set the registered model's description (the registry page's first lines): the project's
    own description and what its champion is, from the champion's tags (no links, which the
    registry would not resolve). Called whenever the champion may have moved."""
    pyproject = project.root / "pyproject.toml"
    about = (
        tomllib.loads(pyproject.read_text())["project"].get("description", "") if pyproject.is_file() else ""
    )
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        now = "No champion: no version has passed its gate and been promoted yet."
    else:
        tags = client.get_model_version(name, champion).tags
        sha = tags.get(SHA_TAG, "")
        now = (
            f"Champion: version {champion} ({tags.get(PROMOTION_TAG, 'promoted')}); gate "
            f"{tags.get('handoff.gate', 'unknown')}; model.onnx sha256 {sha[:12]}…; git "
            f"{tags.get('handoff.git_sha', 'unknown')[:12]}; "
            f"template {tags.get('handoff.template_version', '?')}. "
            f"Its model card is version {champion}'s description."
        )
    description = f"{about}\n\n{now}" if about else now
    client.update_registered_model(name, description)
    return description


def retrain_requested(client: MlflowClient, name: str, version: str) -> tuple[datetime, str] | None:
    """When a drift verdict on ``version`` last started a training run, and which (its
    ``RETRAIN_TAG``); None when none did or the registry does not hold the version."""
    try:
        value = client.get_model_version(name, version).tags.get(RETRAIN_TAG)
    except MlflowException:
        return None
    if not value:
        return None
    stamp, _, runs = value.partition(" ")
    try:
        return datetime.fromisoformat(stamp), runs
    except ValueError:
        return None


def record_retrain(client: MlflowClient, name: str, version: str, runs: str, now: datetime) -> bool:
    """Record on ``version`` that its drift started ``runs`` at ``now``; False when the registry
    does not hold the version (a verdict on a version registered elsewhere)."""
    try:
        client.set_model_version_tag(
            name, version, RETRAIN_TAG, f"{now.isoformat(timespec='seconds')} {runs}"
        )
    except MlflowException:
        return False
    return True
