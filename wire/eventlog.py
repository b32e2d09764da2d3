"""The event log on JetStream: its streams, how an event is appended, how the log is read back.

The broadcaster and the ``publish`` command append through :func:`publish_event`; the syncer, the
broadcaster's catch-up and the ``events`` command read through :func:`read_log`. Keeping both here
means the compaction rules below hold whoever writes.

Compaction. A stream keeps one message per subject (``max_msgs_per_subject=1``) and the subject
names the action, so an object could hold three messages: its newest ``added``, ``updated`` and
``deleted``. Every message carries the whole object, so the newest one makes every older one of
the same object redundant: once a message is stored, the object's messages older than it are
purged (:func:`compact_object`, bounded by the new message's sequence, so it can never remove a
newer one). A live object thus has exactly one message, a deleted one only its tombstone (which
carries a per-message TTL) until that expires, and replay cost is bounded by the number of live
objects. A purge that did not happen (the writer stopped between the ack and the purge) leaves
older messages behind; a reader that finds them (the broadcaster's catch-up) purges them.

Optimistic concurrency. A writer may say which message it believes is the object's newest
(``expected_last_seq``, 0 for none): JetStream then stores the event only if that still holds,
across all of the object's subjects (``Nats-Expected-Last-Subject-Sequence`` with
``Nats-Expected-Last-Subject-Sequence-Subject`` set to :func:`object_filter`, server 2.11+), and
:class:`LogConflict` tells the writer its view is stale. A publish computed from an old view (a
second broadcaster, a deposed leader's buffered retry) can therefore never land over a newer one.
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

from ops.logs import describe_error
from wire.contract import (
    DEFAULT_PREFIX,
    HEADER_MSG_ID,
    MAX_EVENT_BYTES,
    Action,
    ContractError,
    EventType,
    Kind,
    NodeImages,
    check_prefix,
    decode_node_images,
    encode_event,
    encode_node_images,
    event_headers,
    node_images_filter,
    node_images_message_id,
    node_images_subject,
    object_filter,
    subject_filter,
    subject_for,
)
from wire.directread import read_direct

__all__ = [
    "MAX_CONSUMERS",
    "EventTooLarge",
    "LogConflict",
    "LogSettings",
    "StoredMessage",
    "compact_object",
    "ensure_node_images_stream",
    "ensure_streams",
    "last_message",
    "last_node_images",
    "node_images_stream_config",
    "node_images_stream_name",
    "publish_event",
    "publish_node_images",
    "read_log",
    "read_node_images",
    "stream_config",
    "stream_name",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogSettings:
    """How the log is laid out on JetStream; every process of one installation must agree."""

    prefix: str = DEFAULT_PREFIX
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


# nats-server 2.15 caps every stream at 1,000 consumers unless the stream sets its own limit
# (and reads 0 or -1 as "use that default"): a cluster's 1,001st node could not create its
# durable. One durable per node, plus the short-lived ordered consumers of replays, status and
# wait: room for clusters far past the thousands of nodes this is built for.
MAX_CONSUMERS = 100_000


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
        # Nodes read the log with direct gets (wire.directread): they may create no consumer.
        allow_direct=True,
        deny_delete=False,
        deny_purge=False,
        max_consumers=MAX_CONSUMERS,
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


class LogConflict(Exception):
    """The object's newest message is not the one the writer expected: its view is stale."""


class EventTooLarge(ValueError):
    """Even trimmed of what no reader needs, the event is over the size a message may have."""


# JetStream's API error code for a failed Nats-Expected-Last-*-Sequence check.
_WRONG_LAST_SEQUENCE = 10071
_HEADER_EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"
_HEADER_EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
# Room left for the headers (ours, JetStream's TTL) within MAX_EVENT_BYTES.
_HEADER_ROOM = 1024
# What no reader of the log needs, dropped in this order from an event too large to store:
# the previous object of an update (the syncer folds new objects only), the status the
# controller rewrites all the time, and kubectl's copy of the whole last applied object.
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


