"""The event log on JetStream: its streams, how an event is appended, how the log is read back.

The broadcaster and the ``publish`` command append through :func:`publish_event`; the syncer, the
broadcaster's catch-up and the ``events`` command read through :func:`read_log`. Keeping both here
means the compaction rules below hold whoever writes.

Compaction. A stream keeps one message per subject (``max_msgs_per_subject=1``) and the subject
names the action, so an object could hold three messages: its newest ``added``, ``updated`` and
``deleted``. Every message carries the whole object, so a newer one makes the older ones
redundant: once an ``updated`` is stored the object's ``added`` is purged, and once a ``deleted``
(which carries a per-message TTL) is stored its ``added`` and ``updated`` are. A live object thus
has exactly one message, a deleted one only its tombstone until that expires, and replay cost is
bounded by the number of live objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from wire.contract import (
    Action,
    Kind,
    check_prefix,
    encode_event,
    event_headers,
    parse_event_type,
    subject_filter,
    subject_for,
)

__all__ = [
    "LogSettings",
    "StoredMessage",
    "ensure_streams",
    "publish_event",
    "purge_superseded",
    "read_log",
    "stream_config",
    "stream_name",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogSettings:
    """How the log is laid out on JetStream; every process of one installation must agree."""

    prefix: str = "agones"
    replicas: int = 1
    # Re-publishes of one change (retries, relists, a second broadcaster) inside this window
    # are dropped by JetStream thanks to the deterministic Nats-Msg-Id.
    duplicate_window: float = 120.0
    # How long a deleted object's tombstone stays in the log. A syncer offline for longer still
    # converges: it rebuilds its state from the log, where the object no longer exists at all.
    tombstone_ttl: float = 24 * 3600.0
    max_bytes: int = 1024**3


_STREAM_SUFFIX = {Kind.FLEET: "FLEETS", Kind.GAMESERVER: "GAMESERVERS"}


def stream_name(prefix: str, kind: Kind) -> str:
    """``AGONES_FLEETS`` for the default prefix; other prefixes get their own streams."""
    base = re.sub(r"[^A-Za-z0-9]", "_", check_prefix(prefix)).upper()
    return f"{base}_{_STREAM_SUFFIX[kind]}"


def stream_config(settings: LogSettings, kind: Kind) -> StreamConfig:
    return StreamConfig(
        name=stream_name(settings.prefix, kind),
        description=f"image-syncer: compacted log of Agones {kind} events",
        subjects=[subject_filter(settings.prefix, kind)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        max_msgs_per_subject=1,
        max_bytes=settings.max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=settings.duplicate_window,
        allow_msg_ttl=True,
        allow_rollup_hdrs=False,
        deny_delete=False,
        deny_purge=False,
    )


async def ensure_streams(
    js: JetStreamContext, settings: LogSettings, kinds: tuple[Kind, ...] = (Kind.FLEET,)
) -> list[StreamInfo]:
    """Create the streams, or bring an existing stream's settings in line. Idempotent."""
    infos = []
    for kind in kinds:
        config = stream_config(settings, kind)
        try:
            info = await js.update_stream(config)
            action = "updated"
        except nats.js.errors.NotFoundError:
            info = await js.add_stream(config)
            action = "created"
        log.info(
            "stream %s stream=%s subjects=%s replicas=%d",
            action,
            config.name,
            ",".join(config.subjects or []),
            settings.replicas,
        )
        infos.append(info)
    return infos


async def publish_event(
    js: JetStreamContext,
    settings: LogSettings,
    event_type: str,
    obj: dict[str, Any],
    old: dict[str, Any] | None = None,
    *,
    timeout: float = 5.0,
) -> PubAck:
    """Append one event and wait for JetStream's ack; on a delete, compact the object away.

    Raises nats errors (timeouts, no responders) to the caller, which owns the retry policy.
    A duplicate (same uid, resourceVersion and type inside the window) is acked as
    ``duplicate=True`` and stored once.
    """
    kind, action = parse_event_type(event_type)
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace") or "default"
    name = metadata.get("name", "")
    subject = subject_for(settings.prefix, event_type, namespace, name)
    payload = encode_event(event_type, obj, old)
    headers = event_headers(event_type, obj)
    ttl = settings.tombstone_ttl if action is Action.DELETED else None
    ack = await js.publish(
        subject,
        payload,
        timeout=timeout,
        stream=stream_name(settings.prefix, kind),
        headers=headers,
        msg_ttl=ttl,
    )
    await purge_superseded(js, settings, kind, action, namespace, name)
    return ack


