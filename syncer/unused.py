"""``--remove-unused`` wired into the syncer: record our pulls, clean up after each reconcile.

:class:`~syncer.cleanup.Cleaner` holds the rules; this adapter gives it what the running syncer
has: every successful pull of its own, and each reconcile's single ListImages answer with the
desired images. Cleanup is a convenience, never a reason to stop pulling: the bucket is opened
lazily (NATS may be down at start), and a NATS failure is one log line per outage and a metric.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from nats.js import JetStreamContext

from syncer import metrics
from syncer.cleanup import BUCKET, Cleaner, Remover
from syncer.cri import RuntimeImage
from syncer.puller import PullResult
from syncer.references import ImageRef
from wire.permissions import bucket_for

__all__ = ["UnusedImages"]

log = logging.getLogger(__name__)


class UnusedImages:
    def __init__(
        self,
        js: JetStreamContext,
        node: str,
        remover: Remover,
        *,
        grace: float,
        prefix: str = "agones",
        replicas: int = 1,
    ) -> None:
        self._js = js
        self._node = node
        self._remover = remover
        self._grace = grace
        self._bucket = bucket_for(BUCKET, prefix)
        self._replicas = replicas
        self._cleaner: Cleaner | None = None
        self._unrecorded: set[str] = set()
        self._failing = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def _open(self) -> Cleaner:
        if self._cleaner is None:
            self._cleaner = await Cleaner.open(
                self._js,
                self._node,
                self._remover,
                grace=self._grace,
                bucket=self._bucket,
                replicas=self._replicas,
            )
            log.info(
                "unused-image cleanup enabled",
                extra={
                    "bucket": self._bucket,
                    "grace": self._grace,
                    "recorded": len(self._cleaner.pulled),
                },
            )
        return self._cleaner

    def on_pull_result(self, result: PullResult) -> None:
        """Remember our own successful pulls (recorded in the background)."""
        if result.ok:
            self._unrecorded.add(str(result.image))
            task = asyncio.create_task(self._record_pending())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _record_pending(self) -> None:
        try:
            cleaner = await self._open()
            for ref in sorted(self._unrecorded):
                await cleaner.record_pulled(ref)
                self._unrecorded.discard(ref)
        except Exception as e:
            # Kept in _unrecorded and retried on the next pull or cleanup cycle.
            self._failed("record_pulled", e)
            return
        self._recovered()

    async def after_list(self, desired: Collection[ImageRef], images: list[RuntimeImage]) -> None:
        """One cleanup cycle on a reconcile's ListImages answer."""
        try:
            cleaner = await self._open()
            for ref in sorted(self._unrecorded):
                await cleaner.record_pulled(ref)
                self._unrecorded.discard(ref)
            removals = await cleaner.observe([str(r) for r in desired], images)
        except Exception as e:
            self._failed("cleanup", e)
            return
        self._recovered()
        for removal in removals:
            metrics.IMAGES_REMOVED.labels(removal.outcome).inc()

    def _failed(self, op: str, error: Exception) -> None:
        metrics.NATS_ERRORS.labels(op).inc()
        if not self._failing:
            self._failing = True
            log.warning("unused-image bookkeeping failed", extra={"op": op, "error": repr(error)})

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("unused-image bookkeeping recovered")
