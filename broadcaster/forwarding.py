"""Turning one watch target's snapshots and events into publications, strictly in order.

One forwarder consumes one watcher's queue, one item at a time, so the events of an object are
published in the order the API server produced them, each only after the previous one was acked.
It remembers the last object published per key, which gives ``updated`` events their ``old_obj``
and lets it skip what the log already holds: a resync or a replayed event whose resourceVersion
did not change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broadcaster import metrics
from broadcaster.catchup import Key, Object, key_of, plan
from broadcaster.publishing import TRANSIENT, Backoff, Publisher
from broadcaster.settings import Settings, WatchTarget
from broadcaster.watching import Change, Listed

__all__ = ["Forwarder"]

log = logging.getLogger(__name__)

RecordedReader = Callable[[], Awaitable[dict[Key, Object]]]
_ACTIONS = {"ADDED": "added", "MODIFIED": "updated", "DELETED": "deleted"}


class Forwarder:
    def __init__(
        self,
        target: WatchTarget,
        settings: Settings,
        publisher: Publisher,
        read_recorded: RecordedReader,
    ) -> None:
        self.target, self.settings = target, settings
        self.publisher = publisher
        self.read_recorded = read_recorded
        self.queue: asyncio.Queue[Listed | Change] = asyncio.Queue(maxsize=256)
        self.caught_up = asyncio.Event()
        self._known: dict[Key, Object] = {}

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
        recorded = await self._recorded_with_retry()
        publications = plan(self.target, recorded, listed.objects)
        for publication in publications:
            await self.publisher.publish(publication.event_type, publication.obj, publication.old)
        self._known = {key_of(obj): obj for obj in listed.objects}
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

    async def _recorded_with_retry(self) -> dict[Key, Object]:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while True:
            try:
                return await self.read_recorded()
            except TRANSIENT as e:
                delay = backoff.next_delay()
                log.warning(
                    "cannot read the log, retrying",
                    extra={
                        "target": str(self.target),
                        "error": repr(e),
                        "retry_in": round(delay, 2),
                    },
                )
                await asyncio.sleep(delay)

    async def _forward(self, change: Change) -> None:
        action = _ACTIONS.get(change.type)
        if action is None:
            log.warning("unknown watch event type", extra={"type": change.type})
            return
        key = key_of(change.obj)
        previous = self._known.get(key)
        if action != "deleted" and _same_version(previous, change.obj):
            metrics.EVENTS_SKIPPED.labels(kind=str(self.target.kind)).inc()
            return
        old = previous if action == "updated" else None
        await self.publisher.publish(f"{self.target.kind}.events.{action}", change.obj, old)
        if action == "deleted":
            self._known.pop(key, None)
        else:
            self._known[key] = change.obj


def _same_version(previous: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    if previous is None:
        return False
    before, after = previous.get("metadata") or {}, current.get("metadata") or {}
    return before.get("uid") == after.get("uid") and (
        before.get("resourceVersion") == after.get("resourceVersion")
    )
