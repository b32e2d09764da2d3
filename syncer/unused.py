"""``--remove-unused`` wired into the syncer: record our pulls, clean up after each reconcile.

:class:`~syncer.cleanup.Cleaner` holds the rules; this adapter gives it what the running syncer
has: every successful pull of its own, and each reconcile's single ListImages answer with the
desired images, plus the images containers still use (CRI ListContainers, asked before every
pass, since containerd removes an image under a running container without complaint). Cleanup is
a convenience, never a reason to stop pulling: the bucket is opened lazily (NATS may be down at
start), and a NATS failure is one log line per outage and a metric. When the runtime cannot say
which images are in use (ListContainers unimplemented or failing) the pass removes nothing: a
removal skipped is retried next cycle, one done blind could kill a game server's restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import grpc
from nats.js import JetStreamContext

from syncer import metrics
from syncer.cleanup import BUCKET, Cleaner, Remover
from syncer.cri import CriError, RuntimeImage
from syncer.puller import PullResult
from syncer.references import ImageRef, normalize
from wire.permissions import bucket_for

__all__ = ["UnusedImages"]

log = logging.getLogger(__name__)

# How long a pull waits for its record before going ahead without it.
_RECORD_WAIT = 2.0


class ContainerImages(Protocol):
    """What the runtime says containers use: :meth:`syncer.cri.CriClient.images_in_use`."""

    async def images_in_use(self) -> frozenset[str]: ...


# Around each RemoveImage: :meth:`syncer.inventory.Inventory.removal`.
RemovalGuard = Callable[[ImageRef], AbstractAsyncContextManager[None]]


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
        containers: ContainerImages | None = None,
        guard: RemovalGuard | None = None,
    ) -> None:
        self._js = js
        self._node = node
        self._remover = remover
        self._grace = grace
        self._bucket = bucket_for(BUCKET, prefix)
        self._replicas = replicas
        self._cleaner: Cleaner | None = None
        self._opening = asyncio.Lock()  # a pull's background record and a pass may both open
        self._unrecorded: set[str] = set()
        self._failing = False
        self._tasks: set[asyncio.Task[None]] = set()
        # The runner hands over its CriClient's bound remove_image; that client also answers
        # ListContainers, so it is the default source of in-use images.
        self._containers = containers or _owner_of(remover)
        self._blind = False
        self._guard = guard

    async def _open(self) -> Cleaner:
        async with self._opening:
            return await self._open_once()

    async def _open_once(self) -> Cleaner:
        if self._cleaner is None:
            self._cleaner = await Cleaner.open(
                self._js,
                self._node,
                self._remove,
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

    async def _remove(self, ref: str) -> None:
        if self._guard is None:
            await self._remover(ref)
            return
        async with self._guard(normalize(ref)):
            await self._remover(ref)

    async def before_pull(self, image: ImageRef) -> None:
        """Record a pull about to start: a syncer killed after the pull but before its result
        is recorded would otherwise leave an image no record owns, never removed. Best effort:
        when NATS does not answer soon (or is known down) the pull goes ahead and is recorded
        after it, as always; a pull that then fails leaves a record the cleanup forgets."""
        if self._failing:
            return
        try:
            cleaner = await asyncio.wait_for(self._open(), _RECORD_WAIT)
            await asyncio.wait_for(cleaner.record_pulled(str(image)), _RECORD_WAIT)
        except Exception as e:
            self._failed("record_pulled", e)

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

    async def after_list(
        self,
        desired: Collection[ImageRef] | Callable[[], Collection[ImageRef]],
        images: list[RuntimeImage],
    ) -> None:
        """One cleanup cycle on a reconcile's ListImages answer; ``desired`` is best a function
        (the desired images now), asked again before each removal."""
        try:
            cleaner = await self._open()
            for ref in sorted(self._unrecorded):
                await cleaner.record_pulled(ref)
                self._unrecorded.discard(ref)
        except Exception as e:
            self._failed("cleanup", e)
            return
        in_use = await self._in_use()
        if in_use is None:
            return
        try:
            removals = await cleaner.observe(_texts(desired), images, in_use)
        except Exception as e:
            self._failed("cleanup", e)
            return
        self._recovered()
        for removal in removals:
            metrics.IMAGES_REMOVED.labels(removal.outcome).inc()

    async def _in_use(self) -> frozenset[str] | None:
        """Images containers use, or None (after one log line per outage) when unknown."""
        if self._containers is None:
            self._skip("no source of running containers", None)
            return None
        try:
            in_use = await self._containers.images_in_use()
        except CriError as e:
            metrics.CRI_ERRORS.labels("ListContainers").inc()
            if e.code is grpc.StatusCode.UNIMPLEMENTED:
                self._skip("the runtime does not implement CRI ListContainers", e)
            else:
                self._skip("CRI ListContainers failed", e)
            return None
        if self._blind:
            self._blind = False
            log.info("images in use known again, unused-image removal resumes")
        return in_use

    def _skip(self, reason: str, error: CriError | None) -> None:
        if not self._blind:
            self._blind = True
            log.warning(
                "unused-image removal skipped: images in use by containers unknown",
                extra={"reason": reason, "error": str(error) if error else ""},
            )

    def _failed(self, op: str, error: Exception) -> None:
        metrics.NATS_ERRORS.labels(op).inc()
        if not self._failing:
            self._failing = True
            log.warning("unused-image bookkeeping failed", extra={"op": op, "error": repr(error)})

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("unused-image bookkeeping recovered")


def _owner_of(remover: Remover) -> ContainerImages | None:
    owner = getattr(remover, "__self__", None)
    return owner if callable(getattr(owner, "images_in_use", None)) else None


def _texts(
    desired: Collection[ImageRef] | Callable[[], Collection[ImageRef]],
) -> Callable[[], list[str]]:
    if callable(desired):
        return lambda: [str(r) for r in desired()]
    texts = [str(r) for r in desired]
    return lambda: texts
