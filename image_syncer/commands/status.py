"""Command: ``status``, every node's progress on every Fleet, from the node status bucket.

It reads what the syncers write through :mod:`wire.nodestatus` and nothing else, so it shows
exactly what the nodes report; ``--check-log`` also reads the log (:mod:`image_syncer.fleetlog`)
to mark nodes that are behind the Fleet's newest event. The shared options and the bucket
helpers here serve ``wait`` and ``replay`` too.

Exit codes: 0 shown, 1 an error the user can fix (one line on stderr), 2 bad input.
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import typer
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from rich.console import Console
from rich.table import Table
from rich.text import Text

from image_syncer.fleetlog import log_targets
from image_syncer.oneshot import CommandError, fail, run_nats_command
from image_syncer.options import Duration, with_nats_options
from ops.durations import format_duration
from wire.contract import (
    ContractError,
)
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    FleetProgress,
    FleetTarget,
    NodeStatus,
    Readiness,
    StatusSettings,
    fleet_progress,
    is_stale,
    list_statuses,
    node_readiness,
    open_status_bucket,
)

__all__ = ["PrefixOption", "StaleAfterOption", "open_bucket", "register", "status_settings"]

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


async def open_bucket(js: JetStreamContext, settings: StatusSettings) -> KeyValue:
    kv = await open_status_bucket(js, settings)
    if kv is None:
        raise CommandError(
            f"no node has reported status: bucket {settings.bucket} does not exist "
            f"(is a syncer running with --subject-prefix {settings.prefix}?)"
        )
    return kv


def status_settings(prefix: str) -> StatusSettings:
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
        view, invalid = await list_statuses(await open_bucket(js, settings))
        targets = await log_targets(js, settings.prefix) if check_log else None
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
    run_nats_command(
        _status(nats, status_settings(subject_prefix), stale_after, as_json, check_log)
    )


# --- wait -----------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add ``status`` to the root app."""
    app.command("status")(status)
