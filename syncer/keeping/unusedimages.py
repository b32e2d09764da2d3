"""``--remove-unused`` wired into the syncer: record our pulls, clean up after each reconcile.

:class:`~syncer.keeping.cleaner.Cleaner` holds the rules; this adapter gives it what the running
syncer has: every successful pull of its own, and each reconcile's single ListImages answer with the
desired images, plus the images containers still use (CRI ListContainers, asked before every
pass, since containerd removes an image under a running container without complaint). Cleanup is
a convenience, never a reason to stop pulling: the bucket is opened lazily (NATS may be down at
start), and a NATS failure is one log line per outage and a metric. When the runtime cannot say
which images are in use (ListContainers unimplemented or failing) the pass removes nothing: a
removal skipped is retried next cycle, one done blind could kill a game server's restart.

A pull whose record NATS could not take is remembered in memory, and that dies with the process.
On containerd the image itself then carries the memory: the pulled image's record gets the label
``image-syncer.octops.io/unrecorded=<node>`` (:class:`UnrecordedLabels`, through pinning's
images client), and whenever the ledger takes writes again (at start, or NATS back) every image
labelled for this node is recorded as ours and the label removed. Elsewhere (CRI-O) a syncer
killed while NATS is unreachable can still leave such a pull unowned.
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
from syncer.folding.references import ImageRef, normalize
from syncer.keeping.cleaner import BUCKET, Cleaner, Remover
from syncer.keeping.ledger import DEFAULT_TTL
from syncer.pulling.puller import PullResult
from syncer.runtime.containerd_images import ContainerdImages
from syncer.runtime.cri import CriError, RuntimeImage
from wire.permissions import bucket_for

__all__ = ["UNRECORDED_LABEL", "UnrecordedLabels", "UnusedImages"]

log = logging.getLogger(__name__)

# How long a pull waits for its record before going ahead without it.
_RECORD_WAIT = 2.0

# On an image whose pull the ledger could not record; the value is the node that pulled it.
UNRECORDED_LABEL = "image-syncer.octops.io/unrecorded"


class UnrecordedLabels:
    """Pulls the ledger did not take yet, kept as a label on the image in containerd."""

    def __init__(self, images: ContainerdImages, node: str) -> None:
        self._images = images
        self._node = node

    async def mark(self, ref: str) -> None:
        # On the name containerd keeps: a "name:tag@digest" pull is stored as "name@digest".
        await self._images.set_label(normalize(ref).stored_name, UNRECORDED_LABEL, self._node)

    async def marked(self) -> list[str]:
        """Names of the images labelled for this node."""
        records = await self._images.list(f'labels."{UNRECORDED_LABEL}"')
        return sorted(r.name for r in records if r.labels.get(UNRECORDED_LABEL) == self._node)

    async def unmark(self, name: str) -> None:
        await self._images.remove_label(name, UNRECORDED_LABEL)


# The labels when the runtime keeps them (containerd), else None; asked when needed, since the
# runtime is known only once it answered.
LabelsSource = Callable[[], UnrecordedLabels | None]


class ContainerImages(Protocol):
    """What the runtime says containers use: :meth:`syncer.runtime.cri.CriClient.images_in_use`."""

    async def images_in_use(self) -> frozenset[str]: ...


# Around each RemoveImage: :meth:`syncer.pulling.inventory.Inventory.removal`.
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
        labels: LabelsSource | None = None,
        ledger_ttl: float | None = DEFAULT_TTL,
    ) -> None:
        self._js = js
        self._node = node
        self._remover = remover
        self._grace = grace
        self._bucket = bucket_for(BUCKET, prefix)
        self._replicas = replicas
        self._ledger_ttl = ledger_ttl
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
        self._labels = labels or (lambda: None)
        self._unsure: set[str] = set()  # about to be pulled, not recorded before the pull
        # Pulls under way: their record (made before the pull) is not "gone" while absent.
        self._pulling: set[str] = set()
        self._adopt = True  # labelled images may wait (a previous run's, or ours)

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
                ttl=self._ledger_ttl,
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
        self._pulling.add(str(image))
        if self._failing:
            self._unsure.add(str(image))
            return
        try:
            cleaner = await asyncio.wait_for(self._open(), _RECORD_WAIT)
            await asyncio.wait_for(cleaner.record_pulled(str(image)), _RECORD_WAIT)
        except Exception as e:
            self._unsure.add(str(image))
            self._failed("record_pulled", e)
        else:
            self._unsure.discard(str(image))

    def on_pull_result(self, result: PullResult) -> None:
        """Remember our own successful pulls (recorded in the background)."""
        ref = str(result.image)
        self._pulling.discard(ref)
        # Not known to be recorded (no record before the pull, or it was lost since): the
        # image carries a label until the ledger takes the record, whatever happens to us.
        recorded = self._cleaner is not None and ref in self._cleaner.pulled
        unsure = ref in self._unsure or not recorded
        self._unsure.discard(ref)
        if result.ok:
            self._unrecorded.add(ref)
            task = asyncio.create_task(self._record_pending(ref if unsure else None))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _label(self, ref: str) -> None:
        """Label a pull no record owns yet, so that it outlives this process without NATS."""
        labels = self._labels()
        if labels is None:
            return
        self._adopt = True
        try:
            await labels.mark(ref)
        except CriError as e:  # RuntimeUnavailable included
            log.warning("unrecorded pull not labelled", extra={"image": ref, "error": str(e)})

    async def _record_pending(self, unsure: str | None = None) -> None:
        if unsure is not None:
            await self._label(unsure)
        try:
            cleaner = await self._open()
            await self._write_pending(cleaner)
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
            await self._write_pending(cleaner)
        except Exception as e:
            self._failed("cleanup", e)
            return
        in_use = await self._in_use()
        if in_use is None:
            return
        try:
            removals = await cleaner.observe(
                _texts(desired), images, in_use, pulling=frozenset(self._pulling)
            )
        except Exception as e:
            self._failed("cleanup", e)
            return
        self._recovered()
        for removal in removals:
            metrics.IMAGES_REMOVED.labels(removal.outcome).inc()

    async def _write_pending(self, cleaner: Cleaner) -> None:
        """Record the pulls held in memory, then adopt the labelled ones (recorded, unlabelled)."""
        for ref in sorted(self._unrecorded):
            await cleaner.record_pulled(ref)
            self._unrecorded.discard(ref)
        labels = self._labels()
        if labels is None or not self._adopt:
            return
        self._adopt = False
        try:
            names = await labels.marked()
            for name in names:
                await cleaner.record_pulled(name)
                await labels.unmark(name)
        except CriError as e:
            self._adopt = True
            log.warning("unrecorded pulls not adopted yet", extra={"error": str(e)})
            return
        except BaseException:
            # NATS failed midway (the caller logs it): the names still labelled wait for the
            # next pass, not for the next unrecorded pull of this process.
            self._adopt = True
            raise
        if names:
            log.info("unrecorded pulls adopted", extra={"images": names})

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
