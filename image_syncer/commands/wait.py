"""Command: ``wait``, the step a CD pipeline runs before scaling a Fleet.

``wait`` is run right after a publish, when every node's entry may still speak of the Fleet's
previous version (whose images are all present). So it first reads the Fleet's newest event from
the log itself (:mod:`image_syncer.fleetlog`) and counts a node as done only once the node
reports having folded that event and holds its images. It follows the status bucket with a KV
watch and wakes only on a change, on a node turning stale, or at its deadline. Started on a fresh
install, before any syncer created the bucket, it waits for the bucket until its deadline too.

Exit codes: 0 done, 1 not done in time or an error the user can fix (one line on stderr), 2 bad
input (``--fleet`` syntax).
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import typer

from image_syncer.fleetlog import (
    wait_target,
)
from image_syncer.nodeview import describe_progress
from image_syncer.oneshot import fail, run_nats_command
from image_syncer.options import (
    DEFAULT_PREFIX,
    Duration,
    PrefixOption,
    StaleAfterOption,
    with_nats_options,
)
from image_syncer.statusbucket import status_settings
from ops.durations import format_duration
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    NodeStatus,
    OutdatedEntry,
    StatusError,
    StatusSettings,
    StatusWatch,
    is_stale,
    open_status_bucket,
    parse_fleet,
)
from wire.readiness import FleetTarget, NodeReadiness, Readiness, node_readiness

__all__ = ["register"]


# How often ``wait`` looks for the bucket on a fresh install, before any syncer created it.
_BUCKET_POLL = 2.0


@dataclass
class _Verdict:
    live: list[str]
    stale: list[str]
    not_targeted: list[str]
    # Node -> why it is not done, one line.
    missing: dict[str, str]
    # Seconds until the next live node turns stale: the view changes then even without news.
    next_change: float | None

    def live_node(self, node: str, status: NodeStatus, now: datetime, stale_after: float) -> bool:
        if is_stale(status, now, stale_after):
            self.stale.append(node)
            return False
        self.live.append(node)
        turns_stale = stale_after - (now - status.reported_at).total_seconds()
        if self.next_change is None or turns_stale < self.next_change:
            self.next_change = turns_stale
        return True


def _judge(
    watch: StatusWatch,
    fleet: str,
    target: FleetTarget,
    now: datetime,
    stale_after: float,
) -> _Verdict:
    verdict = _Verdict([], [], [], {}, None)
    for node, status in sorted(watch.view.items()):
        if not verdict.live_node(node, status, now, stale_after):
            continue
        readiness = node_readiness(status, fleet, target)
        if readiness.verdict is Readiness.NOT_TARGETED:
            verdict.not_targeted.append(node)
        elif readiness.verdict is not Readiness.DONE:
            verdict.missing[node] = _missing_line(readiness, target)
    outdated: dict[str, OutdatedEntry] = watch.outdated
    for node, entry in sorted(outdated.items()):
        # A live node whose entry this reader cannot judge is not done: say why.
        if verdict.live_node(node, entry.status, now, stale_after):
            verdict.missing[node] = str(entry)
    return verdict


def _missing_line(readiness: NodeReadiness, target: FleetTarget) -> str:
    if readiness.verdict is Readiness.BEHIND:
        if readiness.seq is None:
            return f"behind: has not folded the Fleet yet (log at seq {target.seq})"
        return f"behind: seq {readiness.seq} < {target.seq}"
    assert readiness.progress is not None, "MISSING always carries its progress"
    return describe_progress(readiness.progress)


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
    lines.extend(f"  {node}: {why}" for node, why in verdict.missing.items())
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
        target = await wait_target(js, settings.prefix, fleet)
        while (kv := await open_status_bucket(js, settings)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                typer.echo(
                    f"no node reported status within {format_duration(timeout)}: bucket "
                    f"{settings.bucket} does not exist (is a syncer running with "
                    f"--subject-prefix {settings.prefix}?)",
                    err=True,
                )
                return False
            await asyncio.sleep(min(_BUCKET_POLL, remaining))
        async with StatusWatch(kv) as watch:
            while True:
                verdict = _judge(watch, fleet, target, datetime.now(UTC), stale_after)
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
    subject_prefix: PrefixOption = DEFAULT_PREFIX,
) -> None:
    """Exit 0 once every live node folded the Fleet's newest event and holds all of its images.

    Exits 1 at once if the Fleet is not in the event log or was deleted, and on timeout with
    the nodes that are not done and why.
    """
    try:
        fleet = parse_fleet(fleet)
    except StatusError as e:
        fail(f"--fleet: {e}", code=2)
    settings = status_settings(subject_prefix)
    if not run_nats_command(_wait(nats, settings, fleet, timeout, stale_after)):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``wait`` to the root app."""
    app.command("wait")(wait)
