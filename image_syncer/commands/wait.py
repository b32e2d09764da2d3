"""Command: ``wait``, the step a CD pipeline runs before scaling a Fleet.

``wait`` is run right after a publish, when every node's entry may still speak of the Fleet's
previous version (whose images are all present). So it first reads the Fleet's newest event from
the log itself (:mod:`image_syncer.fleetlog`) and counts a node as done only once the node
reports having folded that event and holds its images. It follows the status bucket by reading
what changed every ``--poll-interval`` (direct gets, :class:`wire.nodestatus.StatusWatch`: the
read-only ``reader`` role suffices) and judges again on a change, on a node turning stale, or at
its deadline. Started on a fresh install, before any syncer created the bucket, it waits for the
bucket until its deadline too.

``--fleet`` counts the Fleet's current images and its next images (the annotation
``image-syncer.octops.io/next-images``); ``--next`` waits for the next images alone, the step
before a rollout moves the Fleet to them; ``--min-ready`` is done once that share of the targeted
live nodes is, and names the rest. ``rollout`` waits through :func:`follow` too.

Exit codes: 0 done, 1 not done in time or an error the user can fix (one line on stderr), 2 bad
input (``--fleet`` syntax).
"""

# No ``from __future__ import annotations``: with_nats_options rebuilds the signature, and typer
# must see the Annotated options as objects, not as strings.
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated

import typer
from nats.js import JetStreamContext

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
from image_syncer.problems import group_problems, name_some, natural_key
from image_syncer.statusbucket import status_settings
from ops.durations import format_duration
from wire.contract import NEXT_IMAGES_ANNOTATION
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    DEFAULT_POLL_INTERVAL,
    Missing,
    NodeStatus,
    OutdatedEntry,
    StatusError,
    StatusSettings,
    StatusWatch,
    is_stale,
    open_status_bucket,
    parse_fleet,
)
from wire.permissions import READER_INBOX, inbox_prefix
from wire.readiness import FleetTarget, NodeReadiness, Readiness, node_readiness

__all__ = ["PollIntervalOption", "Scope", "Verdict", "follow", "reader_settings", "register"]


MinReadyOption = Annotated[
    float,
    typer.Option(
        "--min-ready",
        envvar="MIN_READY",
        min=1.0,
        max=100.0,
        metavar="PERCENT",
        help="Done once this percentage of the targeted live nodes is; the rest is reported.",
    ),
]

PollIntervalOption = Annotated[
    float,
    Duration(
        "How often the nodes' status is read again while waiting (only what changed).",
        "STATUS_POLL_INTERVAL",
        "--poll-interval",
    ),
]


def reader_settings(settings: NatsSettings) -> NatsSettings:
    """Replies on the read-only role's own inbox, the one prefix that role may subscribe to."""
    return settings.with_inbox(inbox_prefix(READER_INBOX))


def check_poll_interval(seconds: float) -> float:
    """A positive interval, or exit 2: zero would read the bucket in a busy loop."""
    if seconds <= 0:
        fail("--poll-interval must be positive", code=2)
    return seconds


@dataclass(frozen=True)
class Scope:
    """What counts as done: which images (all, or the next ones), on how many targeted nodes."""

    next_only: bool = False
    # Percent of the targeted live nodes that must be done; the rest is reported.
    min_ready: float = 100.0

    @property
    def what(self) -> str:
        return "next images" if self.next_only else "all images"


