"""``handoff ab``: test a registered challenger against the champion on live traffic, to a verdict.

``start`` serves both side by side. On this machine, two model servers (the real KServe server,
one per version, on private loopback ports, each smoke-tested; the challenger also against the
latency SLO) behind the A/B router (``serving.ab_router``), which takes over the project's port
from the champion's server blue/green: no connection is refused. On a cluster (``--cluster``),
a KServe InferenceGraph Splitter over the project's InferenceService and a challenger one
(``ab_cluster``). What is running is recorded in the state folder (``ab.json``).

``status`` scores each arm: the router's requests, server errors and latency quantiles, and the
contract's metric from feedback (``handoff.feedback``: the payload log's predictions joined with
the labels product code reported), with the verdict of ``ab_verdict``.

``stop --promote`` moves the registry's ``champion`` alias to the challenger under the promotion
lock (only on a "challenger better" verdict, unless forced) and serves it alone, as a deploy
does; if that deploy fails the promotion is undone and the test keeps running. ``stop --rollback``
serves the champion alone. Either way the outcome is recorded on the challenger's version: tags
(``handoff.ab.*``), and its model card and readiness report with an "A/B test" section, logged
to its run under ``ab/``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests

from handoff import ab_verdict
from handoff.ab_state import AB_FILE, AbTest, load_ab, running_ab
from handoff.artifacts import EXAMPLE_FILE, EXTRA_DIR
from handoff.contract import CONTRACT_FILE, load_contract
from handoff.errors import HandoffError
from handoff.feedback import joined, read_labels
from handoff.files import read_json, write_json
from handoff.payload_log import payload_store, read_window
from handoff.project import Project
from handoff.serving import local_server
from handoff.serving.ab_router import STATUS_PATH
from handoff.serving.local_server import ServerHandle
from handoff.settings import SETTINGS_FILE

AB_DIR = "ab"
OUTCOME_TAG = "handoff.ab.outcome"
DECISION_TAG = "handoff.ab.decision"
RESULT_TAG = "handoff.ab.result"
MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value


# --- start ----------------------------------------------------------------------------------------


def start(
    project_dir: Path | str,
    challenger: str,
    *,
    share: int = 50,
    key_header: str | None = None,
    cluster: bool = False,
) -> AbTest:
    """Serve the champion and ``challenger`` side by side, ``share`` percent to the challenger."""
    from handoff.registry import fetch_model
    from handoff.tracking import CHAMPION, alias_version, use_tracking

    project = Project.load(project_dir)
    name = project.contract.name
    if not 1 <= share <= 99:
        raise HandoffError(f"--share is the challenger's percent of the traffic, 1 to 99; got {share}")
    monitoring = project.settings.monitoring
    if monitoring.sample_rate <= 0:
        raise HandoffError(
            "an A/B test scores each arm on its logged predictions, and the payload log is off "
            "(monitoring.sample_rate is 0): set it above 0 (1.0 logs every request)",
            file=project.root / SETTINGS_FILE,
            field="monitoring.sample_rate",
        )
    if cluster and not (monitoring.store and "://" in monitoring.store):
        raise HandoffError(
            "on a cluster each arm is scored from the payload collector's store, and none is set: "
            f"expected an object-store URI (s3://bucket/payloads/{name}), found {monitoring.store!r}",
            file=project.root / SETTINGS_FILE,
            field="monitoring.store",
        )
    client = use_tracking(project)
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise HandoffError(f"{name} has no champion to test against; register and deploy one first")
    if challenger == champion:
        raise HandoffError(
            f"v{challenger} is the champion; name another registered version with --challenger"
        )
    started = time.time()  # on a cluster, feedback and payloads from here on belong to the test
    with local_server.deploy_lock(project.state_dir):
        if running_ab(project) is not None:
            raise HandoffError(
                "an A/B test is already running for this project: `handoff ab status`, then "
                "`handoff ab stop --promote` or `--rollback`"
            )
        fetch_model(project, name, challenger)  # an unknown version, or a tampered file, stops here
        if cluster:
            from handoff.ab_cluster import start_ab_on_cluster

            placed = start_ab_on_cluster(project.root, name, champion, challenger, share)
            ab = AbTest(
                name,
                champion,
                challenger,
                share,
                key_header,
                started,
                "cluster",
                placed.url,
                cluster=asdict(placed),
            )
        else:
            ab = _start_locally(project, name, champion, challenger, share, key_header)
        write_json(project.state_dir / AB_FILE, asdict(ab))
    return ab


def _start_locally(
    project: Project, name: str, champion: str, challenger: str, share: int, key_header: str | None
) -> AbTest:
    from handoff.deployment import enforced_contract, write_spec
    from handoff.registry import fetch_model
    from handoff.serving.smoke import latency_check, smoke_test

    previous = local_server.current(project.state_dir, project.root)
    if previous is None or previous.version != champion:
        now = f"v{previous.version}" if previous else "nothing"
        raise HandoffError(
            f"the A/B test starts from the champion serving on this machine, and {now} is serving: "
            f"run `handoff deploy` (champion v{champion}) first"
        )
    folder = project.state_dir / AB_DIR
    folder.mkdir(exist_ok=True)
    serving = project.settings.serving
    arms: dict[str, ServerHandle] = {}
    try:
        for arm, version in (("champion", champion), ("challenger", challenger)):
            model_dir = fetch_model(project, name, version)
            contract = enforced_contract(project, load_contract(model_dir / EXTRA_DIR), name, version)
            example = read_json(model_dir / EXTRA_DIR / EXAMPLE_FILE)
            sock = local_server.bind(serving.host, 0)
            spec = write_spec(
                project, model_dir, name, version, sock.getsockname()[1], None, folder / f"{arm}.json"
            )
            arms[arm] = local_server.start(
                spec,
                sock,
                model_name=name,
                version=version,
                state_dir=project.state_dir,
                ready_timeout_s=serving.ready_timeout_s,
                project=project.root,
            )
            checks = [smoke_test] + ([latency_check] if arm == "challenger" else [])
            for check in checks:
                result = check(arms[arm].url, name, contract, example)
                if not result.passed:
                    raise HandoffError(f"the {arm} arm ({name} v{version}) failed a check: {result.detail}")
        router, started = _start_router(
            project, name, champion, challenger, share, key_header, arms, previous
        )
    except BaseException:
        for handle in arms.values():
            local_server.terminate(handle)
        raise
    local_server.record(project.state_dir, router)
    local_server.retire(previous)  # stops accepting (the router accepts from its socket), exits
    return AbTest(
        name,
        champion,
        challenger,
        share,
        key_header,
        started,
        "local",
        router.url,
        router=asdict(router),
        arms={arm: asdict(handle) for arm, handle in arms.items()},
    )


def _start_router(
    project: Project,
    name: str,
    champion: str,
    challenger: str,
    share: int,
    key_header: str | None,
    arms: dict[str, ServerHandle],
    previous: ServerHandle,
) -> tuple[ServerHandle, float]:
    """The router on a private port, checked there, then on the project's port (blue/green)."""
    from handoff.serving.spec import server_settings

    serving = project.settings.serving
    spec_file = project.state_dir / AB_DIR / "router.json"
    local_server.serving_marker(spec_file).unlink(missing_ok=True)
    port = local_server.listener_of(previous)
    private = local_server.bind(serving.host, 0)
    handover = local_server.handover_path()
    write_json(
        spec_file,
        {
            "router": {
                "model_name": name,
                "share": share,
                "key_header": key_header,
                "arms": {arm: {"version": h.version, "url": h.url} for arm, h in arms.items()},
            },
            "host": serving.host,
            "port": port.getsockname()[1],
            **server_settings(serving, f"{champion}+{challenger}"),
            "handover": str(handover),
        },
    )
    check_url = local_server.url_of(private)
    handle = local_server.start(
        spec_file,
        private,
        model_name=name,
        version=f"A/B v{champion} vs v{challenger}",
        state_dir=project.state_dir,
        ready_timeout_s=serving.ready_timeout_s,
        takeover=port,
        handover=handover,
        project=project.root,
    )
    try:
        requests.get(f"{check_url}{STATUS_PATH}", timeout=5).raise_for_status()
        # From here the split starts: what the arms log belongs to the test, what the old server
        # answered before does not.
        started = time.time()
        local_server.take_over(handle)
    except BaseException:
        local_server.terminate(handle)
        raise
    return handle, started


