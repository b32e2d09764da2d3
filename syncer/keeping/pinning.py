"""Pin pre-pulled images so the kubelet's image garbage collector leaves them alone.

The kubelet deletes images no container uses once the image filesystem passes its high threshold
(or they outlive ``imageMaximumGCAge``): pre-pulled images are exactly those. It skips images the
runtime reports as pinned (CRI ``Image.pinned``), and containerd pins an image whose record carries
``io.cri-containerd.pinned=pinned``. So, on containerd, every desired image that is present gets
that label on each of its names (tag, repo digest, id), and loses it again once no admitted Fleet
(nor extra image) wants it, and before ``--remove-unused`` removes it.

Pins set by anyone else (containerd pins its sandbox image itself; an operator may pin by hand)
are never removed: the names *this* syncer labelled are recorded in the NATS KV bucket
``IMAGE_SYNCER_PINNED`` (key ``<node>.<sha256 of the normalized reference>``, like the pulled-image
ledger), before the label is set, so a restart forgets nothing, and only recorded names are ever
unlabelled. A name already pinned when first seen, and not in the record as the bucket holds it
now, is someone else's and is left alone, though the image counts as pinned. Two syncer pods of
one node (a DaemonSet rollout) share the record: each re-reads it before deciding and writes it
compare-and-set, merging names (:mod:`syncer.keeping.ledger`), so neither erases the other's names;
and records carry a TTL the live node renews, so a gone node's expire.

A record can expire under a node that still exists: one down (or cut off from NATS) for longer
than ``--ledger-ttl``. Its pins must not then stay for good, unowned. So each name this syncer
pins also gets ``image-syncer.octops.io/pinned-by=<node>``, and when the ledger is opened, a name
carrying both labels that no record of the node names is released (both labels removed, one log
line); the next reconcile pins again, with a fresh record, whatever is still wanted.

Pinning is a safety net, never a reason to stop pulling: a NATS or containerd failure is one log
line per outage and a metric, and the work is retried at the next reconcile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Collection, Mapping

import grpc
from nats.js import JetStreamContext

from ops.lifecycle import cancel_and_wait
from syncer import metrics
from syncer.folding.references import Holding, ImageRef, normalize
from syncer.keeping.ledger import DEFAULT_TTL
from syncer.keeping.pinledger import BUCKET, PinLedger
from syncer.keeping.pinsupport import ImageLabels
from syncer.runtime.containerd_images import PIN_LABEL, PIN_VALUE, ImageRecord
from syncer.runtime.cri import CriError

__all__ = ["PINNED_BY_LABEL", "Pinner"]

log = logging.getLogger(__name__)

# Next to the pin label on every name this syncer pinned; the value is its node.
PINNED_BY_LABEL = "image-syncer.octops.io/pinned-by"
# How long a cancelled pin gets to wind down at stop.
_CANCEL_PATIENCE = 0.5


class Pinner:
    """Keeps the pin label on the desired images that are present, and only on those it set."""

    def __init__(
        self,
        images: ImageLabels,
        js: JetStreamContext,
        node: str,
        *,
        bucket: str = BUCKET,
        replicas: int = 1,
        ttl: float | None = DEFAULT_TTL,
    ) -> None:
        self._images = images
        self._ttl = ttl
        self._js = js
        self._node = node
        self._bucket = bucket
        self._replicas = replicas
        self._ledger: PinLedger | None = None
        self._lock = asyncio.Lock()  # pulls finishing and reconciles must not interleave
        # Desired images known to be pinned (by us or by someone else) since last seen present.
        self._verified: set[ImageRef] = set()
        self._failing = False
        self._pending: dict[ImageRef, asyncio.Task[None]] = {}  # pins of finished pulls

    def _forget_task(self, image: ImageRef, task: asyncio.Task[None]) -> None:
        if self._pending.get(image) is task:
            del self._pending[image]

    def pinned(self, wanted: Collection[ImageRef]) -> int:
        """How many of ``wanted`` are pinned, as far as this syncer knows."""
        return sum(1 for image in wanted if image in self._verified)

    def on_pulled(self, image: ImageRef) -> None:
        """Pin right after a successful pull (in the background: pulls never wait for it)."""
        self._verified.discard(image)
        task = asyncio.create_task(self._guarded(self._pin_one(image)), name=f"pin {image}")
        self._pending[image] = task
        task.add_done_callback(lambda done: self._forget_task(image, done))

    async def sync(
        self,
        wanted: Collection[ImageRef],
        present: Holding,
        ids: Mapping[ImageRef, str] | None = None,
    ) -> None:
        """After each ListImages: unpin what is no longer wanted, pin what is and lacks it.
        ``ids``: the image id each tag names in that listing, to notice a tag that moved."""
        await self._guarded(self._sync(wanted, present, ids or {}))

    async def release(self, ref: str) -> None:
        """Unpin ``ref`` before it is removed; raises (so the removal waits) when that fails."""
        image = normalize(ref)
        async with self._lock:
            ledger = await self._open()
            await self._unpin(ledger, str(image))
            self._verified.discard(image)

    async def close(self, patience: float) -> list[ImageRef]:
        """Let the pins of finished pulls run for ``patience`` seconds, then cancel them (NATS
        may be down: each would wait for its ledger write in turn). Returns the images left
        unpinned; the next start pins them, since they are desired and present."""
        pending = {task: image for image, task in self._pending.items() if not task.done()}
        if pending and patience > 0:
            await asyncio.wait(pending, timeout=patience)
        late = [task for task in pending if not task.done()]
        await cancel_and_wait(late, patience=_CANCEL_PATIENCE)
        return sorted(pending[task] for task in late)

    async def _sync(
        self, wanted: Collection[ImageRef], present: Holding, ids: Mapping[ImageRef, str]
    ) -> None:
        async with self._lock:
            ledger = await self._open()
            await ledger.refresh(time.monotonic())
            wanted_text = {str(image) for image in wanted}
            for ref in sorted(set(ledger.names) - wanted_text):
                await self._unpin(ledger, ref)
            self._verified &= set(wanted)
            # A tag moved to new content (a kubelet's pull, a re-push): pin again, which moves
            # the pin from the old content's names to the new one's.
            self._verified -= {i for i in self._verified if _moved(ledger, i, ids)}
            for image in sorted(wanted):
                if image not in present:
                    # Gone (GC, an operator): when it is back its new records need the label.
                    self._verified.discard(image)
                elif image not in self._verified:
                    await self._pin(ledger, image)

    async def _pin_one(self, image: ImageRef) -> None:
        async with self._lock:
            await self._pin(await self._open(), image)

    async def _pin(self, ledger: PinLedger, image: ImageRef) -> None:
        records = await self._images.names_of(image.stored_name)
        if not records:
            return  # not there (yet, or any more): the next reconcile looks again
        ref = str(image)
        # As the bucket holds it now: a name another pod of this node pinned (recorded first)
        # is ours, not someone else's.
        await ledger.reread(ref)
        ours = ledger.ours()
        # A name pinned before we ever labelled it is someone else's pin: never ours to remove.
        mine = {r.name for r in records if not r.pinned or r.name in ours}
        if mine:
            await ledger.record(ref, mine | ledger.names.get(ref, frozenset()))
        labelled = 0
        for record in records:
            if record.name in mine and not record.pinned:
                try:
                    # The owner first: a pin label never stands without it.
                    await self._images.set_label(record.name, PINNED_BY_LABEL, self._node)
                    await self._images.set_label(record.name, PIN_LABEL, PIN_VALUE)
                except CriError as e:
                    if e.code is not grpc.StatusCode.NOT_FOUND:
                        raise
                    return  # removed meanwhile: the next reconcile looks again
                labelled += 1
        await self._release_stale(ledger, ref, {r.name for r in records})
        self._verified.add(image)
        if labelled:
            metrics.PINS.labels("pinned").inc()
            log.info("image pinned", extra={"image": ref, "names": labelled})
        elif not mine:
            log.info("image already pinned by someone else, left as it is", extra={"image": ref})

    async def _release_stale(self, ledger: PinLedger, ref: str, current: set[str]) -> None:
        """Unpin the names ``ref`` no longer has (its tag moved to new content): the old
        content's digest name and id, which nothing else of ours wants, would stay pinned
        until the Fleet goes, out of the kubelet GC's reach."""
        stale = ledger.names.get(ref, frozenset()) - current
        if not stale:
            return
        others = {n for other, ns in ledger.names.items() if other != ref for n in ns}
        for name in sorted(stale - others):
            await self._images.remove_label(name, PIN_LABEL)
            await self._images.remove_label(name, PINNED_BY_LABEL)
        # Out of the record (compare-and-set, like every ledger write); gone if none is left.
        await ledger.forget(ref, stale)
        metrics.PINS.labels("unpinned").inc()
        log.info("image tag moved, old content unpinned", extra={"image": ref, "names": len(stale)})

    async def _unpin(self, ledger: PinLedger, ref: str) -> None:
        await ledger.reread(ref)  # names another pod of this node added since we loaded
        names = ledger.names.get(ref)
        if names is None:
            return
        # Another wanted reference of ours may name the same image (a tag and its digest).
        still_needed = {n for other, ns in ledger.names.items() if other != ref for n in ns}
        for name in sorted(names - still_needed):
            await self._images.remove_label(name, PIN_LABEL)
            await self._images.remove_label(name, PINNED_BY_LABEL)
        await ledger.forget(ref, names)
        metrics.PINS.labels("unpinned").inc()
        log.info("image unpinned", extra={"image": ref})

    async def _open(self) -> PinLedger:
        if self._ledger is None:
            # Listed before the ledger is read: a name another pod of this node pins meanwhile
            # was recorded before it was labelled, so the ledger read after names it.
            marked = [
                r
                for r in await self._images.list(f'labels."{PINNED_BY_LABEL}"')
                if r.labels.get(PINNED_BY_LABEL) == self._node
            ]
            ledger = await PinLedger.open(
                self._js, self._node, bucket=self._bucket, replicas=self._replicas, ttl=self._ttl
            )
            await self._release_unrecorded(ledger, marked)
            self._ledger = ledger
            log.info(
                "image pinning enabled",
                extra={"bucket": self._bucket, "recorded": len(self._ledger.names)},
            )
        return self._ledger

    async def _release_unrecorded(self, ledger: PinLedger, marked: list[ImageRecord]) -> None:
        """Unpin names of ours whose record expired (the node was away longer than the TTL)."""
        ours = ledger.ours()
        orphans = sorted(r.name for r in marked if r.pinned and r.name not in ours)
        for name in orphans:
            await self._images.remove_label(name, PIN_LABEL)
            await self._images.remove_label(name, PINNED_BY_LABEL)
        if orphans:
            metrics.PINS.labels("unpinned").inc(len(orphans))
            log.warning(
                "pins released: their records expired, pinned again if still wanted",
                extra={"names": orphans},
            )

    async def _guarded(self, work: Awaitable[None]) -> None:
        try:
            await work
        except CriError as e:
            self._failed("containerd", e)
            return
        except Exception as e:  # NATS: the ledger could not be read or written
            self._failed("ledger", e)
            return
        if self._failing:
            self._failing = False
            log.info("image pinning recovered")

    def _failed(self, op: str, error: Exception) -> None:
        metrics.PIN_ERRORS.labels(op).inc()
        if not self._failing:
            self._failing = True
            text = str(error) if isinstance(error, CriError) else repr(error)
            log.warning(
                "image pinning failed, retrying at the next reconcile",
                extra={"op": op, "error": text},
            )


def _moved(ledger: PinLedger, image: ImageRef, ids: Mapping[ImageRef, str]) -> bool:
    """Whether the tag ``image`` names content other than the one we pinned for it."""
    if image.digest:
        return False  # a digest cannot move
    current = ids.get(image)
    names = ledger.names.get(str(image))
    return bool(current and names and current not in names)