async def publish_event(
    js: JetStreamContext,
    settings: LogSettings,
    event_type: EventType | str,
    obj: dict[str, Any],
    old: dict[str, Any] | None = None,
    *,
    timeout: float = 5.0,
    expected_last_seq: int | None = None,
) -> PubAck:
    """Append one event and wait for JetStream's ack; then compact the object's older messages.

    With ``expected_last_seq`` (the sequence of the object's newest message as the caller saw
    it, 0 for none) the event is stored only if that is still true, else :class:`LogConflict`.
    Raises :class:`EventTooLarge` for an object that cannot fit a message, ContractError for
    one the contract refuses, and nats errors (timeouts, no responders, API errors) to the
    caller, which owns the retry policy. A duplicate (same uid, resourceVersion and type inside
    the window) is acked as ``duplicate=True`` with the original's sequence and stored once.

    The compaction runs after a duplicate too, which is what completes it when the first attempt
    was stored but its purge failed: bounded by the original's sequence, it removes only what
    that message (or a newer one) already supersedes, never the object's newest message.
    """
    kind, action = event_type = EventType.of(event_type)
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace") or "default"
    name = metadata.get("name", "")
    subject = subject_for(settings.prefix, event_type, namespace, name)
    payload = _fitting_payload(event_type, obj, old, f"{namespace}/{name}")
    headers = event_headers(event_type, obj)
    if expected_last_seq is not None:
        headers[_HEADER_EXPECTED_SEQ] = str(expected_last_seq)
        headers[_HEADER_EXPECTED_SUBJECT] = object_filter(settings.prefix, kind, namespace, name)
    ttl = settings.tombstone_ttl if action is Action.DELETED else None
    try:
        ack = await js.publish(
            subject,
            payload,
            timeout=timeout,
            stream=stream_name(settings.prefix, kind),
            headers=headers,
            msg_ttl=ttl,
        )
    except nats.js.errors.APIError as e:
        if e.err_code == _WRONG_LAST_SEQUENCE:
            raise LogConflict(f"{namespace}/{name}: {e.description}") from e
        raise
    if expected_last_seq != 0:
        # Stored against "no message yet", the object has nothing older to purge.
        await compact_object(js, settings, kind, namespace, name, ack.seq)
    return ack


def _fitting_payload(
    event_type: EventType, obj: dict[str, Any], old: dict[str, Any] | None, what: str
) -> bytes:
    limit = MAX_EVENT_BYTES - _HEADER_ROOM
    payload = encode_event(event_type, obj, old)
    if len(payload) <= limit:
        return payload
    dropped = []
    trims = _TRIMS + (_TOMBSTONE_TRIMS if event_type.action is Action.DELETED else ())
    for part, trim in trims:
        obj, old, changed = trim(obj, old)
        if not changed:
            continue
        dropped.append(part)
        payload = encode_event(event_type, obj, old)
        if len(payload) <= limit:
            log.warning(
                "event trimmed to fit a message",
                extra={
                    "object": what,
                    "event_type": str(event_type),
                    "dropped": ",".join(dropped),
                    "bytes": len(payload),
                },
            )
            return payload
    raise EventTooLarge(
        f"{event_type} of {what} is {len(payload)} bytes without {','.join(dropped) or 'nothing'}"
        f", over the {limit} byte limit"
    )


Trim = tuple[dict[str, Any], dict[str, Any] | None, bool]


def _drop_old(obj: dict[str, Any], old: dict[str, Any] | None) -> Trim:
    return obj, None, old is not None


def _drop_status(obj: dict[str, Any], old: dict[str, Any] | None) -> Trim:
    if "status" not in obj:
        return obj, old, False
    return {k: v for k, v in obj.items() if k != "status"}, old, True


