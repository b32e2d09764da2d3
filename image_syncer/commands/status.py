"""Command: ``status``, the nodes' progress on the Fleets, from the node status bucket.

It reads what the syncers write through :mod:`wire.nodestatus` and nothing else, so it shows
exactly what the nodes report; ``--check-log`` also reads the log (:mod:`image_syncer.fleetlog`)
to mark nodes that are behind the Fleet's newest event (``--fleet`` always reads that one Fleet's
newest event, and shows its next images, ``image-syncer.octops.io/next-images``, apart). By
default it answers what a person asks first (:mod:`image_syncer.nodeview`): per Fleet, nodes
ready and who misses what and why; per node, Fleets ready, heartbeat and problems. ``--fleet``
and ``--node`` drill down, ``--matrix`` draws nodes x Fleets.

Exit codes: 0 shown, 1 an error the user can fix (one line on stderr), 2 bad input.
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import typer
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table
from rich.text import Text

from image_syncer.fleetlog import fleet_filter, log_targets, read_fleets, target_of
from image_syncer.nodeview import (
    FleetRollup,
    NodeRollup,
    describe_missing,
    describe_progress,
    fleet_rollups,
    next_rollup,
    node_rollups,
)
from image_syncer.oneshot import CommandError, fail, run_nats_command
from image_syncer.options import (
    DEFAULT_PREFIX,
    PrefixOption,
    StaleAfterOption,
    with_nats_options,
)
from image_syncer.statusbucket import open_bucket, status_settings
from ops.durations import format_duration
from wire.contract import NEXT_IMAGES_ANNOTATION
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    GateStatus,
    NodeState,
    NodeStatus,
    PinSummary,
    StatusError,
    StatusSettings,
    check_node,
    is_stale,
    list_statuses,
    parse_fleet,
)
from wire.readiness import FleetTarget, fleet_progress

__all__ = ["register"]


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    return f"{format_duration(round(max((now - then).total_seconds(), 0.0)))} ago"


# Above this many rows a section lists only what needs attention, and says how many it left out.
_MAX_ROWS = 30
# Nodes named per Fleet in the overview before "+N more".
_NAMED_PER_FLEET = 3


def _rollup_json(
    fleets: dict[str, FleetRollup], nodes: dict[str, NodeRollup], now: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    fleet_doc = {
        fleet: {
            "ready": len(r.ready),
            "total": r.total,
            "not_ready": r.not_ready,
            **({"log_seq": r.target.seq} if r.target is not None else {}),
        }
        for fleet, r in fleets.items()
    }
    node_doc = {
        node: {
            "stale": r.stale,
            "heartbeat_age_seconds": round((now - r.status.reported_at).total_seconds(), 3),
            "fleets_ready": r.fleets_ready,
            "fleets_total": r.fleets_total,
            "problems": r.problems,
            "status": r.status,
        }
        for node, r in nodes.items()
    }
    return fleet_doc, node_doc


def _json_view(
    settings: StatusSettings,
    view: dict[str, NodeStatus],
    unreadable: dict[str, str],
    now: datetime,
    stale_after: float,
    targets: dict[str, FleetTarget] | None,
) -> dict[str, Any]:
    fleets, nodes = _rollup_json(
        fleet_rollups(view, now, stale_after, targets),
        node_rollups(view, now, stale_after, targets),
        now,
    )
    return {
        "bucket": settings.bucket,
        "generated_at": now.isoformat(),
        "stale_after_seconds": stale_after,
        "nodes": nodes,
        "fleets": fleets,
        "invalid": unreadable,
    }


def _fleet_detail(rollup: FleetRollup, view: dict[str, NodeStatus]) -> Table:
    ready, total = len(rollup.ready), rollup.total
    table = Table(title=f"{rollup.fleet}: {ready}/{total} live nodes ready", title_justify="left")
    for column in ("Node", "Event seq", "State"):
        table.add_column(column, no_wrap=column != "State")
    rows = [(node, Text("ready", style="green")) for node in rollup.ready]
    rows += [(node, Text(why, style="red")) for node, why in rollup.not_ready.items()]
    for node, state in sorted(rows, key=lambda row: row[0]):
        seq = view[node].summary.fleets.get(rollup.fleet)
        table.add_row(node, "-" if seq is None else str(seq), state)
    return table


def _next_detail(rollup: FleetRollup) -> Text:
    """The Fleet's next images alone: what ``wait --next`` and ``rollout`` wait for."""
    assert rollup.target is not None
    lines = [
        f"next images ({NEXT_IMAGES_ANNOTATION}): {', '.join(rollup.target.next_images)}",
        f"  on {len(rollup.ready)}/{rollup.total} targeted live nodes",
    ]
    lines += [f"  {node}: {why}" for node, why in rollup.not_ready.items()]
    return Text("\n".join(lines), style="green" if not rollup.not_ready else "yellow")


