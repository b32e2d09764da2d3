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
from collections.abc import Awaitable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ops.lifecycle import cancel_and_wait
from syncer import metrics
from syncer.folding.references import Holding, ImageRef, InvalidImageReference, normalize
from syncer.keeping.cleaner import LOAD_TIMEOUT, ensure_pulled_bucket, record_key
from syncer.keeping.ledger import DEFAULT_TTL, Conflict, NodeLedger
from syncer.runtime.containerd_images import PIN_LABEL, PIN_VALUE, ImageRecord
from syncer.runtime.cri import CriError, RuntimeUnavailable, RuntimeVersion
from wire.directread import read_keys

__all__ = [
    "BUCKET",
    "PINNED_BY_LABEL",
    "ImageLabels",
    "PinLedger",
    "Pinner",
    "PinningSupport",
    "pinning_support",
]

log = logging.getLogger(__name__)

BUCKET = "IMAGE_SYNCER_PINNED"
# Next to the pin label on every name this syncer pinned; the value is its node.
PINNED_BY_LABEL = "image-syncer.octops.io/pinned-by"
# A name no image has: asking for it shows the images service answers (NOT_FOUND is an answer).
_PROBE_NAME = "image-syncer.invalid/probe:pinning"
_DESCRIPTION = "image-syncer: image names each node's syncer pinned itself"
# How long a cancelled pin gets to wind down at stop.
_CANCEL_PATIENCE = 0.5


class ImageLabels(Protocol):
    """What pinning needs of the runtime:
    :class:`syncer.runtime.containerd_images.ContainerdImages`."""

    async def names_of(self, name: str) -> list[ImageRecord]: ...

    async def list(self, *filters: str) -> list[ImageRecord]: ...

    async def set_label(self, name: str, key: str, value: str) -> None: ...

    async def remove_label(self, name: str, key: str) -> None: ...


@dataclass(frozen=True)
class PinningSupport:
    """Whether this node's runtime can be told to pin, and in words why (for logs and status)."""

    enabled: bool
    reason: str

    def describe(self) -> str:
        return self.reason if self.enabled else f"off: {self.reason}"


class _Probe(Protocol):
    async def get(self, name: str) -> ImageRecord | None: ...


async def pinning_support(
    wanted: bool, version: RuntimeVersion | CriError, images: _Probe
) -> PinningSupport:
    """Decide once at start: pin on containerd whose images service answers, else say why not.

    ``version`` is the CRI Version answer, or the error asking for it raised. Raises
    RuntimeUnavailable when containerd's images service cannot be reached: undecided, ask again.
    """
    if not wanted:
        return PinningSupport(False, "disabled by --pin-images=false")
    if isinstance(version, CriError):
        return PinningSupport(False, f"the runtime did not say which it is: {version}")
    runtime = f"{version.name} {version.version}".strip()
    if version.name == "containerd":
        try:
            await images.get(_PROBE_NAME)
        except RuntimeUnavailable:
            raise
        except CriError as e:
            return PinningSupport(False, f"{runtime}: its images service does not answer: {e}")
        return PinningSupport(True, f"{runtime}: label {PIN_LABEL}={PIN_VALUE}")
    if version.name == "cri-o":
        return PinningSupport(
            False,
            f"{runtime} pins by configuration only: roll out `image-syncer crio-pinned-config`",
        )
    return PinningSupport(False, f"{runtime or 'this runtime'} offers no way to pin images")


class _Record(msgspec.Struct):
    ref: str
    names: list[str]
    pinned_at: float


