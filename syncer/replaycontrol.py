"""How an operator makes a node re-read the whole event log, and how the syncer hears about it.

``image-syncer replay --node N`` writes a request id to ``replay.<N>`` in the status bucket
(:func:`wire.nodestatus.request_replay`). The request waits there, without TTL, until the node
honours it: a running syncer sees it through :func:`watch_replay_requests`, a stopped one finds it
with :func:`pending_replay` on its next start. Once the replay is done the request is deleted
with a compare-and-set on its revision, so a newer request that arrived meanwhile survives and is
honoured in turn. Deliberately a KV key and not a message: the syncer may be down when asked, and
two requests before one replay need only one replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from ops.lifecycle import sleep_unless_stopping, until_stopping
from wire.nodestatus import (
    ReplayRequest,
    StatusError,
    StatusSettings,
    decode_replay_request,
    ensure_status_bucket,
    open_status_bucket,
    replay_key,
)

__all__ = ["PendingReplay", "complete_replay", "pending_replay", "watch_replay_requests"]

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = StatusSettings()

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
    recheck: float = 30.0,
) -> None:
    """Call ``callback`` for each request for ``node`` (the pending one first), until stopping.

    Ends on ``stopping``, not only on a cancel: a cancel can be lost (Python 3.11's
    ``asyncio.wait_for``, which nats-py's watcher uses, returns the update instead when one
    arrives at the same moment), and this loop would then outlive the syncer's stop.

    After ``callback`` returns, the request is completed (deleted). If it raises, the error is
    logged and the request stays for the next start. Ids in ``ignore`` (a request honoured at
    start-up) and ids already delivered are not delivered again. Every ``recheck`` seconds
    without news the key is read directly too, because an ephemeral watch consumer does not
    survive every server restart. NATS errors are logged and retried; nothing is raised.
    """
    handled = set(ignore)
    failing = False
    while not stopping.is_set():
        try:
            kv = await ensure_status_bucket(js, settings)
            if failing:
                log.info("replay watch recovered", extra={"node": node})
                failing = False
            await _watch(kv, js, node, callback, settings, handled, recheck, stopping)
        except Exception as e:
            if not failing:
                log.warning("replay watch failed", extra={"node": node, "error": repr(e)})
            failing = True
            await sleep_unless_stopping(stopping, min(recheck, 5.0))


async def _watch(
    kv: KeyValue,
    js: JetStreamContext,
    node: str,
    callback: Callable[[PendingReplay], Awaitable[None]],
    settings: StatusSettings,
    handled: set[str],
    recheck: float,
    stopping: asyncio.Event,
) -> None:
    key = replay_key(node)
    watcher = await kv.watch(key)
    try:
        while not stopping.is_set():
            try:
                entry = await until_stopping(stopping, watcher.updates(timeout=recheck))
            except nats.errors.TimeoutError:
                entry = await _current(kv, key)
            if entry is None or entry.operation in (KV_DEL, KV_PURGE):
                continue
            pending = _pending(node, entry.value or b"", entry.revision or 0)
            if pending.request.id in handled:
                continue
            handled.add(pending.request.id)
            await _honour(js, node, callback, pending, settings)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


async def _current(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    try:
        return await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None


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