def _drop_last_applied(obj: dict[str, Any], old: dict[str, Any] | None) -> Trim:
    metadata = obj.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    if _LAST_APPLIED not in annotations:
        return obj, old, False
    kept = {k: v for k, v in annotations.items() if k != _LAST_APPLIED}
    return {**obj, "metadata": {**metadata, "annotations": kept}}, old, True


def _drop_spec(obj: dict[str, Any], old: dict[str, Any] | None) -> Trim:
    if "spec" not in obj:
        return obj, old, False
    return {k: v for k, v in obj.items() if k != "spec"}, old, True


def _identity_only(obj: dict[str, Any], old: dict[str, Any] | None) -> Trim:
    metadata = obj.get("metadata") or {}
    kept = {k: v for k, v in metadata.items() if k in _IDENTITY}
    return {**obj, "metadata": kept}, old, kept != metadata


_TRIMS = (("old_obj", _drop_old), ("status", _drop_status), (_LAST_APPLIED, _drop_last_applied))
# A tombstone is read for which object is gone, never for what it held: rather than refuse a
# delete (the object would then stay live in the log for good), it goes down to its identity.
_IDENTITY = {"name", "namespace", "uid", "resourceVersion", "generation", "deletionTimestamp"}
_TOMBSTONE_TRIMS = (("spec", _drop_spec), ("metadata", _identity_only))


async def compact_object(
    js: JetStreamContext,
    settings: LogSettings,
    kind: Kind,
    namespace: str,
    name: str,
    newest_seq: int,
) -> None:
    """Purge the object's messages older than ``newest_seq`` (its newest). Idempotent.

    Bounded by the sequence, so a purge sent late (a retry, a slow writer) can only remove what
    the message at ``newest_seq`` supersedes, never a newer message of the same object.
    """
    await js.purge_stream(
        stream_name(settings.prefix, kind),
        seq=newest_seq,
        subject=object_filter(settings.prefix, kind, namespace, name),
    )


async def last_message(
    js: JetStreamContext, settings: LogSettings, kind: Kind, namespace: str, name: str
) -> StoredMessage | None:
    """The object's newest message (any action), or None when the log holds none."""
    try:
        msg = await js.get_last_msg(
            stream_name(settings.prefix, kind),
            object_filter(settings.prefix, kind, namespace, name),
        )
    except nats.js.errors.NotFoundError:
        return None
    return StoredMessage(
        seq=msg.seq or 0,
        time=None,
        subject=msg.subject or "",
        data=msg.data or b"",
        headers=dict(msg.headers or {}),
    )


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
) -> AsyncIterator[StoredMessage]:
    """Yield the stream's messages in sequence order, from the first.

    Without ``follow`` the iteration ends at the last message that existed when it began, so
    it finishes even while writers keep appending; it reads with batched direct gets
    (:mod:`wire.directread`), which a node identity may send, and leaves nothing behind. With
    ``follow`` (the CLI, the broadcaster: never a node) it goes through an ephemeral ordered
    consumer.
    """
    info = await js.stream_info(stream)
    last_seq = info.state.last_seq
    if not follow:
        if info.state.messages == 0:
            return
        async for direct in read_direct(js, stream, subject=subject or ">", batch=batch):
            if direct.seq > last_seq:
                return
            yield StoredMessage(
                direct.seq, direct.time, direct.subject, direct.data, direct.headers
            )
            if direct.seq >= last_seq:
                return
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
        while True:
            msg = await inbox.get()
            meta = msg.metadata
            yield StoredMessage(
                seq=meta.sequence.stream,
                time=meta.timestamp,
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
            )
    finally:
        await _quiet_unsubscribe(sub)


async def _quiet_unsubscribe(sub: JetStreamContext.PushSubscription) -> None:
    gone = (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError)
    with contextlib.suppress(*gone):
        await sub.unsubscribe()


# --- The node-images stream ---------------------------------------------------------------------
#
# Its own stream, so the Fleet stream's consumers never meet a message that is not an object
# event. One message per source (max_msgs_per_subject=1): a reader folds at most a handful.