# --- status ---------------------------------------------------------------------------------------


def _require(project: Project) -> AbTest:
    ab = load_ab(project)
    if ab is None:
        raise HandoffError(
            "no A/B test is running for this project; start one with `handoff ab start --challenger N`"
        )
    return ab


def _router_stats(ab: AbTest) -> dict[str, dict[str, Any]]:
    if ab.target != "local" or ab.router is None:
        return {}  # a cluster's Splitter keeps no per-arm counts: requests come from the payload log
    try:
        answer = requests.get(f"{ab.url}{STATUS_PATH}", timeout=10)
        answer.raise_for_status()
    except requests.RequestException as exc:
        raise HandoffError(
            f"the A/B router at {ab.url} did not answer ({exc.__class__.__name__}); see "
            f"{ab.router.get('log')}; `handoff ab stop --rollback` serves the champion alone again"
        ) from None
    arms: dict[str, dict[str, Any]] = answer.json()["arms"]
    return arms


def status(project_dir: Path | str) -> dict[str, Any]:
    """The test as it stands: the verdict with each arm's counts, latencies and metrics."""
    project = Project.load(project_dir)
    ab = _require(project)
    contract = project.contract
    seen = _router_stats(ab)
    store = payload_store(project)
    since = datetime.fromtimestamp(ab.started, UTC)
    labels = read_labels(store, since=since)
    output = contract.task.output or contract.output_names[0]
    arms = {}
    for arm, version in (("champion", ab.champion), ("challenger", ab.challenger)):
        window = read_window(store, since=since, model_version=version)
        if window.rows and output not in window.outputs:
            raise HandoffError(
                f"the payload log holds what v{version} answered ({', '.join(window.outputs)}), not "
                f"{output}, the output the contract's metrics score (a postprocess turns it into "
                "raw.outputs): an A/B verdict needs the scored output in the responses",
                file=project.root / CONTRACT_FILE,
                field="raw.outputs",
            )
        found = joined(window, labels, output)
        counts = seen.get(arm, {})
        label_array = found.labels
        if contract.task.type == "classification" and len(label_array):
            label_array = label_array.reshape(-1).astype(np.int64)
        arms[arm] = ab_verdict.Arm(
            name=arm,
            version=version,
            requests=int(counts.get("requests", len(set(window.request_ids)))),
            errors=int(counts.get("errors", 0)),
            p50_ms=counts.get("p50_ms"),
            p99_ms=counts.get("p99_ms"),
            predictions=found.predictions,
            labels=label_array,
        )
    verdict = ab_verdict.decide(contract, arms["champion"], arms["challenger"])
    return {
        "model_name": ab.model_name,
        "target": ab.target,
        "url": ab.url,
        "share": ab.share,
        "key_header": ab.key_header,
        "started": datetime.fromtimestamp(ab.started, UTC).isoformat(timespec="seconds"),
        **verdict.as_dict(),
    }


