"""Commands: ``status``, ``wait`` and ``replay``, the operator's view of the nodes.

They read and write the node status bucket through :mod:`wire.nodestatus` and nothing else, so
they show exactly what the syncers write. ``wait`` is the step a CD pipeline runs before scaling a
Fleet: it follows the bucket with a KV watch and wakes only on a change, on a node turning stale,
or at its deadline.

Exit codes: 0 done, 1 not done in time (``wait``) or an error the user can fix (one line on
stderr), 2 bad input (``--fleet`` syntax, conflicting flags).
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
import asyncio
import getpass
import json
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn, TypeVar

import msgspec
import nats.errors
import typer
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from rich.console import Console
from rich.table import Table
from rich.text import Text

from image_syncer.options import Duration, with_nats_options
from ops.durations import format_duration
from wire.contract import ContractError
from wire.natsconn import NatsSettings, NatsUnavailable, connect
from wire.nodestatus import (
    FleetProgress,
    NodeStatus,
    StatusError,
    StatusSettings,
    StatusWatch,
    check_node,
    fleet_progress,
    is_stale,
    list_statuses,
    open_status_bucket,
    parse_fleet,
    request_replay,
)

__all__ = ["register"]

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


class _UserError(Exception):
    """A mistake or situation the user can fix; one line, no traceback."""


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(work: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(work)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except nats.errors.NoRespondersError:
        _fail("no JetStream responded: is the server started with JetStream enabled (-js)?")
    except (NatsUnavailable, _UserError, StatusError, ContractError, nats.errors.Error) as e:
        _fail(" ".join(str(e).split()) or type(e).__name__)


async def _bucket(js: JetStreamContext, settings: StatusSettings) -> KeyValue:
    kv = await open_status_bucket(js, settings)
    if kv is None:
        raise _UserError(
            f"no node has reported status: bucket {settings.bucket} does not exist "
            f"(is a syncer running with --subject-prefix {settings.prefix}?)"
        )
    return kv


def _settings(prefix: str) -> StatusSettings:
    try:
        settings = StatusSettings(prefix=prefix)
        _ = settings.bucket
    except ContractError as e:
        _fail(str(e), code=2)
    return settings


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    return f"{format_duration(round(max((now - then).total_seconds(), 0.0)))} ago"


# --- status ---------------------------------------------------------------------------------


def _fleets_of(view: dict[str, NodeStatus]) -> list[str]:
    return sorted({fleet for status in view.values() for fleet in status.state.desired})


def _cell(progress: FleetProgress | None) -> Text:
    if progress is None:
        return Text("-", style="dim")
    text = f"{len(progress.present)}/{len(progress.images)}"
    notes = []
    if progress.pulling:
        notes.append(f"{len(progress.pulling)} pulling")
    if progress.failed:
        notes.append(f"{len(progress.failed)} failed")
    if notes:
        text += f" ({', '.join(notes)})"
    style = "green" if progress.complete else "red" if progress.failed else "yellow"
    return Text(text, style=style)


def _table(view: dict[str, NodeStatus], now: datetime, stale_after: float) -> Table:
    fleets = _fleets_of(view)
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
        cells = [_cell(fleet_progress(status, fleet)) for fleet in fleets]
        last = _ago(now, status.state.last_reconcile)
        table.add_row(name, *cells, heartbeat, last, status.version)
    return table


def _failures(view: dict[str, NodeStatus]) -> list[str]:
    lines = []
    for node in sorted(view):
        failed = view[node].state.failed
        lines.extend(f"  {node}: {image}: {failed[image]}" for image in sorted(failed))
    return lines


def _json_view(
    settings: StatusSettings,
    view: dict[str, NodeStatus],
    invalid: dict[str, str],
    now: datetime,
    stale_after: float,
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
    return {
        "bucket": settings.bucket,
        "generated_at": now.isoformat(),
        "stale_after_seconds": stale_after,
        "nodes": nodes,
        "fleets": fleets,
        "invalid": invalid,
    }


async def _status(
    nats_settings: NatsSettings, settings: StatusSettings, stale_after: float, as_json: bool
) -> None:
    nc = await connect(nats_settings, name="image-syncer-status")
    try:
        view, invalid = await list_statuses(await _bucket(nc.jetstream(), settings))
    finally:
        await nc.close()
    now = datetime.now(UTC)
    if as_json:
        doc = _json_view(settings, view, invalid, now, stale_after)
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    console = Console()
    if not view:
        console.print(f"no node reports status in bucket {settings.bucket}")
    else:
        console.print(_table(view, now, stale_after))
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
    subject_prefix: PrefixOption = "agones",
) -> None:
    """Show every node's progress on every Fleet, with stale nodes marked."""
    _run(_status(nats, _settings(subject_prefix), stale_after, as_json))


