"""The pin ledger: which names of which images this node's syncer pinned itself.

Kept in the NATS KV bucket ``IMAGE_SYNCER_PINNED`` (key ``<node>.<sha256 of the normalized
reference>``), written compare-and-set with a TTL the live node renews
(:mod:`syncer.keeping.ledger`), so two pods of one node merge their names and a gone node's
records expire. Only names recorded here are ever unpinned (:mod:`syncer.keeping.pinning`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from syncer.folding.references import InvalidImageReference, normalize
from syncer.keeping.ledger import (
    DEFAULT_TTL,
    LOAD_TIMEOUT,
    Conflict,
    NodeLedger,
    ensure_ledger_bucket,
    record_key,
)

__all__ = ["BUCKET", "PinLedger"]

log = logging.getLogger(__name__)

BUCKET = "IMAGE_SYNCER_PINNED"
_DESCRIPTION = "image-syncer: image names each node's syncer pinned itself"


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
        kv = await ensure_ledger_bucket(js, bucket, replicas, description=_DESCRIPTION)
        ledger = cls(kv, node, await NodeLedger.bind(js, kv, bucket, ttl))
        await ledger.load()
        return ledger

    async def load(self) -> None:
        # "<node>.*" is exactly this node's keys even when its name has dots (one hash token),
        # as of the load (never a replica's older copy), failing if it hangs.
        async with asyncio.timeout(LOAD_TIMEOUT):
            found = await self.ledger.load(self.node)
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

    async def reread(self, ref: str, at_least: int = 0) -> None:
        """Take ``ref``'s record as the bucket holds it now (another pod of this node may have
        written it since we loaded); ``at_least``: a :class:`Conflict`'s revision."""
        stored = await self.ledger.read(record_key(self.node, ref), at_least=at_least)
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
            except Conflict as e:
                await self.reread(ref, e.last)
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
            except Conflict as e:
                await self.reread(ref, e.last)
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
            except Conflict as e:
                # Written by another pod since (merge), or expired (an outage longer than the
                # TTL): what we know is written again either way.
                await self.reread(ref, e.last)
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
