"""Remove images no live Fleet needs any more, but only those the syncer pulled itself.

Pre-pulling every Fleet's images onto every node fills disks as Fleets come and go. With
``--remove-unused`` the syncer gives back what it took: an image it pulled, that no live Fleet
references, is removed through CRI ``RemoveImage`` once it has been unused for ``--remove-grace``
(default ``10m``), because game servers of a deleted Fleet may still be Terminating and a Fleet
deleted by mistake is often re-created within minutes (which cancels the removal).

What the syncer pulled is recorded durably in the NATS KV bucket ``IMAGE_SYNCER_PULLED``, key
``<node>.<sha256 of the normalized reference>``, so a restart does not forget it, and images put
on the node by anyone else (the kubelet, an operator, a system DaemonSet) are never touched.
Records are written compare-and-set and with a TTL the live node keeps renewing
(:mod:`syncer.keeping.ledger`): a second syncer pod on the node cannot erase them, a gone node's
expire. Removing by reference drops every name of that image in containerd, so an image still
reachable from a live Fleet under another name is kept too. A removal the runtime refuses (CRI-O
refuses images in use; containerd does not check, hence ``in_use``, which the syncer fills from CRI
ListContainers on every runtime) is logged and retried next cycle.

The grace clock is in memory: after a restart it starts again, which only ever delays removal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from syncer.folding.references import ImageRef, InvalidImageReference, normalize
from syncer.keeping.ledger import (
    DEFAULT_TTL,
    LOAD_TIMEOUT,
    Conflict,
    NodeLedger,
    Stored,
    ensure_ledger_bucket,
    record_key,
)
from syncer.keeping.listing import (
    RuntimeImageLike,
    busy_ids,
    image_index,
    key_of,
    unowned,
    wanted_in,
)
from syncer.runtime.cri import CriError

__all__ = ["BUCKET", "RELOAD_EVERY", "Cleaner", "Removal"]

log = logging.getLogger(__name__)

BUCKET = "IMAGE_SYNCER_PULLED"
DEFAULT_GRACE = 600.0
# How often an unwanted image on the node that no record we know of owns makes us read the node's
# records again anyway (see Cleaner._catch_up); such images are always there (the kubelet's pause
# image), so this is what an idle node pays: one fence write and one batched read per period.
RELOAD_EVERY = 1800.0
_DESCRIPTION = "image-syncer: images each node's syncer pulled itself"

Remover = Callable[[str], Awaitable[None]]


class _Record(msgspec.Struct):
    ref: str
    pulled_at: float


@dataclass(frozen=True)
class Removal:
    """What one cleanup cycle did about one recorded image."""

    ref: str
    outcome: Literal["removed", "refused", "gone"]
    detail: str = ""


class Cleaner:
    """Per-node bookkeeping of pulled images and the grace timers of unused ones."""

    def __init__(
        self,
        kv: KeyValue,
        node: str,
        remover: Remover,
        *,
        ledger: NodeLedger,
        grace: float = DEFAULT_GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.ledger = ledger
        self.node = node
        self.remover = remover
        self.grace = grace
        self.clock = clock
        self._pulled: dict[str, ImageRef] = {}  # normalized text -> ref
        self._stored: dict[str, Stored] = {}  # normalized text -> its record, as last written
        self._refreshed_at: float | None = None  # None: at the first cycle
        self._unused_since: dict[str, float] = {}
        # Which observe() cycle was the latest begun when each record was made (-1: loaded at
        # start). A listing is taken after the previous cycle began, so a record made since then
        # may be of a pull that finished after the listing: absent from it, yet on the node.
        self._cycle = 0
        self._recorded_in: dict[str, int] = {}
        # Image ids on the node, unwanted, that no record we know of owns, as of the last time
        # the node's records were read in whole, and when that was (None: never since start).
        self._checked: set[str] = set()
        self._reloaded_at: float | None = None

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        node: str,
        remover: Remover,
        *,
        grace: float = DEFAULT_GRACE,
        clock: Callable[[], float] = time.monotonic,
        bucket: str = BUCKET,
        replicas: int = 1,
        ttl: float | None = DEFAULT_TTL,
    ) -> Cleaner:
        """Bind the bucket and load this node's records (they survive restarts)."""
        kv = await ensure_ledger_bucket(js, bucket, replicas, description=_DESCRIPTION)
        cleaner = cls(
            kv,
            node,
            remover,
            ledger=await NodeLedger.bind(js, kv, bucket, ttl),
            grace=grace,
            clock=clock,
        )
        await cleaner.load()
        return cleaner

    @property
    def pulled(self) -> frozenset[str]:
        """Normalized references this node's syncer pulled and has not removed."""
        return frozenset(self._pulled)

    async def load(self) -> None:
        # "<node>.*" (one token: the hash) is exactly this node's records, even when the node
        # name has dots, as of the load (never a replica's older copy: a record it missed would
        # leave its image on the node for good). A load that hangs (the NATS connection lost
        # mid-way, no replica caught up) fails instead, and is tried again.
        async with asyncio.timeout(LOAD_TIMEOUT):
            found = await self.ledger.load(self.node)
        for key, message in found.items():
            self._load_record(key, message.data, message.seq)

    def _load_record(self, key: str, value: bytes, revision: int) -> str | None:
        """Take a record as ours; its normalized reference, or None (unreadable, logged)."""
        try:
            ref = normalize(msgspec.json.decode(value, type=_Record).ref)
        except (msgspec.DecodeError, InvalidImageReference) as e:
            log.warning(
                "unreadable pulled-image record ignored", extra={"key": key, "error": str(e)}
            )
            return None
        self._pulled[str(ref)] = ref
        self._stored[str(ref)] = Stored(value, revision)
        return str(ref)

    async def _catch_up(self, foreign: set[str], now: float) -> None:
        """Read the node's records again when an unwanted image no record we know of owns is
        new since the last read, or that read is ``RELOAD_EVERY`` old; take the new ones.

        The node's other syncer pod (a DaemonSet rollout runs both for a moment) writes its
        records to the bucket, never to our memory: an image it pulled after our load looks like
        nobody's here and, once unwanted and that pod gone, would stay on the node for good.
        Such an image turns up when the desired set drops it (a Fleet rolled or went), so a read
        is due when one is new to the set, not every pass: an idle node's unwanted images (the
        kubelet's pause, an operator's) stay the same, and it reads nothing. ``RELOAD_EVERY``
        covers a record written after that read (NATS was slow at the other pod's pull). The
        read is the fenced load (never a replica behind); a failure leaves it due next pass."""
        self._checked &= foreign  # one that left (wanted again, removed) is new when back
        stale = self._reloaded_at is None or now - self._reloaded_at >= RELOAD_EVERY
        if not foreign - self._checked and not (foreign and stale):
            return
        async with asyncio.timeout(LOAD_TIMEOUT):
            found = await self.ledger.load(self.node)
        known = {record_key(self.node, text) for text in self._pulled}
        taken = []
        for key, message in found.items():
            if key not in known and (text := self._load_record(key, message.data, message.seq)):
                taken.append(text)
                # Maybe a pull of the other pod's that ended after this pass's listing.
                self._recorded_in[text] = self._cycle
        self._checked, self._reloaded_at = foreign, now
        if taken:
            log.info("records another pod of this node wrote taken", extra={"images": taken})

    async def record_pulled(self, ref: str) -> None:
        """Call after the syncer's own successful PullImage of ``ref`` (and before it)."""
        image = normalize(ref)
        text = str(image)
        # Even when known (recorded before the pull): the pull just ended, after any listing.
        self._recorded_in[text] = self._cycle
        # Written even when known: another syncer pod of this node may have deleted it since.
        await self._write(text)
        self._pulled[text] = image

    async def _write(self, text: str) -> None:
        """Store our record of ``text`` (again); one someone else wrote since is kept as it is."""
        key = record_key(self.node, text)
        stored = self._stored.get(text)
        value = stored.value if stored and stored.value else _encode(text)
        last = stored.revision if stored else (await self.ledger.read(key)).revision
        try:
            revision = await self.ledger.write(key, value, last=last)
        except Conflict as e:
            # As new as the leader's revision: a replica behind would show a record deleted
            # since, and ours would never be written again.
            current = await self.ledger.read(key, at_least=e.last)
            if current.value is None:  # deleted since (the other pod removed the image)
                revision = await self.ledger.write(key, value, last=current.revision)
            else:
                value, revision = current.value, current.revision
                # Maybe a pull of the other pod's that ended after our last listing.
                self._recorded_in[text] = self._cycle
        self._stored[text] = Stored(value, revision)

    async def _refresh(self) -> None:
        """Write every record again (their TTL starts over): at the first cycle, then every
        quarter of the TTL; a failure is retried at the next cycle."""
        every = self.ledger.refresh_every
        now = self.clock()
        if every is None or (self._refreshed_at is not None and now - self._refreshed_at < every):
            return
        for text in sorted(self._pulled):
            await self._write(text)
        self._refreshed_at = now

    async def observe(
        self,
        desired: Iterable[str] | Callable[[], Iterable[str]],
        images: Iterable[RuntimeImageLike],
        in_use: Collection[str] = (),
        *,
        pulling: Collection[str] = (),
    ) -> list[Removal]:
        """One cleanup cycle: ``desired`` refs of live Fleets, ``images`` from one ListImages,
        ``in_use`` the images containers still use: ids or references (an image is in use when
        its id or any of its names matches one), ``pulling`` the normalized refs being pulled
        (recorded before their pull, absent until it ends: never "gone"). Returns what it did.

        ``desired`` may be a function returning the refs: it is then asked again right before
        each removal, so a Fleet folded while the cycle ran (it awaits NATS and the runtime)
        keeps its image."""
        await self._refresh()
        now = self.clock()
        self._cycle += 1
        images = list(images)
        owner = image_index(images)
        busy = busy_ids(images, owner, in_use)
        current = desired if callable(desired) else _fixed(list(desired))
        wanted, kept_ids = wanted_in(current(), owner)
        await self._catch_up(unowned(images, owner, kept_ids, self._pulled.values()), now)
        done: list[Removal] = []
        for text, ref in sorted(self._pulled.items()):
            image_id = owner.get(key_of(ref))
            if key_of(ref) in wanted or (image_id is not None and image_id in kept_ids):
                self._cancel(text)
            elif image_id is None:
                if text in pulling or self._recorded_in.get(text, -1) >= self._cycle - 1:
                    # Pulled after this listing may have been taken: the next one tells.
                    continue
                # Removed by someone else already: nothing left to give back.
                if await self._forget(text):
                    done.append(Removal(text, "gone"))
            elif self._due(text, now):
                # The desired set as it is now, with no await before the removal starts.
                wanted, kept_ids = wanted_in(current(), owner)
                if key_of(ref) in wanted or image_id in kept_ids:
                    self._cancel(text)
                    continue
                removal = await self._remove(text, image_id in busy)
                if removal is not None:
                    done.append(removal)
        return done

    def _cancel(self, text: str) -> None:
        if self._unused_since.pop(text, None) is not None:
            log.info("image removal cancelled, a fleet uses it again", extra={"image": text})

    def _due(self, text: str, now: float) -> bool:
        since = self._unused_since.get(text)
        if since is None:
            self._unused_since[text] = since = now
            log.info("image unused, removal scheduled", extra={"image": text, "grace": self.grace})
        return now - since >= self.grace

    async def _remove(self, text: str, in_use: bool) -> Removal | None:
        if in_use:
            log.info("image removal deferred, a container uses it", extra={"image": text})
            return Removal(text, "refused", "in use by a container")
        try:
            await self.remover(text)
        except CriError as e:
            log.warning(
                "image removal refused, retrying next cycle",
                extra={"image": text, "error": str(e)},
            )
            return Removal(text, "refused", str(e))
        await self._forget(text)
        log.info("unused image removed", extra={"image": text})
        return Removal(text, "removed")

    async def _forget(self, text: str) -> bool:
        """Delete our record of ``text``; False when it was written again since (kept)."""
        key = record_key(self.node, text)
        stored = self._stored.get(text)
        last = stored.revision if stored else (await self.ledger.read(key)).revision
        try:
            await self.ledger.delete(key, last=last)
        except Conflict as e:
            current = await self.ledger.read(key, at_least=e.last)
            if current.value is not None:
                # Written again since (the other syncer pod pulled it): its record stays.
                self._stored[text] = current
                self._recorded_in[text] = self._cycle
                self._unused_since.pop(text, None)
                return False
        self._stored.pop(text, None)
        self._pulled.pop(text, None)
        self._unused_since.pop(text, None)
        self._recorded_in.pop(text, None)
        return True


def _fixed(refs: list[str]) -> Callable[[], list[str]]:
    return lambda: refs


def _encode(text: str) -> bytes:
    return msgspec.json.encode(_Record(ref=text, pulled_at=time.time()))
