"""Commands: ``status``, ``wait`` and ``replay``, the operator's view of the nodes.

They read and write the node status bucket through :mod:`wire.nodestatus` and nothing else, so
they show exactly what the syncers write. ``wait`` is the step a CD pipeline runs before scaling a
Fleet: it follows the bucket with a KV watch and wakes only on a change, on a node turning stale,
or at its deadline.

``wait`` is run right after a publish, when every node's entry may still speak of the Fleet's
previous version (whose images are all present). So it first reads the Fleet's newest event from
the log itself (:func:`wire.eventlog.read_log`, decoded and normalized as the syncer does) and
counts a node as done only once the node reports having folded that event. ``status
--check-log`` reads the log the same way to mark nodes that are behind it.

Exit codes: 0 done, 1 not done in time (``wait``) or an error the user can fix (one line on
stderr), 2 bad input (``--fleet`` syntax, conflicting flags).
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
import asyncio
import getpass
import json
import socket
from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import typer
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from rich.console import Console
from rich.table import Table
from rich.text import Text

from image_syncer.oneshot import CommandError, fail, run_nats_command
from image_syncer.options import Duration, with_nats_options
from ops.durations import format_duration
from syncer.references import InvalidImageReference, normalize
from wire.contract import (
    Action,
    ContractError,
    Event,
    Kind,
    decode_event,
    images_of,
    subject_filter,
    subject_for,
)
from wire.eventlog import StoredMessage, read_log, stream_name
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    FleetProgress,
    FleetTarget,
    NodeReadiness,
    NodeStatus,
    Readiness,
    StatusError,
    StatusSettings,
    StatusWatch,
    check_node,
    fleet_progress,
    is_stale,
    list_statuses,
    node_readiness,
    open_status_bucket,
    parse_fleet,
    request_replay,
)

__all__ = ["fleet_filter", "fold_fleet_log", "register", "target_of"]

T = TypeVar("T")

PrefixOption = Annotated[
    str,
    typer.Option(
        "--subject-prefix",
        envvar="SUBJECT_PREFIX",
        help="Installation prefix; each prefix has its own status bucket.",
    ),
]
StaleAfterOption = Annotated[
    float,
    Duration("A node without heartbeat for this long is stale.", "STALE_AFTER", "--stale-after"),
]


async def _bucket(js: JetStreamContext, settings: StatusSettings) -> KeyValue:
    kv = await open_status_bucket(js, settings)
    if kv is None:
        raise CommandError(
            f"no node has reported status: bucket {settings.bucket} does not exist "
            f"(is a syncer running with --subject-prefix {settings.prefix}?)"
        )
    return kv


def _settings(prefix: str) -> StatusSettings:
    try:
        settings = StatusSettings(prefix=prefix)
        _ = settings.bucket
    except ContractError as e:
        fail(str(e), code=2)
    return settings


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    return f"{format_duration(round(max((now - then).total_seconds(), 0.0)))} ago"


# --- the Fleets as the event log has them now ------------------------------------------------


def fleet_filter(prefix: str, fleet: str) -> str:
    """Every event of one Fleet, any action: ``<prefix>.fleet.events.*.<namespace>.<name>``."""
    namespace, _, name = parse_fleet(fleet).partition("/")
    # subject_for encodes namespace and name as the log does ('.' in names); their two tokens
    # then replace the last two wildcards of the kind's filter.
    encoded = subject_for(prefix, f"{Kind.FLEET}.events.{Action.ADDED}", namespace, name)
    tokens = encoded.rsplit(".", 2)[1:]
    return ".".join([subject_filter(prefix, Kind.FLEET).rsplit(".", 2)[0], *tokens])


async def fold_fleet_log(messages: AsyncIterable[StoredMessage]) -> dict[str, tuple[int, Event]]:
    """Fleet -> (sequence, event) of its newest event, folded in sequence order as a syncer does.

    Messages that do not decode are skipped: syncers terminate them unfolded, so they move no
    node's sequence and waiting for them would never end.
    """
    newest: dict[str, tuple[int, Event]] = {}
    async for stored in messages:
        try:
            event = decode_event(stored.data)
        except ContractError:
            continue
        if event.kind is Kind.FLEET and stored.seq > newest.get(event.key, (0, None))[0]:
            newest[event.key] = (stored.seq, event)
    return newest


def target_of(fleet: str, seq: int, event: Event) -> FleetTarget | str:
    """What nodes must reach for ``fleet``, or why nothing can be waited for (one line)."""
    if event.action is Action.DELETED:
        return f"fleet {fleet} was deleted (event seq {seq}): there is nothing to wait for"
    images = []
    for _, image in images_of(event.obj):
        try:
            images.append(str(normalize(image)))
        except InvalidImageReference:
            continue  # the syncer skips it too (and logs why)
    if not images:
        return f"fleet {fleet} names no image a syncer can pull (event seq {seq})"
    return FleetTarget(seq=seq, images=tuple(dict.fromkeys(images)))


async def _read_fleets(
    js: JetStreamContext, prefix: str, subject: str | None = None
) -> dict[str, tuple[int, Event]] | None:
    """The fold of the Fleet log (or of one Fleet's subjects); None when the stream is missing."""
    try:
        return await fold_fleet_log(read_log(js, stream_name(prefix, Kind.FLEET), subject=subject))
    except nats.js.errors.NotFoundError:
        return None


async def _wait_target(js: JetStreamContext, prefix: str, fleet: str) -> FleetTarget:
    newest = await _read_fleets(js, prefix, fleet_filter(prefix, fleet))
    if not newest or fleet not in newest:
        stream = stream_name(prefix, Kind.FLEET)
        raise CommandError(f"fleet {fleet} is not in the event log (stream {stream})")
    target = target_of(fleet, *newest[fleet])
    if isinstance(target, str):
        raise CommandError(target)
    return target


async def _log_targets(js: JetStreamContext, prefix: str) -> dict[str, FleetTarget]:
    """Every live Fleet of the log that names images: what ``status --check-log`` compares to."""
    newest = await _read_fleets(js, prefix) or {}
    targets = {fleet: target_of(fleet, seq, event) for fleet, (seq, event) in newest.items()}
    return {fleet: t for fleet, t in targets.items() if isinstance(t, FleetTarget)}


# --- status ---------------------------------------------------------------------------------


def _fleets_of(view: dict[str, NodeStatus]) -> list[str]:
    return sorted({fleet for status in view.values() for fleet in status.state.desired})


def _is_behind(status: NodeStatus, fleet: str, targets: dict[str, FleetTarget] | None) -> bool:
    """The node reports folding an older event of ``fleet`` than the log's newest (or none)."""
    target = (targets or {}).get(fleet)
    if target is None:
        return False
    readiness = node_readiness(status, fleet, target)
    return readiness.verdict is Readiness.BEHIND and not readiness.legacy


def _cell(progress: FleetProgress | None, behind: bool = False) -> Text:
    if progress is None:
        return Text("- (behind)", style="yellow") if behind else Text("-", style="dim")
    text = f"{len(progress.present)}/{len(progress.images)}"
    notes = []
    if progress.pulling:
        notes.append(f"{len(progress.pulling)} pulling")
    if progress.failed:
        notes.append(f"{len(progress.failed)} failed")
    if behind:
        notes.append("behind")
    if notes:
        text += f" ({', '.join(notes)})"
    style = "red" if progress.failed else "green" if progress.complete and not behind else "yellow"
    return Text(text, style=style)


def _table(
    view: dict[str, NodeStatus],
    now: datetime,
    stale_after: float,
    targets: dict[str, FleetTarget] | None = None,
) -> Table:
    fleets = sorted({*_fleets_of(view), *(targets or {})})
    table = Table(title="image-syncer nodes", title_justify="left")
    table.add_column("Node", no_wrap=True)
    for fleet in fleets:
        table.add_column(fleet, justify="center")
    for column in ("Heartbeat", "Last reconcile", "Version"):
        table.add_column(column)
    for node in sorted(view):
        status = view[node]
        stale = is_stale(status, now, stale_after)
        name = Text(f"{node} (stale)", style="bold red") if stale else Text(node)
        heartbeat = Text(_ago(now, status.reported_at), style="red" if stale else "")
        cells = [
            _cell(fleet_progress(status, fleet), _is_behind(status, fleet, targets))
            for fleet in fleets
        ]
        last = _ago(now, status.state.last_reconcile)
        table.add_row(name, *cells, heartbeat, last, status.version)
    return table


def _failures(view: dict[str, NodeStatus]) -> list[str]:
    lines = []
    for node in sorted(view):
        failed = view[node].state.failed
        lines.extend(f"  {node}: {image}: {failed[image]}" for image in sorted(failed))
    return lines


def _json_log(
    view: dict[str, NodeStatus], targets: dict[str, FleetTarget]
) -> dict[str, dict[str, Any]]:
    return {
        fleet: {
            "seq": target.seq,
            "images": list(target.images),
            "behind": [n for n, s in sorted(view.items()) if _is_behind(s, fleet, targets)],
        }
        for fleet, target in sorted(targets.items())
    }


def _json_view(
    settings: StatusSettings,
    view: dict[str, NodeStatus],
    invalid: dict[str, str],
    now: datetime,
    stale_after: float,
    targets: dict[str, FleetTarget] | None = None,
) -> dict[str, Any]:
    fleets: dict[str, dict[str, Any]] = {}
    for fleet in _fleets_of(view):
        per_node = fleets.setdefault(fleet, {})
        for node, status in sorted(view.items()):
            progress = fleet_progress(status, fleet)
            if progress is not None:
                per_node[node] = {
                    **msgspec.to_builtins(progress),
                    "missing": list(progress.missing),
                    "complete": progress.complete,
                }
    nodes = {
        node: {
            "stale": is_stale(status, now, stale_after),
            "heartbeat_age_seconds": round((now - status.reported_at).total_seconds(), 3),
            "status": msgspec.to_builtins(status, order="deterministic"),
        }
        for node, status in sorted(view.items())
    }
    doc = {
        "bucket": settings.bucket,
        "generated_at": now.isoformat(),
        "stale_after_seconds": stale_after,
        "nodes": nodes,
        "fleets": fleets,
        "invalid": invalid,
    }
    if targets is not None:
        doc["log"] = _json_log(view, targets)
    return doc


async def _status(
    nats_settings: NatsSettings,
    settings: StatusSettings,
    stale_after: float,
    as_json: bool,
    check_log: bool,
) -> None:
    nc = await connect(nats_settings, name="image-syncer-status")
    try:
        js = nc.jetstream()
        view, invalid = await list_statuses(await _bucket(js, settings))
        targets = await _log_targets(js, settings.prefix) if check_log else None
    finally:
        await nc.close()
    now = datetime.now(UTC)
    if as_json:
        doc = _json_view(settings, view, invalid, now, stale_after, targets)
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    console = Console()
    if not view:
        console.print(f"no node reports status in bucket {settings.bucket}")
    else:
        console.print(_table(view, now, stale_after, targets))
    failures = _failures(view)
    if failures:
        console.print("failed pulls:", style="red")
        for line in failures:
            console.print(line, markup=False, highlight=False)
    for node, reason in sorted(invalid.items()):
        console.print(f"unreadable entry for node {node}: {reason}", markup=False)


@with_nats_options
def status(
    nats: NatsSettings,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw view as JSON.")] = False,
    stale_after: StaleAfterOption = "1m",  # type: ignore[assignment]
    check_log: Annotated[
        bool,
        typer.Option(
            "--check-log",
            envvar="STATUS_CHECK_LOG",
            help="Also read the Fleet event log and mark nodes that have not folded a Fleet's "
            "newest event (behind).",
        ),
    ] = False,
    subject_prefix: PrefixOption = "agones",
) -> None:
    """Show every node's progress on every Fleet, with stale nodes marked."""
    run_nats_command(_status(nats, _settings(subject_prefix), stale_after, as_json, check_log))


# --- wait -----------------------------------------------------------------------------------


@dataclass
class _Verdict:
    live: list[str]
    stale: list[str]
    not_targeted: list[str]
    # Live nodes whose syncer reports no Fleet sequences: judged by images alone.
    legacy: list[str]
    missing: dict[str, NodeReadiness]
    # Seconds until the next live node turns stale: the view changes then even without news.
    next_change: float | None


def _judge(
    view: dict[str, NodeStatus],
    fleet: str,
    target: FleetTarget,
    now: datetime,
    stale_after: float,
) -> _Verdict:
    verdict = _Verdict([], [], [], [], {}, None)
    for node, status in sorted(view.items()):
        if is_stale(status, now, stale_after):
            verdict.stale.append(node)
            continue
        verdict.live.append(node)
        turns_stale = stale_after - (now - status.reported_at).total_seconds()
        if verdict.next_change is None or turns_stale < verdict.next_change:
            verdict.next_change = turns_stale
        readiness = node_readiness(status, fleet, target)
        if readiness.legacy:
            verdict.legacy.append(node)
        if readiness.verdict is Readiness.NOT_TARGETED:
            verdict.not_targeted.append(node)
        elif readiness.verdict is not Readiness.DONE:
            verdict.missing[node] = readiness
    return verdict


def _missing_line(node: str, readiness: NodeReadiness, target: FleetTarget) -> str:
    if readiness.verdict is Readiness.BEHIND:
        if readiness.legacy:
            return f"  {node}: has not seen the Fleet yet (older syncer)"
        if readiness.seq is None:
            return f"  {node}: behind: has not folded the Fleet yet (log at seq {target.seq})"
        return f"  {node}: behind: seq {readiness.seq} < {target.seq}"
    progress = readiness.progress
    assert progress is not None, "MISSING always carries its progress"
    parts = []
    for image in progress.missing:
        if image in progress.failed:
            parts.append(f"{image} (failed: {progress.failed[image]})")
        elif image in progress.pulling:
            parts.append(f"{image} (pulling)")
        else:
            parts.append(image)
    legacy = " (older syncer: judged by images alone)" if readiness.legacy else ""
    present = f"{len(progress.present)}/{len(progress.images)} present"
    return f"  {node}: {present}; missing {', '.join(parts)}{legacy}"


def _timeout_report(
    fleet: str, target: FleetTarget, timeout: float, verdict: _Verdict, bucket: str
) -> str:
    waited = format_duration(timeout)
    if not verdict.live:
        stale = (
            f" ({len(verdict.stale)} stale: {', '.join(verdict.stale)})" if verdict.stale else ""
        )
        return f"no live node reports status in bucket {bucket} after {waited}{stale}"
    lines = [
        f"{fleet} (event seq {target.seq}) not ready after {waited}: {len(verdict.missing)} of "
        f"{len(verdict.live)} live nodes not done"
    ]
    lines.extend(_missing_line(n, r, target) for n, r in verdict.missing.items())
    if verdict.legacy:
        lines.append(f"  older syncers, judged by images alone: {', '.join(verdict.legacy)}")
    if verdict.stale:
        lines.append(f"  ignored stale nodes: {', '.join(verdict.stale)}")
    return "\n".join(lines)


async def _wait(
    nats_settings: NatsSettings,
    settings: StatusSettings,
    fleet: str,
    timeout: float,
    stale_after: float,
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    nc = await connect(nats_settings, name="image-syncer-wait")
    try:
        js = nc.jetstream()
        # Read once: a CD pipeline waits for the version it just published (or a newer one).
        target = await _wait_target(js, settings.prefix, fleet)
        kv = await _bucket(js, settings)
        async with StatusWatch(kv) as watch:
            while True:
                verdict = _judge(watch.view, fleet, target, datetime.now(UTC), stale_after)
                if verdict.live and not verdict.missing:
                    _ready(fleet, target, verdict)
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    report = _timeout_report(fleet, target, timeout, verdict, settings.bucket)
                    typer.echo(report, err=True)
                    return False
                if verdict.next_change is not None:
                    remaining = min(remaining, verdict.next_change)
                await watch.next(timeout=remaining)
    finally:
        await nc.close()


def _ready(fleet: str, target: FleetTarget, verdict: _Verdict) -> None:
    targeted = len(verdict.live) - len(verdict.not_targeted)
    notes = []
    if verdict.not_targeted:
        notes.append(f"{len(verdict.not_targeted)} not targeted")
    if verdict.legacy:
        notes.append(f"{len(verdict.legacy)} older syncers judged by images alone")
    if verdict.stale:
        notes.append(f"{len(verdict.stale)} stale ignored")
    suffix = f" ({', '.join(notes)})" if notes else ""
    typer.echo(
        f"{fleet}: all images present on {targeted} live nodes as of event seq {target.seq}{suffix}"
    )


@with_nats_options
def wait(
    nats: NatsSettings,
    fleet: Annotated[
        str, typer.Option("--fleet", envvar="FLEET", help="The Fleet, as NAMESPACE/NAME.")
    ],
    timeout: Annotated[
        float, Duration("Give up after this long.", "WAIT_TIMEOUT", "--timeout")
    ] = "5m",  # type: ignore[assignment]
    stale_after: StaleAfterOption = "1m",  # type: ignore[assignment]
    subject_prefix: PrefixOption = "agones",
) -> None:
    """Exit 0 once every live node folded the Fleet's newest event and holds all of its images.

    Exits 1 at once if the Fleet is not in the event log or was deleted, and on timeout with
    the nodes that are not done and why.
    """
    try:
        fleet = parse_fleet(fleet)
    except StatusError as e:
        fail(f"--fleet: {e}", code=2)
    settings = _settings(subject_prefix)
    if not run_nats_command(_wait(nats, settings, fleet, timeout, stale_after)):
        raise typer.Exit(1)


# --- replay ---------------------------------------------------------------------------------


async def _replay(
    nats_settings: NatsSettings, settings: StatusSettings, nodes: list[str], every: bool
) -> None:
    nc = await connect(nats_settings, name="image-syncer-replay")
    try:
        js = nc.jetstream()
        if every:
            view, invalid = await list_statuses(await _bucket(js, settings))
            nodes = sorted({*view, *invalid})
            if not nodes:
                raise CommandError("no node reports status; name the nodes with --node")
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        for node in nodes:
            request = await request_replay(js, settings, node, requested_by=by)
            typer.echo(
                f"replay requested node={node} request={request.id}: a running syncer replays "
                "the whole log now, a stopped one on its next start"
            )
    finally:
        await nc.close()


@with_nats_options
def replay(
    nats: NatsSettings,
    node: Annotated[
        list[str] | None, typer.Option("--node", help="The node to replay; repeat for several.")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every node that reports status.")] = False,
    subject_prefix: PrefixOption = "agones",
) -> None:
    """Make a node's syncer re-read the whole event log and rebuild its desired state."""
    nodes = list(dict.fromkeys(node or []))
    if bool(nodes) == every:
        fail("name nodes with --node, or use --all (not both)", code=2)
    for name in nodes:
        try:
            check_node(name)
        except StatusError as e:
            fail(f"--node: {e}", code=2)
    run_nats_command(_replay(nats, _settings(subject_prefix), nodes, every))


def register(app: typer.Typer) -> None:
    """Add ``status``, ``wait`` and ``replay`` to the root app."""
    app.command("status")(status)
    app.command("wait")(wait)
    app.command("replay")(replay)
