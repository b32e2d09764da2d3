"""One active broadcaster among several replicas: a lease held in a NATS KV bucket.

Two broadcasters publishing at once cannot move the log backwards (every publish is conditioned
on the object's newest message, see :mod:`broadcaster.forwarding`), but both would load the API
server with watches and race each other's publishes. So with ``--ha`` only the holder of a lease
watches and publishes; the others stand by, ready, and take over when the holder stops renewing.
The lease is about load and speed of takeover, not correctness: a holder that does not know yet
that it lost the lease is fenced by the log itself.

The lease is one key (``broadcaster.<prefix>``) in the bucket ``IMAGE_SYNCER_LEASE`` (suffixed
for other prefixes, as :func:`wire.permissions.bucket_for` says, which is also what the
broadcaster's NATS user may touch). The bucket's max age is the lease TTL, so the server itself
expires the key of a holder that died: no clocks are compared between machines.

- acquire: ``create`` (only succeeds when the key is absent, expired or deleted);
- renew: ``update`` against the revision this replica last wrote, every ttl/3; a revision
  mismatch means someone else holds it now: the lease is lost;
- a holder that cannot renew for 2/3 of the ttl (NATS unreachable) steps down by itself, before
  the key can expire and a standby take over, so two actives do not overlap in practice;
- a clean stop deletes the key (guarded by the revision), so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from prometheus_client import Gauge

from ops.logs import describe_error
from wire.natsconn import RETRYABLE
from wire.permissions import LEASE_BUCKET, bucket_for

__all__ = ["LEADER", "Lease", "lease_key"]

log = logging.getLogger(__name__)

LEADER = Gauge(
    "image_syncer_broadcaster_leader",
    "1 while this replica holds the lease and broadcasts, 0 while it stands by.",
)


def lease_key(prefix: str) -> str:
    return f"broadcaster.{prefix}"


class Lease:
    def __init__(
        self, js: JetStreamContext, prefix: str, identity: str, ttl: float, replicas: int = 1
    ) -> None:
        self.js, self.identity, self.ttl, self.replicas = js, identity, ttl, replicas
        self.bucket = bucket_for(LEASE_BUCKET, prefix)
        self.key = lease_key(prefix)
        self._kv: KeyValue | None = None
        self._revision = 0

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    async def open(self) -> None:
        """Bind to the bucket, creating it with max age = ttl if it does not exist yet.

        Called by the first operation that needs the bucket; call it to fail (or adopt the
        bucket's ttl) early.
        """
        try:
            self._kv = await self.js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(
                bucket=self.bucket,
                description="image-syncer: which broadcaster replica is active",
                history=1,
                ttl=self.ttl,
                storage=StorageType.FILE,
                replicas=self.replicas,
            )
            self._kv = await self.js.create_key_value(config)
        ttl = (await self._kv.status()).ttl
        if ttl and abs(ttl - self.ttl) > 1e-3:
            # The bucket's max age is what expires a dead holder: it, not our flag, is the TTL.
            log.warning(
                "lease bucket has another ttl; using it",
                extra={"bucket": self.bucket, "bucket_ttl": ttl, "lease_ttl": self.ttl},
            )
            self.ttl = ttl

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; False if someone does."""
        try:
            self._revision = await (await self._bucket()).create(self.key, self._value())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except nats.js.errors.KeyNotFoundError:
            # nats-py's create, refused because the key exists, reads it to see whether it is a
            # delete marker; the holder's key expiring between the two makes that read fail.
            # Nobody holds it now: the next attempt takes it.
            return False
        return True

    async def renew(self) -> bool:
        """Extend the lease; False if another replica holds it (or it expired meanwhile)."""
        try:
            self._revision = await asyncio.wait_for(
                (await self._bucket()).update(self.key, self._value(), last=self._revision),
                timeout=self.renew_every,
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def holder(self) -> str:
        """Who holds the lease now, for logs; empty when nobody does or it cannot be read."""
        with contextlib.suppress(*RETRYABLE):
            entry = await (await self._bucket()).get(self.key)
            return str(json.loads(entry.value or b"{}").get("identity", ""))
        return ""

    async def release(self) -> None:
        """Give the lease up (best effort) so a standby need not wait for it to expire."""
        if not self._revision:
            return
        with contextlib.suppress(*RETRYABLE):
            await asyncio.wait_for(
                (await self._bucket()).delete(self.key, last=self._revision), 2.0
            )
        self._revision = 0

    async def acquire(self, retry_every: float | None = None) -> None:
        """Return once this replica holds the lease (polling; transient errors retried)."""
        period = retry_every or min(1.0, self.renew_every)
        announced = False
        while True:
            try:
                if await self.try_acquire():
                    return
                if not announced:
                    announced = True
                    log.info(
                        "standing by",
                        extra={"identity": self.identity, "holder": await self.holder()},
                    )
            except RETRYABLE as e:
                log.warning("cannot reach the lease, retrying", extra={"error": describe_error(e)})
            await asyncio.sleep(period)

    async def hold(self) -> str:
        """Renew until the lease is lost; return why. Cancel it to stop holding."""
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.renew_every)
            attempt = time.monotonic()
            try:
                if not await self.renew():
                    self._revision = 0
                    return f"taken over by {await self.holder() or 'nobody (expired)'}"
                last_ok = attempt
            except RETRYABLE as e:
                if time.monotonic() - last_ok >= self.ttl * 2 / 3:
                    self._revision = 0
                    return f"cannot renew: {describe_error(e)}"
                log.warning("lease renewal failed, retrying", extra={"error": describe_error(e)})

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            await self.open()
        assert self._kv is not None
        return self._kv

    def _value(self) -> bytes:
        return json.dumps({"identity": self.identity, "renewed": time.time()}).encode()