class PinLedger:
    """Which names of which images this node's syncer pinned itself (durable, per node)."""

    def __init__(self, kv: KeyValue, node: str, ledger: NodeLedger) -> None:
        self.kv = kv
        self.node = node
        self.ledger = ledger
        self.names: dict[str, frozenset[str]] = {}  # normalized reference -> names we labelled
        self._revisions: dict[str, int] = {}  # normalized reference -> its record's revision
        self._refreshed_at: float | None = None  # monotonic; None: at the first sync

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        node: str,
        *,
        bucket: str = BUCKET,
        replicas: int = 1,
        ttl: float | None = DEFAULT_TTL,
    ) -> PinLedger:
        kv = await ensure_pulled_bucket(js, bucket, replicas, description=_DESCRIPTION)
        ledger = cls(kv, node, await NodeLedger.bind(js, kv, bucket, ttl))
        await ledger.load()
        return ledger

    async def load(self) -> None:
        # "<node>.*" is exactly this node's keys even when its name has dots (one hash token);
        # read with direct gets (a node may create no watch consumer), failing if it hangs.
        async with asyncio.timeout(LOAD_TIMEOUT):
            found = await read_keys(self.kv._js, self.kv._name, f"{self.node}.*")
        for key, message in found.items():
            self._load(key, message.data, message.seq)

    def _load(self, key: str, value: bytes, revision: int) -> None:
        try:
            record = msgspec.json.decode(value, type=_Record)
            ref = str(normalize(record.ref))
        except (msgspec.DecodeError, InvalidImageReference) as e:
            log.warning("unreadable pin record ignored", extra={"key": key, "error": str(e)})
            return
        self.names[ref] = frozenset(record.names)
        self._revisions[ref] = revision

    def ours(self) -> frozenset[str]:
        """Every name this syncer labelled, whichever reference it was for."""
        return frozenset(name for names in self.names.values() for name in names)

    async def reread(self, ref: str) -> None:
        """Take ``ref``'s record as the bucket holds it now (another pod of this node may have
        written it since we loaded)."""
        stored = await self.ledger.read(record_key(self.node, ref))
        self._revisions[ref] = stored.revision
        if stored.value is None:
            self.names.pop(ref, None)
        else:
            self._load(record_key(self.node, ref), stored.value, stored.revision)

    async def record(self, ref: str, names: Iterable[str]) -> None:
        """Add ``names`` to ``ref``'s record; names another writer recorded stay."""
        names = frozenset(names)
        while True:
            merged = names | self.names.get(ref, frozenset())
            if self.names.get(ref) == merged:
                return
            try:
                await self._write(ref, merged)
            except Conflict:
                await self.reread(ref)
                continue
            return

    async def forget(self, ref: str, names: Iterable[str]) -> None:
        """Drop ``names`` (unlabelled) from ``ref``'s record, the record once none is left."""
        names = frozenset(names)
        key = record_key(self.node, ref)
        while ref in self.names:
            left = self.names[ref] - names
            try:
                if left:
                    await self._write(ref, left)
                else:
                    await self.ledger.delete(key, last=self._revisions.get(ref, 0))
                    del self.names[ref]
            except Conflict:
                await self.reread(ref)
                continue
            return

    async def refresh(self, now: float) -> None:
        """Write every record again (their TTL starts over): at the first sync, then every
        quarter of the TTL; a failure is retried at the next sync."""
        every = self.ledger.refresh_every
        if every is None or (self._refreshed_at is not None and now - self._refreshed_at < every):
            return
        for ref in sorted(self.names):
            names = self.names[ref]
            try:
                await self._write(ref, names)
            except Conflict:
                # Written by another pod since (merge), or expired (an outage longer than the
                # TTL): what we know is written again either way.
                await self.reread(ref)
                await self._write(ref, names | self.names.get(ref, frozenset()))
        self._refreshed_at = now

    async def _write(self, ref: str, names: frozenset[str]) -> None:
        record = _Record(ref=ref, names=sorted(names), pinned_at=time.time())
        self._revisions[ref] = await self.ledger.write(
            record_key(self.node, ref),
            msgspec.json.encode(record),
            last=self._revisions.get(ref, 0),
        )
        self.names[ref] = names


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