def _fleets_table(fleets: dict[str, FleetRollup]) -> Table:
    table = Table(title="Fleets (live nodes)", title_justify="left")
    for column in ("Fleet", "Nodes ready", "Not ready: node: why"):
        table.add_column(column, no_wrap=column != "Not ready: node: why")
    rows = list(fleets.values())
    if len(rows) > _MAX_ROWS:
        rows = [r for r in rows if r.not_ready]
    for r in rows:
        named = list(r.not_ready.items())[:_NAMED_PER_FLEET]
        lines = [f"{node}: {why}" for node, why in named]
        if len(named) < len(r.not_ready):
            lines.append(f"+{len(r.not_ready) - len(named)} more (--fleet {r.fleet})")
        style = "green" if not r.not_ready else "yellow"
        table.add_row(r.fleet, Text(f"{len(r.ready)}/{r.total}", style=style), "\n".join(lines))
    return table


def _nodes_table(nodes: dict[str, NodeRollup], now: datetime) -> tuple[Table, int]:
    """The nodes table, and how many healthy nodes it leaves out."""
    table = Table(title="Nodes", title_justify="left")
    for column in ("Node", "Fleets ready", "Pinned", "Heartbeat", "Problems", "Version"):
        table.add_column(column, no_wrap=column != "Problems")
    rows = list(nodes.values())
    if len(rows) > _MAX_ROWS:
        rows = [r for r in rows if not r.healthy]
    for r in rows[:_MAX_ROWS]:
        name = Text(f"{r.node} (stale)", style="bold red") if r.stale else Text(r.node)
        ready = Text(
            f"{r.fleets_ready}/{r.fleets_total}",
            style="green" if r.fleets_ready == r.fleets_total else "yellow",
        )
        beat = Text(_ago(now, r.status.reported_at), style="red" if r.stale else "")
        pins = _pins_cell(r.status.summary.pins)
        table.add_row(name, ready, pins, beat, ", ".join(r.problems), r.status.version)
    return table, len(nodes) - min(len(rows), _MAX_ROWS)


def _pins_cell(pins: PinSummary | None) -> Text:
    if pins is None:
        return Text("-", style="dim")
    if not pins.enabled:
        return Text("off", style="dim")
    style = "green" if pins.pinned == pins.images else "yellow"
    return Text(f"{pins.pinned}/{pins.images}", style=style)


def _keeping_lines(summary: NodeState) -> list[str]:
    """Pinning and the image filesystem of one node, for ``status --node``."""
    lines = []
    if summary.pins is not None:
        pins = summary.pins
        counted = f"{pins.pinned}/{pins.images} images pinned, " if pins.enabled else ""
        lines.append(f"pinning: {counted}{pins.runtime}")
    if summary.disk is not None:
        disk = summary.disk
        usage = "unknown" if disk.usage is None else f"{disk.usage:.0%} used"
        lines.append(f"image filesystem: {usage} (pulls pause at {disk.max_usage:.0%})")
        if disk.paused:
            lines.append(f"pulls paused: {disk.paused}")
        if disk.gc_backoff:
            lines.append(
                "re-pull backing off, removed repeatedly behind the syncer's back (image GC?): "
                + ", ".join(disk.gc_backoff)
            )
    return lines