def format_status(found: dict[str, Any]) -> str:
    """``handoff ab status`` for a person: one line per arm, then the verdict and why."""
    lines = [
        f"A/B test of {found['model_name']} ({found['target']}, {found['url']}), since {found['started']}: "
        f"{found['share']}% to the challenger"
        + (f", sticky by header {found['key_header']}" if found["key_header"] else ", sticky by request id"),
    ]
    metric = found["metric"]
    for arm in ("champion", "challenger"):
        r = found["arms"][arm]
        value = r["metrics"].get(metric)
        shown = "n/a" if value is None else f"{value:.4f}"
        interval = r.get("interval")
        ci = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        p50 = "n/a" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}"
        p99 = "n/a" if r["p99_ms"] is None else f"{r['p99_ms']:.2f}"
        lines.append(
            f"  {arm:<10} v{r['version']}: {r['requests']} requests, {r['errors']} errors, p50 {p50} ms, "
            f"p99 {p99} ms, {r['labelled_rows']} labelled rows, {metric} {shown}{ci}"
        )
    lines.append(f"verdict: {found['outcome']}")
    lines += [f"  {reason}" for reason in found["reasons"]]
    lines.append(f"  method: {found['method']}")
    return "\n".join(lines)


# --- stop -----------------------------------------------------------------------------------------


