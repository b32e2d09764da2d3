"""Cluster-wide leases on KV keys: take one if free, keep it while working, give it back.

The pull budget's slots and the seeds' leases are the same thing: a key created with ``create``
(which fails if the key exists), holding the holder's node name and a per-message TTL. The
holder renews it every third of the TTL while it works; a holder that dies stops renewing and
the key expires by itself. No clocks are compared and nobody has to clean up after the dead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

__all__ = ["Lease", "lease_ttl", "release", "take"]

log = logging.getLogger(__name__)

# NATS' "wrong last sequence": someone else wrote the key since.
_WRONG_LAST_SEQUENCE = (10071, 10164)


def lease_ttl(seconds: float) -> float:
    """Per-message TTLs are whole seconds, at least one."""
    return float(max(1, round(seconds)))


async def take(kv: KeyValue, key: str, node: str, ttl: float) -> int | None:
    """Create ``key`` holding ``node`` for ``ttl``; its revision, or None if someone holds it."""
    try:
        return await kv.create(key, node.encode(), msg_ttl=lease_ttl(ttl))
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def release(kv: KeyValue, key: str, ttl: float) -> None:
    """Give ``key`` back; the purge marker expires too, so used leases leave nothing behind."""
    await kv.purge(key, msg_ttl=lease_ttl(ttl))


class Lease:
    """A held lease: :meth:`keep` renews it until cancelled (run it as a task)."""

    def __init__(
        self,
        js: JetStreamContext,
        subject: str,
        node: str,
        revision: int,
        ttl: float,
        on_error: Callable[[Exception], None],
    ) -> None:
        self.subject = subject
        self._js = js
        self._node = node
        self._revision = revision
        self._ttl = ttl
        self._on_error = on_error

    async def keep(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                ack = await self._js.publish(
                    self.subject,
                    self._node.encode(),
                    headers={"Nats-Expected-Last-Subject-Sequence": str(self._revision)},
                    msg_ttl=lease_ttl(self._ttl),
                )
                self._revision = ack.seq
            except nats.js.errors.APIError as e:
                if e.err_code not in _WRONG_LAST_SEQUENCE:
                    self._on_error(e)
                    continue
                # Our lease ran out (a long stall) and someone else holds it now: work on, the
                # bound is exceeded by one for a moment, rather than abort a pull.
                log.warning("lease lost while working", extra={"lease": self.subject})
                return
            except Exception as e:
                self._on_error(e)