def _node_detail(
    console: Console, r: NodeRollup, now: datetime, targets: dict[str, FleetTarget] | None
) -> None:
    status, summary = r.status, r.status.summary
    console.print(
        f"node {r.node}{' (stale)' if r.stale else ''}: image-syncer {status.version}, "
        f"started {_ago(now, status.started_at)}, heartbeat {_ago(now, status.reported_at)}, "
        f"last reconcile {_ago(now, summary.last_reconcile)}",
        markup=False,
        highlight=False,
    )
    table = Table(title=f"Fleets on {r.node}", title_justify="left")
    for column in ("Fleet", "Event seq", "State"):
        table.add_column(column, no_wrap=column != "State")
    for fleet in sorted({*summary.fleets, *summary.excluded, *(targets or {})}):
        progress = fleet_progress(status, fleet)
        target = (targets or {}).get(fleet)
        seq = summary.fleets.get(fleet, summary.excluded.get(fleet))
        behind = target is not None and (seq is None or seq < target.seq)
        if behind and target is not None:
            state = Text(f"behind the log (seq {target.seq})", style="yellow")
        elif progress is None:
            state = Text("not targeted", style="dim")
        elif progress.complete:
            state = Text("ready", style="green")
        else:
            state = Text(describe_progress(progress), style="red")
        table.add_row(fleet, "-" if seq is None else str(seq), state)
    console.print(table)
    if summary.budget is not None:
        budget = summary.budget
        until = (
            f", registry backoff until {budget.backoff_until:%H:%M:%S}"
            if budget.backoff_until
            else ""
        )
        console.print(
            f"pull budget: {len(budget.waiting)} waiting for a slot{until}",
            markup=False,
            highlight=False,
        )
    for line in _keeping_lines(summary):
        console.print(line, markup=False, highlight=False)
    for line in _node_images_lines(summary):
        console.print(line, markup=False, highlight=False)
    if summary.gate is not None:
        console.print(_gate_line(summary.gate, now), markup=False, highlight=False)
    if summary.replayed_request:
        console.print(f"last replay request honoured: {summary.replayed_request}", markup=False)


def _node_images_lines(summary: NodeState) -> list[str]:
    """The images the node keeps besides the Fleets', each with its state."""
    lines = []
    for source, images in sorted(summary.node_images.items()):
        cells = []
        for image in images:
            why = summary.missing.get(image)
            cells.append(f"{image} (present)" if why is None else describe_missing(image, why))
        lines.append(f"node images ({source}): {', '.join(cells)}")
    return lines


def _gate_line(gate: GateStatus, now: datetime) -> str:
    """The startup-taint gate in one line: closed on what, or open since when and how."""
    if gate.state == "closed":
        shown = ", ".join(gate.missing) or "nothing (removal pending)"
        return f"startup taint {gate.taint}: closed {_ago(now, gate.closed_since)}, missing {shown}"
    if gate.state == "open" and gate.opened_at is not None:
        how = " by timeout, images missing" if gate.by_timeout else ""
        return f"startup taint {gate.taint}: removed {_ago(now, gate.opened_at)}{how}"
    if gate.state == "open":
        return f"startup taint {gate.taint}: not on the node"
    return f"startup taint {gate.taint}: waiting for the log and the runtime"


def _matrix(view: dict[str, NodeStatus], now: datetime, stale_after: float) -> Table:
    fleets = sorted({fleet for status in view.values() for fleet in status.summary.fleets})
    table = Table(title="image-syncer nodes x Fleets", title_justify="left")
    table.add_column("Node", no_wrap=True)
    for fleet in fleets:
        table.add_column(fleet, justify="center")
    for node in sorted(view):
        status = view[node]
        stale = is_stale(status, now, stale_after)
        cells = []
        for fleet in fleets:
            progress = fleet_progress(status, fleet)
            if progress is None:
                cells.append(Text("-", style="dim"))
            elif progress.complete:
                cells.append(Text("ok", style="green"))
            else:
                cells.append(Text(f"{progress.ready}/{progress.total}", style="red"))
        name = Text(f"{node} (stale)", style="bold red") if stale else Text(node)
        table.add_row(name, *cells)
    return table