def node_images_stream_name(prefix: str) -> str:
    """``AGONES_NODE_IMAGES`` for the default prefix."""
    base = re.sub(r"[^A-Za-z0-9]", "_", check_prefix(prefix)).upper()
    return f"{base}_NODE_IMAGES"


def node_images_stream_config(settings: LogSettings) -> StreamConfig:
    return StreamConfig(
        name=node_images_stream_name(settings.prefix),
        description="image-syncer: images every node needs besides the Fleets' (one per source)",
        subjects=[node_images_filter(settings.prefix)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.OLD,
        duplicate_window=settings.duplicate_window,
        # Every node follows it through a consumer of its own (syncer.following): without a
        # limit set here the server allows 1,000, and the 1,001st node could not follow it.
        max_consumers=MAX_CONSUMERS,
        allow_rollup_hdrs=False,
        allow_direct=True,
    )


async def ensure_node_images_stream(js: JetStreamContext, settings: LogSettings) -> StreamInfo:
    """Create the stream, or bring its settings in line. Idempotent."""
    config = node_images_stream_config(settings)
    try:
        return await js.update_stream(config)
    except nats.js.errors.NotFoundError:
        # Debug: the broadcaster's own line says what it published there.
        log.debug("stream created", extra={"stream": config.name})
        return await js.add_stream(config)


async def publish_node_images(
    js: JetStreamContext,
    settings: LogSettings,
    message: NodeImages,
    *,
    timeout: float = 5.0,
    expected_last_seq: int | None = None,
) -> PubAck:
    """Store ``message`` as the newest of its source; a duplicate is acked and stored once.

    With ``expected_last_seq`` (the sequence of the source's message as the caller read it, 0
    for none) it is stored only if that still holds, else :class:`LogConflict`: as for object
    events, a publish computed from a stale view never lands over a newer one.
    """
    headers = {HEADER_MSG_ID: node_images_message_id(message)}
    if expected_last_seq is not None:
        # On the source's own subject: one subject per source, no filter needed.
        headers[_HEADER_EXPECTED_SEQ] = str(expected_last_seq)
    try:
        return await js.publish(
            node_images_subject(settings.prefix, message.source),
            encode_node_images(message),
            timeout=timeout,
            stream=node_images_stream_name(settings.prefix),
            headers=headers,
        )
    except nats.js.errors.APIError as e:
        if e.err_code == _WRONG_LAST_SEQUENCE:
            raise LogConflict(f"node images {message.source}: {e.description}") from e
        raise


async def last_node_images(
    js: JetStreamContext, prefix: str, source: str
) -> tuple[NodeImages | None, int] | None:
    """What the bus holds for ``source``: its message (None if it does not decode) and sequence;
    None when it holds nothing (no message, or no stream at all)."""
    try:
        msg = await js.get_last_msg(
            node_images_stream_name(prefix), node_images_subject(prefix, source)
        )
    except nats.js.errors.NotFoundError:
        return None
    try:
        return decode_node_images(msg.data or b""), msg.seq or 0
    except ContractError as e:
        log.warning("node-images message unreadable: %s (seq %s)", e, msg.seq)
        return None, msg.seq or 0


async def read_node_images(js: JetStreamContext, prefix: str) -> dict[str, NodeImages]:
    """The newest message of every source; empty when the stream does not exist (yet).

    A message that does not decode is logged and skipped: one bad writer must not hide the
    other sources.
    """
    found: dict[str, NodeImages] = {}
    try:
        async for stored in read_log(js, node_images_stream_name(prefix)):
            try:
                message = decode_node_images(stored.data)
            except ContractError as e:
                log.warning(
                    "node-images message skipped",
                    extra={"error": describe_error(e), "seq": stored.seq},
                )
                continue
            found[message.source] = message
    except nats.js.errors.NotFoundError:
        return {}
    return found