def stop(project_dir: Path | str, *, promote: bool, force: bool = False) -> str:
    """End the test: promote the challenger (``promote``) or keep the champion; says what was done.

    The verdict is taken first, best-effort: only a promotion needs one (unless forced), so a
    test whose router stopped answering can still be rolled back.
    """
    from handoff.registry import move_champion
    from handoff.tracking import use_tracking

    project = Project.load(project_dir)
    ab = _require(project)
    found: dict[str, Any] | None = None
    try:
        found = status(project.root)
        outcome = str(found["outcome"])
    except (HandoffError, OSError, ValueError) as exc:
        outcome = f"not measured: {exc}"
    client = use_tracking(project)
    name = ab.model_name
    winner = ab.champion
    if promote:
        if outcome != "challenger better" and not force:
            raise HandoffError(
                f"not promoting v{ab.challenger}: the verdict is {outcome!r}, not 'challenger better' "
                "(`handoff ab status` says why); `--force` promotes anyway, `--rollback` keeps the champion"
            )
        move = move_champion(
            client,
            name,
            ab.challenger,
            expected=ab.champion,
            holder=f"handoff ab stop --promote v{ab.challenger}",
            record_previous=True,
        )
        if not move.moved:
            raise HandoffError(
                f"champion is v{move.before}, not v{ab.champion} as when the test started (another "
                "promotion moved it); nothing was changed: `handoff ab stop --rollback` ends the test"
            )
        winner = ab.challenger
    try:
        _serve_alone(project, ab, winner, promoted=promote)
    except _Served as served:  # the winner serves alone; only the test's leftovers remain
        print(f"handoff: warning: {served}", file=sys.stderr)
    except HandoffError as exc:
        if not promote:
            raise
        # Back to the champion the test started from (compare-and-set, under the promotion lock),
        # whatever the deploy's own undo did: a version that served before is not undone there.
        back = move_champion(
            client,
            name,
            ab.champion,
            expected=ab.challenger,
            holder=f"handoff ab stop: v{ab.challenger} did not serve",
        )
        kept = f"champion is v{ab.champion} again" if back.moved else f"champion is v{back.before}"
        raise HandoffError(f"{exc}; {kept}; the A/B test keeps running") from None
    (project.state_dir / AB_FILE).unlink(missing_ok=True)  # ended: whatever the record below meets
    decision = "promoted" if promote else "rolled back"
    try:
        _record(project, client, ab, found, outcome, decision)
    except Exception as exc:  # noqa: BLE001 - the test ended and the registry agrees; say what is missing
        print(
            f"handoff: warning: the A/B outcome was not recorded on v{ab.challenger}: {exc}", file=sys.stderr
        )
    return (
        f"A/B test ended ({outcome}): v{ab.challenger} {decision}; champion is v{winner}, "
        f"serving alone at {ab.url if ab.target == 'local' else 'the project InferenceService'}"
    )


class _Served(Exception):
    """The winner serves alone, but part of the test could not be removed (said how to)."""