async def _read(
    nats_settings: NatsSettings,
    settings: StatusSettings,
    check_log: bool,
    fleet: str | None = None,
) -> tuple[dict[str, NodeStatus], dict[str, str], dict[str, FleetTarget] | None]:
    nc = await connect(nats_settings, name="image-syncer-status")
    try:
        js = nc.jetstream()
        view, unreadable = await list_statuses(await open_bucket(js, settings))
        targets = await log_targets(js, settings.prefix) if check_log else None
        if fleet is not None and targets is None:
            targets = await _one_target(js, settings.prefix, fleet)
    finally:
        await nc.close()
    return view, unreadable, targets


async def _one_target(js: JetStreamContext, prefix: str, fleet: str) -> dict[str, FleetTarget]:
    """``fleet``'s newest event alone (a few messages), to tell its next images apart."""
    newest = await read_fleets(js, prefix, fleet_filter(prefix, fleet)) or {}
    target = target_of(fleet, *newest[fleet]) if fleet in newest else None
    return {fleet: target} if isinstance(target, FleetTarget) else {}


def _show(
    console: Console,
    settings: StatusSettings,
    read: tuple[dict[str, NodeStatus], dict[str, str], dict[str, FleetTarget] | None],
    stale_after: float,
    fleet: str | None,
    node: str | None,
    matrix: bool,
) -> None:
    view, unreadable, targets = read
    now = datetime.now(UTC)
    if node is not None:
        if node not in view:
            raise CommandError(unreadable.get(node) or f"node {node} reports no status")
        _node_detail(
            console, node_rollups({node: view[node]}, now, stale_after)[node], now, targets
        )
        return
    if not view:
        console.print(f"no node reports status in bucket {settings.bucket}")
    elif matrix:
        console.print(_matrix(view, now, stale_after))
    else:
        fleets = fleet_rollups(view, now, stale_after, targets)
        if fleet is not None:
            console.print(_fleet_detail(fleets.get(fleet, FleetRollup(fleet)), view))
            target = (targets or {}).get(fleet)
            if target is not None and target.next_images:
                console.print(_next_detail(next_rollup(view, fleet, target, now, stale_after)))
        else:
            console.print(_fleets_table(fleets))
            table, left_out = _nodes_table(node_rollups(view, now, stale_after, targets), now)
            console.print(table)
            if left_out:
                console.print(f"+{left_out} more nodes, all Fleets ready (--node NODE, --json)")
    for name, reason in sorted(unreadable.items()):
        console.print(f"unreadable entry for node {name}: {reason}", markup=False)


async def _status(
    nats_settings: NatsSettings,
    settings: StatusSettings,
    stale_after: float,
    as_json: bool,
    check_log: bool,
    view_options: tuple[str | None, str | None, bool],
) -> None:
    read = await _read(nats_settings, settings, check_log, view_options[0])
    if as_json:
        doc = _json_view(settings, *read[:2], datetime.now(UTC), stale_after, read[2])
        # msgspec encodes the entries as they are, without a detour through dicts: thousands of
        # nodes take a fraction of json.dumps' time.
        encoded = msgspec.json.encode(doc, order="sorted")
        typer.echo(msgspec.json.format(encoded, indent=2).decode())
        return
    _show(Console(), settings, read, stale_after, *view_options)


@with_nats_options
def status(
    nats: NatsSettings,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the rollups and every raw entry as JSON.")
    ] = False,
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
    fleet: Annotated[
        str | None,
        typer.Option(
            "--fleet", envvar="STATUS_FLEET", help="Only this Fleet (NAMESPACE/NAME), every node."
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option("--node", envvar="STATUS_NODE", help="Only this node, each of its Fleets."),
    ] = None,
    matrix: Annotated[
        bool,
        typer.Option("--matrix", envvar="STATUS_MATRIX", help="Draw the nodes x Fleets matrix."),
    ] = False,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """Per Fleet nodes ready and who misses what; per node Fleets ready, heartbeat, problems."""
    try:
        if fleet is not None:
            fleet = parse_fleet(fleet)
        if node is not None:
            check_node(node)
    except StatusError as e:
        fail(str(e), code=2)
    settings = status_settings(subject_prefix)
    run_nats_command(
        _status(nats, settings, stale_after, as_json, check_log, (fleet, node, matrix))
    )


def register(app: typer.Typer) -> None:
    """Add ``status`` to the root app."""
    app.command("status")(status)
