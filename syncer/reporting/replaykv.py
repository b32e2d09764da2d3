"""How an operator makes a node re-read the whole event log, and how the syncer hears about it.

``image-syncer replay --node N`` writes a request id to ``replay.<N>`` in the status bucket
(:func:`wire.nodestatus.request_replay`). The request waits there, without TTL, until the node
honours it: a running syncer is pushed it (:func:`watch_replay_requests`), a stopped one finds it
with :func:`pending_replay` on its next start. Once the replay is done the request is deleted
with a compare-and-set on its revision, so a newer request that arrived meanwhile survives and is
honoured in turn. Deliberately a KV key and not a message: the syncer may be down when asked, and
two requests before one replay need only one replay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE

from syncer.following import PushedSubjects, follow
from wire.nodestatus import (
    ReplayRequest,
    StatusError,
    StatusSettings,
    decode_replay_request,
    ensure_status_bucket,
    open_status_bucket,
    replay_key,
)
from wire.permissions import REPLAY_CONSUMER_SUFFIX, durable_name

__all__ = [
    "CONSUMER_SUFFIX",
    "PendingReplay",
    "complete_replay",
    "pending_replay",
    "watch_replay_requests",
]

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = StatusSettings()

# The node's push consumer on its replay key: ``<durable>-replay``.
CONSUMER_SUFFIX = REPLAY_CONSUMER_SUFFIX
# The header a KV delete or purge marker carries (nats-py's KeyValue reads the same).
_KV_OPERATION = "KV-Operation"

# NATS' "wrong last sequence": the request changed since we read it.
_WRONG_LAST_SEQUENCE = (10071, 10164)


@dataclass(frozen=True)
class PendingReplay:
    """A replay request as stored: its revision is what :func:`complete_replay` deletes."""

    request: ReplayRequest
    revision: int


async def pending_replay(
    js: JetStreamContext, node: str, *, settings: StatusSettings = DEFAULT_SETTINGS
) -> PendingReplay | None:
    """The request waiting for ``node``, if any. Raises nats errors (the caller is starting up
    and owns the retry); an unreadable request is logged and treated as a request all the same,
    since replaying needlessly is cheap and ignoring an operator is not."""
    kv = await open_status_bucket(js, settings)
    if kv is None:
        return None
    try:
        entry = await kv.get(replay_key(node))
    except nats.js.errors.KeyNotFoundError:
        return None
    return _pending(node, entry.value or b"", entry.revision or 0)


async def complete_replay(
    js: JetStreamContext,
    node: str,
    pending: PendingReplay,
    *,
    settings: StatusSettings = DEFAULT_SETTINGS,
) -> bool:
    """Delete the honoured request; False when a newer one replaced it (it stays pending)."""
    kv = await ensure_status_bucket(js, settings)
    try:
        await kv.delete(replay_key(node), last=pending.revision)
    except nats.js.errors.APIError as e:
        if e.err_code in _WRONG_LAST_SEQUENCE:
            return False
        raise
    log.info("replay request completed", extra={"node": node, "request": pending.request.id})
    return True


async def watch_replay_requests(
    js: JetStreamContext,
    node: str,
    callback: Callable[[PendingReplay], Awaitable[None]],
    *,
    stopping: asyncio.Event,
    settings: StatusSettings = DEFAULT_SETTINGS,
    ignore: Iterable[str] = (),
) -> None:
    """Call ``callback`` for each request for ``node`` (the pending one first), until stopping.

    The server pushes the node's ``replay.<node>`` key to it (:mod:`syncer.following`, consumer
    ``<durable>-replay``): an idle node asks nothing. After ``callback`` returns, the request is
    completed (deleted). If it raises, the error is logged and the request stays for the next
    start. Ids in ``ignore`` (a request honoured at start-up) and ids already delivered are not
    delivered again, also when a lost consumer is re-created and delivers the key again. NATS
    errors are logged and retried; nothing is raised.
    """
    handled = set(ignore)
    key = replay_key(node)

    async def on_message(msg: Msg) -> None:
        operation = (msg.headers or {}).get(_KV_OPERATION, "")
        if operation in (KV_DEL, KV_PURGE):
            return
        pending = _pending(node, msg.data, msg.metadata.sequence.stream)
        if pending.request.id in handled:
            return
        handled.add(pending.request.id)
        await _honour(js, node, callback, pending, settings)

    pushed = PushedSubjects(
        js,
        f"KV_{settings.bucket}",
        f"$KV.{settings.bucket}.{key}",
        f"{durable_name(node)}{CONSUMER_SUFFIX}",
    )
    await follow(pushed, on_message, stopping, what="replay requests")


async def _honour(
    js: JetStreamContext,
    node: str,
    callback: Callable[[PendingReplay], Awaitable[None]],
    pending: PendingReplay,
    settings: StatusSettings,
) -> None:
    log.info("replay requested", extra={"node": node, "request": pending.request.id})
    try:
        await callback(pending)
    except Exception:
        log.exception(
            "replay failed, request kept for the next start",
            extra={"node": node, "request": pending.request.id},
        )
        return
    await complete_replay(js, node, pending, settings=settings)


def _pending(node: str, data: bytes, revision: int) -> PendingReplay:
    try:
        request = decode_replay_request(data)
    except StatusError as e:
        log.warning(
            "unreadable replay request, replaying anyway", extra={"node": node, "error": str(e)}
        )
        request = ReplayRequest(id=f"rev-{revision}", requested_at=datetime.fromtimestamp(0, UTC))
    return PendingReplay(request=request, revision=revision)