# What each stored action makes redundant. Every message carries the whole object, so once an
# update is stored the object's added message says nothing more, and once a tombstone is stored
# neither does anything else: a reader that never sees them still ends in the right state.
_SUPERSEDES = {
    Action.ADDED: (),
    Action.UPDATED: (Action.ADDED,),
    Action.DELETED: (Action.ADDED, Action.UPDATED),
}


async def purge_superseded(
    js: JetStreamContext,
    settings: LogSettings,
    kind: Kind,
    action: Action,
    namespace: str,
    name: str,
) -> None:
    """Purge the object's messages that ``action``, just stored, supersedes. Idempotent.

    This keeps the log at one message per live object (replay costs what the live Fleets
    cost), and at nothing once a tombstone expires.
    """
    stream = stream_name(settings.prefix, kind)
    for older in _SUPERSEDES[action]:
        subject = subject_for(settings.prefix, f"{kind}.events.{older}", namespace, name)
        await js.purge_stream(stream, subject=subject)


@dataclass(frozen=True)
class StoredMessage:
    """A message as the log holds it (sequence, time, subject), not yet decoded."""

    seq: int
    time: datetime | None
    subject: str
    data: bytes
    headers: dict[str, str]


async def read_log(
    js: JetStreamContext,
    stream: str,
    *,
    subject: str | None = None,
    follow: bool = False,
    batch: int = 1000,
    idle_timeout: float = 5.0,
) -> AsyncIterator[StoredMessage]:
    """Yield the stream's messages in sequence order, from the first.

    Without ``follow`` the iteration ends at the last message that existed when it began, so
    it finishes even while writers keep appending. Reads go through an ephemeral ordered
    consumer: no ack traffic, no server-side state left behind.
    """
    info = await js.stream_info(stream)
    last_seq = info.state.last_seq
    if not follow and info.state.messages == 0:
        return
    # A callback feeding our own queue, rather than next_msg(): next_msg creates a task and a
    # wait_for per message, which doubled the cost of a replay. Here a message that is already
    # buffered is taken without awaiting anything.
    inbox: asyncio.Queue[Msg] = asyncio.Queue()

    async def deliver(msg: Msg) -> None:
        inbox.put_nowait(msg)

    sub = await js.subscribe(
        subject or ">",
        stream=stream,
        cb=deliver,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, max_ack_pending=-1),
        pending_msgs_limit=batch * 64,
    )
    try:
        if not follow and subject and await _matches_nothing(sub, inbox):
            return
        while True:
            msg = await _next(inbox, None if follow else idle_timeout)
            if msg is None:
                # Quiet for a while: done if nothing (matching) is left, e.g. a filter that
                # matches nothing, or messages purged or expired since we looked.
                if inbox.empty() and await _caught_up(sub):
                    return
                continue
            meta = msg.metadata
            yield StoredMessage(
                seq=meta.sequence.stream,
                time=meta.timestamp,
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
            )
            if not follow and meta.sequence.stream >= last_seq:
                return
            if not follow and meta.num_pending == 0:
                return
    finally:
        await _quiet_unsubscribe(sub)


async def _next(inbox: asyncio.Queue[Msg], timeout: float | None) -> Msg | None:
    try:
        return inbox.get_nowait()
    except asyncio.QueueEmpty:
        pass
    try:
        return await asyncio.wait_for(inbox.get(), timeout)
    except TimeoutError:
        return None


async def _matches_nothing(
    sub: JetStreamContext.PushSubscription, inbox: asyncio.Queue[Msg]
) -> bool:
    # num_pending alone is not enough: messages the server already pushed may still be on
    # their way to us, and returning then would make a replay silently fold nothing.
    info = await sub.consumer_info()
    nothing_delivered = info.delivered is None or info.delivered.consumer_seq == 0
    return info.num_pending == 0 and nothing_delivered and inbox.empty()


async def _caught_up(sub: JetStreamContext.PushSubscription) -> bool:
    info = await sub.consumer_info()
    return info.num_pending == 0


async def _quiet_unsubscribe(sub: JetStreamContext.PushSubscription) -> None:
    gone = (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError)
    with contextlib.suppress(*gone):
        await sub.unsubscribe()