@dataclass
class Verdict:
    live: list[str]
    stale: list[str]
    not_targeted: list[str]
    # Node -> why it is not done, one line.
    missing: dict[str, str]
    # Seconds until the next live node turns stale: the view changes then even without news.
    next_change: float | None
    # Node -> its readiness, for the nodes not done (what a progress line ranks).
    behind: dict[str, NodeReadiness] = field(default_factory=dict)
    # What the nodes not done miss, (node, image, why), why None when behind the log: what
    # the timeout report groups (image_syncer.problems).
    items: list[tuple[str, str, Missing | None]] = field(default_factory=list)
    # Live nodes whose entry this reader cannot judge (an older schema), with why.
    unjudged: dict[str, str] = field(default_factory=dict)

    @property
    def targeted(self) -> int:
        return len(self.live) - len(self.not_targeted)

    @property
    def ready(self) -> int:
        return self.targeted - len(self.missing)

    def done(self, scope: Scope) -> bool:
        """Some live node reports, and enough of the targeted ones are done."""
        if not self.live:
            return False
        return not self.missing or self.ready * 100 >= scope.min_ready * self.targeted

    def slowest(self) -> tuple[str, str] | None:
        """The node furthest from done and why: behind the log first, then fewest images."""
        if not self.missing:
            return None

        def rank(node: str) -> tuple[int, float, str]:
            readiness = self.behind.get(node)
            progress = readiness.progress if readiness is not None else None
            if progress is None:
                return (0, 0.0, node)
            return (1, progress.ready / max(progress.total, 1), node)

        node = min(self.missing, key=rank)
        return node, self.missing[node]

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
    scope: Scope = Scope(),
) -> Verdict:
    verdict = Verdict([], [], [], {}, None)
    for node, status in sorted(watch.view.items(), key=lambda item: natural_key(item[0])):
        if not verdict.live_node(node, status, now, stale_after):
            continue
        readiness = node_readiness(status, fleet, target, next_only=scope.next_only)
        if readiness.verdict is Readiness.NOT_TARGETED:
            verdict.not_targeted.append(node)
        elif readiness.verdict is not Readiness.DONE:
            verdict.missing[node] = _missing_line(readiness, target)
            verdict.behind[node] = readiness
            if readiness.progress is None:
                verdict.items.append((node, "", None))
            else:
                verdict.items.extend((node, i, w) for i, w in readiness.progress.missing.items())
    outdated: dict[str, OutdatedEntry] = watch.outdated
    for node, entry in sorted(outdated.items(), key=lambda item: natural_key(item[0])):
        # A live node whose entry this reader cannot judge is not done: say why.
        if verdict.live_node(node, entry.status, now, stale_after):
            verdict.missing[node] = verdict.unjudged[node] = str(entry)
    return verdict


def _missing_line(readiness: NodeReadiness, target: FleetTarget) -> str:
    if readiness.verdict is Readiness.BEHIND:
        if readiness.seq is None:
            return f"behind: has not folded the Fleet yet (log at seq {target.seq})"
        return f"behind: seq {readiness.seq} < {target.seq}"
    assert readiness.progress is not None, "MISSING always carries its progress"
    return describe_progress(readiness.progress)


def _timeout_report(
    fleet: str,
    target: FleetTarget,
    timeout: float,
    verdict: Verdict,
    bucket: str,
    scope: Scope = Scope(),
) -> str:
    waited = format_duration(timeout)
    if not verdict.live:
        stale = (
            f" ({len(verdict.stale)} stale: {', '.join(verdict.stale)})" if verdict.stale else ""
        )
        return f"no live node reports status in bucket {bucket} after {waited}{stale}"
    lines = [
        f"{fleet} (event seq {target.seq}) not ready after {waited}: {len(verdict.missing)} of "
        f"{len(verdict.live)} live nodes not done{_scope_note(scope)}"
    ]
    # Grouped as `status` groups them: one line per (image, reason), however many nodes.
    for group in group_problems((node, fleet, i, w) for node, i, w in verdict.items):
        what = f"{group.image}: {group.reason}" if group.image else group.reason
        lines.append(f"  {what} on {_nodes(group.nodes)}")
    for node, why in verdict.unjudged.items():
        lines.append(f"  {node}: {why}")
    if verdict.stale:
        lines.append(f"  ignored stale nodes: {name_some(verdict.stale, 10)}")
    lines.append(f"  (each node's full errors: image-syncer status --fleet {fleet})")
    return "\n".join(lines)


def _nodes(nodes: set[str]) -> str:
    return f"{len(nodes)} node{'s' * (len(nodes) != 1)} ({name_some(nodes)})"


