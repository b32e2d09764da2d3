"""Command: ``status``, the nodes' progress on the Fleets, from the node status bucket.

It reads what the syncers write through :mod:`wire.nodestatus` and nothing else, so it shows
exactly what the nodes report; ``--check-log`` also reads the log (:mod:`image_syncer.fleetlog`)
to mark nodes that are behind the Fleet's newest event (``--fleet`` always reads that one Fleet's
newest event, and shows its next images, ``image-syncer.octops.io/next-images``, apart). By
default it answers what a person asks first (:mod:`image_syncer.nodeview`): per Fleet, nodes
ready and who misses what and why; per node, Fleets ready, heartbeat and problems. ``--fleet``
and ``--node`` drill down, ``--matrix`` draws nodes x Fleets.

Exit codes: 0 shown, 1 an error the user can fix (one line on stderr), 2 bad input, 3 with
``--exit-code`` when what is shown is not all well (a script's check).
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

from image_syncer.fleetlog import log_targets, newest_event, target_of
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
from image_syncer.problems import natural_key
from image_syncer.statusbucket import open_bucket, status_settings
from image_syncer.statusview import Overview, ago, overview, render_overview
from image_syncer.statusview import matrix as matrix_view
from wire.contract import NEXT_IMAGES_ANNOTATION
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    GateStatus,
    NodeState,
    NodeStatus,
    StatusError,
    StatusSettings,
    check_node,
    list_statuses,
    parse_fleet,
)
from wire.permissions import READER_INBOX, inbox_prefix
from wire.readiness import FleetTarget, fleet_progress

__all__ = ["NOT_ALL_WELL", "register"]

# ``--exit-code``: the view shows a problem (1 is an error, 2 bad input).
NOT_ALL_WELL = 3


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
    summary: Overview,
    unreadable: dict[str, str],
    now: datetime,
    stale_after: float,
) -> dict[str, Any]:
    fleets, nodes = _rollup_json(summary.fleets, summary.nodes, now)
    return {
        "bucket": settings.bucket,
        "generated_at": now.isoformat(),
        "stale_after_seconds": stale_after,
        "summary": summary.summary_line(),
        "problems": [
            {
                "image": group.image,
                "reason": group.reason,
                "failing": group.failing,
                "nodes": sorted(group.nodes, key=natural_key),
                "fleets": sorted(group.fleets, key=natural_key),
                "error": group.example,
            }
            for group in summary.problems
        ],
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
    for node, state in sorted(rows, key=lambda row: natural_key(row[0])):
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
        f"started {ago(now, status.started_at)}, heartbeat {ago(now, status.reported_at)}, "
        f"last reconcile {ago(now, summary.last_reconcile)}",
        markup=False,
        highlight=False,
    )
    table = Table(title=f"Fleets on {r.node}", title_justify="left")
    for column in ("Fleet", "Event seq", "State"):
        table.add_column(column, no_wrap=column != "State")
    for fleet in sorted({*summary.fleets, *summary.excluded, *(targets or {})}, key=natural_key):
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
        return f"startup taint {gate.taint}: closed {ago(now, gate.closed_since)}, missing {shown}"
    if gate.state == "open" and gate.opened_at is not None:
        how = " by timeout, images missing" if gate.by_timeout else ""
        return f"startup taint {gate.taint}: removed {ago(now, gate.opened_at)}{how}"
    if gate.state == "open":
        return f"startup taint {gate.taint}: not on the node"
    return f"startup taint {gate.taint}: waiting for the log and the runtime"


async def _read(
    nats_settings: NatsSettings,
    settings: StatusSettings,
    check_log: bool,
    fleet: str | None = None,
) -> tuple[dict[str, NodeStatus], dict[str, str], dict[str, FleetTarget] | None]:
    # Replies on the read-only role's inbox: reading is all status does.
    nc = await connect(
        nats_settings.with_inbox(inbox_prefix(READER_INBOX)), name="image-syncer-status"
    )
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
    newest = await newest_event(js, prefix, fleet) or {}
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
) -> bool:
    """Print the view asked for; whether all is well in it (``--exit-code``)."""
    view, unreadable, targets = read
    now = datetime.now(UTC)
    if node is not None:
        if node not in view:
            raise CommandError(unreadable.get(node) or f"node {node} reports no status")
        node_rollup = node_rollups({node: view[node]}, now, stale_after, targets)[node]
        _node_detail(console, node_rollup, now, targets)
        return node_rollup.healthy
    well = False
    if not view:
        console.print(f"no node reports status in bucket {settings.bucket}")
    elif fleet is not None:
        rollup = fleet_rollups(view, now, stale_after, targets).get(fleet, FleetRollup(fleet))
        console.print(_fleet_detail(rollup, view))
        well = bool(rollup.ready) and not rollup.not_ready
        target = (targets or {}).get(fleet)
        if target is not None and target.next_images:
            staged = next_rollup(view, fleet, target, now, stale_after)
            console.print(_next_detail(staged))
            well = well and not staged.not_ready
    else:
        summary = _overview(view, now, stale_after, targets)
        well = summary.all_well
        if matrix:
            console.print(summary.summary_line(), markup=False, highlight=False)
            console.print(matrix_view(view, now, stale_after, console.width))
        else:
            render_overview(console, summary, now)
    for name, reason in sorted(unreadable.items()):
        console.print(f"unreadable entry for node {name}: {reason}", markup=False)
    return well and not unreadable


def _overview(
    view: dict[str, NodeStatus],
    now: datetime,
    stale_after: float,
    targets: dict[str, FleetTarget] | None,
) -> Overview:
    return overview(
        fleet_rollups(view, now, stale_after, targets),
        node_rollups(view, now, stale_after, targets),
    )


async def _status(
    nats_settings: NatsSettings,
    settings: StatusSettings,
    stale_after: float,
    as_json: bool,
    check_log: bool,
    view_options: tuple[str | None, str | None, bool],
) -> bool:
    read = await _read(nats_settings, settings, check_log, view_options[0])
    if as_json:
        now = datetime.now(UTC)
        summary = _overview(read[0], now, stale_after, read[2])
        doc = _json_view(settings, summary, read[1], now, stale_after)
        # msgspec encodes the entries as they are, without a detour through dicts: thousands of
        # nodes take a fraction of json.dumps' time.
        encoded = msgspec.json.encode(doc, order="sorted")
        typer.echo(msgspec.json.format(encoded, indent=2).decode())
        return summary.all_well and not read[1]
    return _show(Console(), settings, read, stale_after, *view_options)


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
    exit_code: Annotated[
        bool,
        typer.Option(
            "--exit-code",
            envvar="STATUS_EXIT_CODE",
            help="Exit 3 unless every Fleet shown is ready on every live node and no node is "
            "stale, unreadable or wants no Fleet.",
        ),
    ] = False,
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """A summary line, then problems grouped by image and reason, Fleets, nodes.

    --fleet and --node show one of them in full (every error text), --json everything.
    """
    try:
        if fleet is not None:
            fleet = parse_fleet(fleet)
        if node is not None:
            check_node(node)
    except StatusError as e:
        fail(str(e), code=2)
    settings = status_settings(subject_prefix)
    well = run_nats_command(
        _status(nats, settings, stale_after, as_json, check_log, (fleet, node, matrix))
    )
    if exit_code and not well:
        raise typer.Exit(NOT_ALL_WELL)


def register(app: typer.Typer) -> None:
    """Add ``status`` to the root app."""
    app.command("status")(status)