def _serve_alone(project: Project, ab: AbTest, winner: str, *, promoted: bool) -> None:
    """Serve ``winner`` alone, then stop the test's servers."""
    if ab.target == "cluster":
        from handoff.ab_cluster import CleanupFailed, ClusterAb, stop_ab_on_cluster

        assert ab.cluster is not None
        try:
            done = stop_ab_on_cluster(project.root, ab.model_name, ClusterAb(**ab.cluster), promote=promoted)
        except CleanupFailed as exc:
            raise _Served(str(exc)) from None
        print(f"handoff: {done}", file=sys.stderr)
        return
    from handoff.deployment import deploy_locally

    # champion_only: the deploy completes the promotion (and refuses a version no longer champion).
    deploy_locally(project.root, ab.model_name, winner, champion_only=promoted, ending_ab=True)
    for handle in ab.handles()[1:]:  # the arms; the router was retired by the deploy
        local_server.terminate(handle)


def stop_servers(project: Project) -> AbTest | None:
    """``handoff stop``: the A/B test's arm servers too, and its record (the router is the
    project's recorded server and is stopped as such); the test that was running, if any."""
    ab = load_ab(project)
    if ab is None or ab.target != "local":
        return None
    for handle in ab.handles()[1:]:
        local_server.terminate(handle)
    (project.state_dir / AB_FILE).unlink(missing_ok=True)
    return ab


# --- the record -----------------------------------------------------------------------------------


def outcome_section(ab: AbTest, found: dict[str, Any] | None, outcome: str, decision: str) -> str:
    """The "A/B test" section appended to the challenger's model card and readiness report."""
    lines = [
        "## A/B test",
        "",
        f"v{ab.challenger} against champion v{ab.champion}, {ab.share}% of live traffic to the challenger "
        f"({ab.target}), from {datetime.fromtimestamp(ab.started, UTC).isoformat(timespec='seconds')} "
        f"to {datetime.now(UTC).isoformat(timespec='seconds')}.",
        "",
        f"**Verdict: {outcome}. Decision: {decision}.**",
        "",
    ]
    if found:
        metric = found["metric"]
        lines += ["| arm | version | requests | errors | p50 ms | p99 ms | labelled rows | " + metric + " |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for arm in ("champion", "challenger"):
            r = found["arms"][arm]
            value = r["metrics"].get(metric)
            lines.append(
                f"| {arm} | {r['version']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | "
                f"{r['p99_ms']} | "
                f"{r['labelled_rows']} | {'n/a' if value is None else f'{value:.4f}'} |"
            )
        lines += ["", *[f"- {reason}" for reason in found["reasons"]], f"- method: {found['method']}", ""]
    return "\n".join(lines)


def _record(
    project: Project, client: Any, ab: AbTest, found: dict[str, Any] | None, outcome: str, decision: str
) -> None:
    """Tags on the challenger's version, and its card and report with the A/B section, in its run."""
    from handoff.model_card import CARD_FILE
    from handoff.readiness import REPORT_MD

    name, version = ab.model_name, ab.challenger
    summary = json.dumps(
        {k: found[k] for k in ("outcome", "metric", "difference", "interval", "p_value", "required_rows")}
        if found
        else {"outcome": outcome},
        default=str,
    )
    client.set_model_version_tag(name, version, OUTCOME_TAG, outcome)
    client.set_model_version_tag(name, version, DECISION_TAG, f"{decision} vs v{ab.champion}")
    client.set_model_version_tag(name, version, RESULT_TAG, summary[:MAX_TAG_CHARS])
    section = outcome_section(ab, found, outcome, decision)
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return
    from handoff.registry import fetch_model

    extra = fetch_model(project, name, version) / EXTRA_DIR
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for file in (CARD_FILE, REPORT_MD):
            base = (extra / file).read_text(encoding="utf-8") if (extra / file).is_file() else ""
            (out / file).write_text(f"{base.rstrip()}\n\n{section}\n", encoding="utf-8")
        write_json(
            out / "ab_result.json",
            {"ab": asdict(ab), "outcome": outcome, "decision": decision, **(found or {})},
        )
        try:
            client.log_artifacts(run_id, str(out), AB_DIR)
        except Exception as exc:  # noqa: BLE001 - the tags already say it; the test has ended either way
            print(f"handoff: warning: the A/B record was not logged to run {run_id}: {exc}", file=sys.stderr)
