"""Writing one node's records in a per-node ledger (pulled images, pins): never losing another
writer's, and never outliving the node.

Two writers per node. During a DaemonSet rollout the old and the new syncer pod of one node run
side by side, each with the records it loaded in memory. A blind ``put`` or ``delete`` from one
would erase what the other wrote since: a pin with no record stays forever (kubelet GC skips it,
``--remove-unused`` never removes it). So every write here is compare-and-set on the key's
revision (``Nats-Expected-Last-Subject-Sequence``): it lands only on the revision the writer read,
and a :class:`Conflict` makes the writer read again and merge.

A lifetime tied to the node's. Every record, delete markers included, carries a per-message TTL
(``--ledger-ttl``, default ``720h``), and the live node writes its records again well before that
(every quarter of it, and at each start): the records of a node that is gone expire with it,
autoscaling leaves nothing behind, and a live node's records outlive any NATS outage shorter than
three quarters of the TTL (after a longer one it writes them again from memory as soon as NATS
answers). A bucket created without per-message TTLs (before this) keeps records without one: one
warning, and it works as before.

Reads that are not behind. Reads are direct gets, and any replica answers those, also one that
has not caught up yet (a server back from a partition): a stale answer would say a record deleted
since still exists, or miss one written since. Writes go to the stream leader only, and its answer
says how far the stream is: a load (:meth:`NodeLedger.load`) first writes the node's fence key and
takes only a reading that holds that write; a read after a :class:`Conflict` takes only an answer
at least as new as the revision the leader named. A replica still behind is asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from syncer.folding.references import normalize
from wire.directread import DirectMessage, read_keys
from wire.kvbuckets import bind_bucket, ttl_bucket_config

__all__ = [
    "DEFAULT_TTL",
    "FENCE",
    "LOAD_TIMEOUT",
    "Conflict",
    "NodeLedger",
    "StaleRead",
    "Stored",
    "ensure_ledger_bucket",
    "record_key",
]

log = logging.getLogger(__name__)

DEFAULT_TTL = 30 * 24 * 3600.0
# Loading one node's records (pulled images, pins) takes well under this, a replica behind
# the leader waited for included.
LOAD_TIMEOUT = 30.0
# NATS' "wrong last sequence": the key was written since the writer read it.
_WRONG_LAST_SEQUENCE = (10071, 10164)
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
# The leader's refusal names the key's revision: "wrong last sequence: 42" (10164 names none).
_LEADERS_REVISION = re.compile(r"wrong last sequence: (\d+)")
# The key ``<node>.<FENCE>`` of every per-node ledger: written before each load (no record).
FENCE = "fence"
# A replica behind the leader is asked again after this long, a single key this many times.
_BEHIND_PAUSE = 0.1
_BEHIND_TRIES = 20


def record_key(node: str, ref: str) -> str:
    """``<node>.<sha256 of the normalized reference>``; the node name may contain dots."""
    return f"{node}.{hashlib.sha256(str(normalize(ref)).encode()).hexdigest()}"


async def ensure_ledger_bucket(
    js: JetStreamContext, bucket: str, replicas: int = 1, *, description: str
) -> KeyValue:
    """A per-node ledger's bucket: created by the broadcaster at install
    (``wire.permissions.install_buckets``); bound here, created only where no auth forbids it.
    Its keys may carry a TTL."""
    return await bind_bucket(js, ttl_bucket_config(bucket, description, replicas))


class Conflict(Exception):
    """The key was written since the writer read it: read again, merge, write again.
    ``last``: the key's revision as the stream leader holds it (0 when it did not say)."""

    def __init__(self, message: str, last: int = 0) -> None:
        super().__init__(message)
        self.last = last


class StaleRead(Exception):
    """Every answer came from a replica that has not caught up with the stream leader yet."""


@dataclass(frozen=True)
class Stored:
    """A key as the bucket holds it: its value (None: no record) and the revision to write on."""

    value: bytes | None
    revision: int


class NodeLedger:
    """Compare-and-set writes with a TTL to keys of one KV bucket."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, ttl: float | None) -> None:
        self._js = js
        self._kv = kv
        self._bucket = bucket
        self.ttl = ttl

    @classmethod
    async def bind(
        cls, js: JetStreamContext, kv: KeyValue, bucket: str, ttl: float | None
    ) -> NodeLedger:
        """TTLs only where the bucket allows them (buckets made before it do not)."""
        if ttl:
            info = await js.stream_info(f"KV_{bucket}")
            if not info.config.allow_msg_ttl:
                log.warning(
                    "ledger records never expire: the bucket allows no per-message TTL",
                    extra={"bucket": bucket},
                )
                ttl = None
        return cls(js, kv, bucket, ttl)

    @property
    def refresh_every(self) -> float | None:
        """How often a live node writes its records again (None: they never expire)."""
        return self.ttl / 4 if self.ttl else None

    async def read(self, key: str, *, at_least: int = 0) -> Stored:
        """The key as a replica holds it; with ``at_least`` (a :class:`Conflict`'s ``last``)
        only an answer that new, else :class:`StaleRead`."""
        for _ in range(_BEHIND_TRIES):
            stored = await self._read_once(key)
            if stored.revision >= at_least:
                return stored
            await asyncio.sleep(_BEHIND_PAUSE)
        raise StaleRead(f"{key}: every answer older than revision {at_least}")

    async def _read_once(self, key: str) -> Stored:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError as e:
            # Deleted: the marker's revision is what the next write must name.
            marker = getattr(e, "entry", None)
            return Stored(None, (marker.revision or 0) if marker is not None else 0)
        return Stored(entry.value or b"", entry.revision or 0)

    async def load(self, node: str) -> dict[str, DirectMessage]:
        """Every record of ``node`` (key -> message) as of now: the fence written first, then
        read until the replica that answers holds it. Waits while only replicas behind answer
        (the caller bounds it); fails like a write when the leader cannot take the fence."""
        fence_key = f"{node}.{FENCE}"
        fence = await self._publish(fence_key, b"", {})
        behind = False
        while True:
            found = await read_keys(self._js, self._bucket, f"{node}.*")
            seen = found.pop(fence_key, None)
            if seen is not None and seen.seq >= fence:
                return found
            if not behind:
                behind = True
                log.info(
                    "ledger answered by a replica behind the leader, asking again",
                    extra={"bucket": self._bucket, "fence": fence},
                )
            await asyncio.sleep(_BEHIND_PAUSE)

    async def write(self, key: str, value: bytes, *, last: int) -> int:
        """Store ``value`` if ``last`` is still the key's revision; the new revision."""
        return await self._publish(key, value, {_EXPECTED_LAST: str(last)})

    async def delete(self, key: str, *, last: int) -> int:
        """Delete the record if ``last`` is still its revision; the marker expires too."""
        return await self._publish(key, b"", {_EXPECTED_LAST: str(last), "KV-Operation": "DEL"})

    async def _publish(self, key: str, value: bytes, headers: dict[str, str]) -> int:
        try:
            ack = await self._js.publish(
                f"$KV.{self._bucket}.{key}", value, headers=headers, msg_ttl=self._ttl()
            )
        except nats.js.errors.APIError as e:
            if e.err_code in _WRONG_LAST_SEQUENCE:
                named = _LEADERS_REVISION.search(e.description or "")
                last = int(named.group(1)) if named else 0
                raise Conflict(f"{key}: written since it was read", last) from e
            raise
        return ack.seq

    def _ttl(self) -> float | None:
        # Per-message TTLs are whole seconds, at least one.
        return float(max(1, round(self.ttl))) if self.ttl else None
