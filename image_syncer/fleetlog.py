"""The Fleets as the event log has them now: what ``wait`` and ``status --check-log`` compare to.

A node's status may still speak of a Fleet's previous version right after a publish, so the
commands that judge nodes read the Fleet's newest event from the log itself, decoded and
normalized exactly as the syncer does, and judge nodes against its sequence and images.
Commands that write or follow the log (``publish``, ``events``) make sure its stream exists here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from datetime import datetime

import nats.js.errors
from nats.js import JetStreamContext

from image_syncer.oneshot import CommandError
from syncer.folding.references import InvalidImageReference, normalize
from wire.contract import (
    Action,
    ContractError,
    Event,
    Kind,
    decode_event,
    images_of,
    next_images_of,
    object_filter,
)
from wire.directread import read_last
from wire.eventlog import LogSettings, StoredMessage, ensure_streams, read_log, stream_name
from wire.nodestatus import parse_fleet
from wire.readiness import FleetTarget

__all__ = [
    "ensure_stream_exists",
    "fleet_filter",
    "fold_fleet_log",
    "log_targets",
    "newest_event",
    "read_fleets",
    "stream_created",
    "target_of",
    "wait_target",
]


async def ensure_stream_exists(js: JetStreamContext, settings: LogSettings, kind: Kind) -> None:
    """Create a missing stream with ``settings``, but never update an existing one.

    Updating would reset the replicas or windows an operator chose with ``stream init``.
    """
    try:
        await js.stream_info(stream_name(settings.prefix, kind))
    except nats.js.errors.NotFoundError:
        await ensure_streams(js, settings, (kind,))


def fleet_filter(prefix: str, fleet: str) -> str:
    """Every event of one Fleet, any action: ``<prefix>.fleet.events.*.<namespace>.<name>``."""
    namespace, _, name = parse_fleet(fleet).partition("/")
    return object_filter(prefix, Kind.FLEET, namespace, name)


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


def target_of(
    fleet: str, seq: int, event: Event, stream_created: datetime | None = None
) -> FleetTarget | str:
    """What nodes must reach for ``fleet``, or why nothing can be waited for (one line)."""
    if event.action is Action.DELETED:
        return f"fleet {fleet} was deleted (event seq {seq}): there is nothing to wait for"
    current = _normalized(image for _, image in images_of(event.obj))
    upcoming = _normalized(next_images_of(event.obj))
    images = tuple(dict.fromkeys((*current, *upcoming)))
    if not images:
        return f"fleet {fleet} names no image a syncer can pull (event seq {seq})"
    return FleetTarget(seq=seq, images=images, stream_created=stream_created, next_images=upcoming)


def _normalized(images: Iterable[str]) -> tuple[str, ...]:
    # As the syncer folds them: a reference it cannot parse is skipped (it logs why).
    found = []
    for image in images:
        try:
            found.append(str(normalize(image)))
        except InvalidImageReference:
            continue
    return tuple(dict.fromkeys(found))


async def read_fleets(
    js: JetStreamContext, prefix: str, subject: str | None = None
) -> dict[str, tuple[int, Event]] | None:
    """The fold of the Fleet log (or of one Fleet's subjects); None when the stream is missing."""
    try:
        return await fold_fleet_log(read_log(js, stream_name(prefix, Kind.FLEET), subject=subject))
    except nats.js.errors.NotFoundError:
        return None


async def newest_event(
    js: JetStreamContext, prefix: str, fleet: str
) -> dict[str, tuple[int, Event]] | None:
    """``fleet``'s newest event as :func:`read_fleets` folds it (None: no stream, empty: no
    event), read as the newest message of each of its subjects, one per action: one direct get
    however long its history, which a read-only identity may send. Only when that message does
    not decode (the fold skips it) is the whole history read.
    """
    stream = stream_name(prefix, Kind.FLEET)
    subject = fleet_filter(prefix, fleet)
    try:
        # First, as read_log does: a direct get to a missing stream would only time out.
        if not (await js.stream_info(stream)).state.messages:
            return {}
    except nats.js.errors.NotFoundError:
        return None
    last = await read_last(js, stream, subject)
    if not last:
        return {}
    newest = max(last, key=lambda message: message.seq)
    try:
        event = decode_event(newest.data)
    except ContractError:
        return await read_fleets(js, prefix, subject)
    if event.kind is not Kind.FLEET or event.key != fleet:
        return await read_fleets(js, prefix, subject)
    return {fleet: (newest.seq, event)}


async def stream_created(js: JetStreamContext, prefix: str) -> datetime | None:
    """When the Fleet stream was created (which incarnation its sequences belong to)."""
    try:
        return (await js.stream_info(stream_name(prefix, Kind.FLEET))).created
    except nats.js.errors.NotFoundError:
        return None


async def wait_target(js: JetStreamContext, prefix: str, fleet: str) -> FleetTarget:
    created = await stream_created(js, prefix)
    newest = await newest_event(js, prefix, fleet)
    if not newest or fleet not in newest:
        stream = stream_name(prefix, Kind.FLEET)
        raise CommandError(f"fleet {fleet} is not in the event log (stream {stream})")
    target = target_of(fleet, *newest[fleet], stream_created=created)
    if isinstance(target, str):
        raise CommandError(target)
    return target


async def log_targets(js: JetStreamContext, prefix: str) -> dict[str, FleetTarget]:
    """Every live Fleet of the log that names images: what ``status --check-log`` compares to."""
    created = await stream_created(js, prefix)
    newest = await read_fleets(js, prefix) or {}
    targets = {
        fleet: target_of(fleet, seq, event, created) for fleet, (seq, event) in newest.items()
    }
    return {fleet: t for fleet, t in targets.items() if isinstance(t, FleetTarget)}