async def _wait(
    nats_settings: NatsSettings,
    settings: StatusSettings,
    fleet: str,
    timeout: float,
    stale_after: float,
    scope: Scope = Scope(),
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    nc = await connect(reader_settings(nats_settings), name="image-syncer-wait")
    try:
        js = nc.jetstream()
        # Read once: a CD pipeline waits for the version it just published (or a newer one).
        target = await wait_target(js, settings.prefix, fleet)
        if scope.next_only and not target.next_images:
            typer.echo(
                f"error: fleet {fleet} names no next images as of event seq {target.seq} "
                f"(annotation {NEXT_IMAGES_ANNOTATION})",
                err=True,
            )
            return False
        return await follow(
            js,
            settings,
            fleet,
            target,
            deadline=deadline,
            timeout=timeout,
            stale_after=stale_after,
            scope=scope,
            poll_interval=poll_interval,
        )
    finally:
        await nc.close()


async def follow(
    js: JetStreamContext,
    settings: StatusSettings,
    fleet: str,
    target: FleetTarget,
    *,
    deadline: float,
    timeout: float,
    stale_after: float,
    scope: Scope = Scope(),
    progress: Callable[[Verdict], None] | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> bool:
    """Follow the nodes' status until ``scope`` is done for ``target`` (True) or ``deadline``.

    ``deadline`` is on the event loop's clock; ``timeout`` is what the user gave, for the
    report. ``progress`` sees every new verdict (``rollout``
    draws it); the outcome is reported on stdout (done) or stderr (not done). The status is read
    again every ``poll_interval`` seconds, the bucket looked for as often while it is missing.
    """
    loop = asyncio.get_running_loop()
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
        await asyncio.sleep(min(poll_interval, remaining))
    async with StatusWatch(kv, interval=poll_interval) as watch:
        while True:
            verdict = _judge(watch, fleet, target, datetime.now(UTC), stale_after, scope)
            if progress is not None:
                progress(verdict)
            if verdict.done(scope):
                _ready(fleet, target, verdict, scope)
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                report = _timeout_report(fleet, target, timeout, verdict, settings.bucket, scope)
                typer.echo(report, err=True)
                return False
            if verdict.next_change is not None:
                remaining = min(remaining, verdict.next_change)
            await watch.next(timeout=remaining)


def _ready(fleet: str, target: FleetTarget, verdict: Verdict, scope: Scope = Scope()) -> None:
    targeted = verdict.targeted
    if verdict.missing:
        _ready_enough(fleet, target, verdict, scope)
        return
    notes = []
    if verdict.not_targeted:
        notes.append(f"{len(verdict.not_targeted)} not targeted")
    if verdict.stale:
        notes.append(f"{len(verdict.stale)} stale ignored")
    suffix = f" ({', '.join(notes)})" if notes else ""
    typer.echo(
        f"{fleet}: {scope.what} present on {targeted} live nodes as of event seq "
        f"{target.seq}{suffix}"
    )


def _ready_enough(fleet: str, target: FleetTarget, verdict: Verdict, scope: Scope) -> None:
    """Done by ``--min-ready`` with nodes still missing: say how many, and name the rest."""
    lines = [
        f"{fleet}: {scope.what} present on {verdict.ready} of {verdict.targeted} targeted live "
        f"nodes as of event seq {target.seq} (--min-ready {scope.min_ready:g}%); not done:"
    ]
    lines.extend(f"  {node}: {why}" for node, why in verdict.missing.items())
    typer.echo("\n".join(lines))


def _scope_note(scope: Scope) -> str:
    notes = ["next images only"] if scope.next_only else []
    if scope.min_ready < 100:
        notes.append(f"--min-ready {scope.min_ready:g}%")
    return f" ({', '.join(notes)})" if notes else ""


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
    next_only: Annotated[
        bool,
        typer.Option(
            "--next",
            envvar="WAIT_NEXT",
            help="Wait for the Fleet's next images alone (annotation "
            f"{NEXT_IMAGES_ANNOTATION}), not its current ones.",
        ),
    ] = False,
    min_ready: MinReadyOption = 100.0,
    poll_interval: PollIntervalOption = "2s",  # type: ignore[assignment]
) -> None:
    """Exit 0 once every live node folded the Fleet's newest event and holds all of its images.

    All of its images: the current ones and the next ones it names. Exits 1 at once if the
    Fleet is not in the event log or was deleted (or, with --next, names no next images), and
    on timeout with the nodes that are not done and why.
    """
    try:
        fleet = parse_fleet(fleet)
    except StatusError as e:
        fail(f"--fleet: {e}", code=2)
    settings = status_settings(subject_prefix)
    scope = Scope(next_only=next_only, min_ready=min_ready)
    poll_interval = check_poll_interval(poll_interval)
    waiting = _wait(nats, settings, fleet, timeout, stale_after, scope, poll_interval)
    if not run_nats_command(waiting):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``wait`` to the root app."""
    app.command("wait")(wait)
