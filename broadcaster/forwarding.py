"""Turning one watch target's snapshots and events into publications, strictly in order.

One forwarder consumes one watcher's queue, one item at a time, so the events of an object are
published in the order the API server produced them, each only after the previous one settled.

It remembers, per object, the newest message the log holds as far as it knows (the object, its
sequence, whether it is a tombstone). That gives ``updated`` events their ``old_obj``, lets it
skip what the log already holds or has newer (a resync, a replayed event, a watch that lags
another broadcaster's), and is what each publish is conditioned on: the event is stored only if
the object's newest message is still that sequence. When it is not (another broadcaster, or a
former leader's late retry, wrote since), the forwarder reads the object's newest message again
and publishes only if its event is still newer: the log never goes backwards, whoever else
writes, and no lease or clock is trusted for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broadcaster import metrics
from broadcaster.catchup import Key, LogView, Object, Publication, key_of, plan
from broadcaster.ordering import Recorded, newer
from broadcaster.publishing import Outcome, Publisher
from broadcaster.settings import Settings, WatchTarget
from broadcaster.watching import Change, Listed
from ops.retry import Backoff, retry
from wire.contract import Action, EventType
from wire.natsconn import RETRYABLE

__all__ = ["Forwarder"]

log = logging.getLogger(__name__)

_ACTIONS = {"ADDED": Action.ADDED, "MODIFIED": Action.UPDATED, "DELETED": Action.DELETED}

T = TypeVar("T")


class Forwarder:
    def __init__(
        self, target: WatchTarget, settings: Settings, publisher: Publisher, view: LogView
    ) -> None:
        self.target, self.settings = target, settings
        self.publisher = publisher
        self.view = view
        self.queue: asyncio.Queue[Listed | Change] = asyncio.Queue(maxsize=256)
        self.caught_up = asyncio.Event()
        self._known: dict[Key, Recorded] = {}

    async def run(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                if isinstance(item, Listed):
                    await self._catch_up(item)
                else:
                    await self._forward(item)
            finally:
                self.queue.task_done()

    async def _catch_up(self, listed: Listed) -> None:
        kind = self.target.kind
        recorded = await self._with_retry("read the log", lambda: self.view.recorded(kind))
        for key, entry in sorted(recorded.items()):
            if entry.leftovers:
                await self._with_retry(
                    "purge leftovers", functools.partial(self.view.compact, kind, key, entry.seq)
                )
        self._known = dict(recorded)
        publications = plan(self.target, recorded, listed.objects, listed.resource_version)
        for publication in publications:
            await self._settle(publication)
        self.caught_up.set()
        log.info(
            "caught up",
            extra={
                "target": str(self.target),
                "listed": len(listed.objects),
                "recorded": len(recorded),
                "published": len(publications),
                "resource_version": listed.resource_version,
            },
        )

    async def _forward(self, change: Change) -> None:
        action = _ACTIONS.get(change.type)
        if action is None:
            log.warning("unknown watch event type", extra={"type": change.type})
            return
        known = self._known.get(key_of(change.obj))
        if not newer(change.obj, action is Action.DELETED, known):
            metrics.EVENTS_SKIPPED.labels(kind=str(self.target.kind)).inc()
            return
        live = known is not None and not known.deleted
        old = known.obj if action is Action.UPDATED and live and known is not None else None
        await self._settle(Publication(EventType(self.target.kind, action), change.obj, old))

    async def _settle(self, publication: Publication) -> None:
        """Publish, conditioned on the newest message we know of; on a conflict, re-decide."""
        key = key_of(publication.obj)
        deleted = publication.type.action is Action.DELETED
        while True:
            known = self._known.get(key)
            result = await self.publisher.publish(
                publication.type,
                publication.obj,
                publication.old,
                expected_last_seq=known.seq if known is not None else 0,
            )
            if result.outcome in (Outcome.STORED, Outcome.DUPLICATE):
                self._known[key] = Recorded(publication.obj, result.seq, deleted)
                return
            if result.outcome is Outcome.REFUSED:
                return
            current = await self._with_retry(
                "read the object", lambda: self.view.recorded_object(self.target.kind, key)
            )
            if current is None:
                self._known.pop(key, None)
            else:
                self._known[key] = current
            if not newer(publication.obj, deleted, current):
                metrics.EVENTS_SUPERSEDED.labels(kind=str(self.target.kind)).inc()
                log.info(
                    "event superseded by the log, not published",
                    extra={
                        "event_type": publication.event_type,
                        "object": "/".join(key),
                        "resource_version": _version(publication.obj),
                        "log_seq": current.seq if current is not None else 0,
                        "log_resource_version": _version(current.obj) if current else "",
                    },
                )
                return

    async def _with_retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        def report(error: BaseException, delay: float) -> None:
            log.warning(
                f"cannot {what}, retrying",
                extra={
                    "target": str(self.target),
                    "error": repr(error),
                    "retry_in": round(delay, 2),
                },
            )

        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        return await retry(call, retry_on=RETRYABLE, backoff=backoff, on_retry=report)


def _version(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))