# --- wait -----------------------------------------------------------------------------------


@dataclass
class _Verdict:
    live: list[str]
    stale: list[str]
    not_targeted: list[str]
    # node -> (progress or None when the node has not seen the Fleet yet)
    missing: dict[str, FleetProgress | None]
    # Seconds until the next live node turns stale: the view changes then even without news.
    next_change: float | None


def _judge(view: dict[str, NodeStatus], fleet: str, now: datetime, stale_after: float) -> _Verdict:
    verdict = _Verdict([], [], [], {}, None)
    for node, status in sorted(view.items()):
        if is_stale(status, now, stale_after):
            verdict.stale.append(node)
            continue
        verdict.live.append(node)
        turns_stale = stale_after - (now - status.reported_at).total_seconds()
        if verdict.next_change is None or turns_stale < verdict.next_change:
            verdict.next_change = turns_stale
        if fleet in status.state.excluded:
            verdict.not_targeted.append(node)
            continue
        progress = fleet_progress(status, fleet)
        if progress is None or not progress.complete:
            verdict.missing[node] = progress
    return verdict


def _missing_line(node: str, progress: FleetProgress | None) -> str:
    if progress is None:
        return f"  {node}: has not seen the Fleet yet"
    parts = []
    for image in progress.missing:
        if image in progress.failed:
            parts.append(f"{image} (failed: {progress.failed[image]})")
        elif image in progress.pulling:
            parts.append(f"{image} (pulling)")
        else:
            parts.append(image)
    present = f"{len(progress.present)}/{len(progress.images)} present"
    return f"  {node}: {present}; missing {', '.join(parts)}"


def _timeout_report(fleet: str, timeout: float, verdict: _Verdict, bucket: str) -> str:
    waited = format_duration(timeout)
    if not verdict.live:
        stale = (
            f" ({len(verdict.stale)} stale: {', '.join(verdict.stale)})" if verdict.stale else ""
        )
        return f"no live node reports status in bucket {bucket} after {waited}{stale}"
    lines = [
        f"{fleet} not ready after {waited}: {len(verdict.missing)} of "
        f"{len(verdict.live)} live nodes miss images"
    ]
    lines.extend(_missing_line(n, p) for n, p in verdict.missing.items())
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
        kv = await _bucket(nc.jetstream(), settings)
        async with StatusWatch(kv) as watch:
            while True:
                verdict = _judge(watch.view, fleet, datetime.now(UTC), stale_after)
                if verdict.live and not verdict.missing:
                    _ready(fleet, verdict)
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    typer.echo(_timeout_report(fleet, timeout, verdict, settings.bucket), err=True)
                    return False
                if verdict.next_change is not None:
                    remaining = min(remaining, verdict.next_change)
                await watch.next(timeout=remaining)
    finally:
        await nc.close()


def _ready(fleet: str, verdict: _Verdict) -> None:
    targeted = len(verdict.live) - len(verdict.not_targeted)
    notes = []
    if verdict.not_targeted:
        notes.append(f"{len(verdict.not_targeted)} not targeted")
    if verdict.stale:
        notes.append(f"{len(verdict.stale)} stale ignored")
    suffix = f" ({', '.join(notes)})" if notes else ""
    typer.echo(f"{fleet}: all images present on {targeted} live nodes{suffix}")


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
    """Exit 0 once every live node holds all of the Fleet's images; 1 on timeout."""
    try:
        fleet = parse_fleet(fleet)
    except StatusError as e:
        _fail(f"--fleet: {e}", code=2)
    settings = _settings(subject_prefix)
    if not _run(_wait(nats, settings, fleet, timeout, stale_after)):
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
                raise _UserError("no node reports status; name the nodes with --node")
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
        _fail("name nodes with --node, or use --all (not both)", code=2)
    for name in nodes:
        try:
            check_node(name)
        except StatusError as e:
            _fail(f"--node: {e}", code=2)
    _run(_replay(nats, _settings(subject_prefix), nodes, every))


def register(app: typer.Typer) -> None:
    """Add ``status``, ``wait`` and ``replay`` to the root app."""
    app.command("status")(status)
    app.command("wait")(wait)
    app.command("replay")(replay)
