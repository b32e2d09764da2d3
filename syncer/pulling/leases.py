"""Cluster-wide counted leases: at most N nodes hold one of a family at once, each its own key.

The pull budget's slots (``slot.<image>``, ``mirror.<image>``) and the seeds' leases
(``seed.<image>.<group>``) are the same thing: a family of at most ``limit`` holders. A node holds
one with two keys of its own, ending with its token (:func:`wire.permissions.node_token`), so NATS
lets each node write and delete only its own (no node can take, purge or release another's):

- ``<family>.<node>``, the ticket, written once when it takes the lease (TTL ``max_hold``);
- ``alive.<family>.<node>``, renewed every third of ``ttl`` while it works (:class:`Lease`).

To take one, a node writes both, then reads the family (one batched direct get per key kind) and
keeps its lease if it is among the first ``limit`` valid holders by the sequence of their ticket;
otherwise it deletes both and tries again later. A holder is valid only while its alive key was
written less than ``ttl`` ago and its ticket less than ``max_hold`` ago, by the server's
timestamps and measured from the newest write (ours, just made): whatever TTL or value a writer
chose, a dead holder counts for one ``ttl`` at most and a live one for ``max_hold`` at most. Keys
are deleted, never purged (the bucket refuses rollups), and carry TTLs, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.js.errors
from nats.js import JetStreamContext

from wire.directread import DirectMessage, read_keys
from wire.permissions import node_token

__all__ = ["Lease", "alive_key", "holders", "lease_ttl", "release", "take"]

log = logging.getLogger(__name__)

# NATS' "wrong last sequence": someone else wrote the key since.
_WRONG_LAST_SEQUENCE = (10071, 10164)


def lease_ttl(seconds: float) -> float:
    """Per-message TTLs are whole seconds, at least one."""
    return float(max(1, round(seconds)))


def alive_key(family: str, node: str) -> str:
    return f"alive.{family}.{node_token(node)}"


def _ticket_key(family: str, node: str) -> str:
    return f"{family}.{node_token(node)}"


async def _put(js: JetStreamContext, bucket: str, key: str, node: str, ttl: float) -> int:
    # nats-py's kv.put takes no TTL: a publish on the key's subject is the same put.
    ack = await js.publish(f"$KV.{bucket}.{key}", node.encode(), msg_ttl=lease_ttl(ttl))
    return ack.seq


async def take(
    js: JetStreamContext,
    bucket: str,
    family: str,
    node: str,
    *,
    limit: int,
    ttl: float,
    max_hold: float,
) -> int | None:
    """Take one of ``family``'s ``limit`` leases; the alive key's revision, or None if full."""
    # The alive key first: our own write is the "now" the others' ages are measured against.
    revision = await _put(js, bucket, alive_key(family, node), node, ttl)
    await _put(js, bucket, _ticket_key(family, node), node, max_hold)
    first = (await holders(js, bucket, family, ttl=ttl, max_hold=max_hold))[:limit]
    if node_token(node) in first:
        return revision
    await release(js, bucket, family, node)  # someone came first: give it back, wait our turn
    return None


def _age(now: float, message: DirectMessage) -> float:
    return now - message.time.timestamp() if message.time is not None else float("inf")


async def holders(
    js: JetStreamContext, bucket: str, family: str, *, ttl: float, max_hold: float
) -> list[str]:
    """The node tokens validly holding a lease of ``family``, first taken first."""
    tickets = await read_keys(js, bucket, f"{family}.*")
    alive = await read_keys(js, bucket, f"alive.{family}.*")
    times = [m.time.timestamp() for m in (*tickets.values(), *alive.values()) if m.time]
    if not times:
        return []
    now = max(times)
    living = {key.rsplit(".", 1)[1] for key, m in alive.items() if _age(now, m) < ttl}
    held = [
        (m.seq, key.rsplit(".", 1)[1])
        for key, m in tickets.items()
        if _age(now, m) < max_hold and key.rsplit(".", 1)[1] in living
    ]
    return [token for _, token in sorted(held)]


async def release(js: JetStreamContext, bucket: str, family: str, node: str) -> None:
    """Give the lease back: delete both keys (the TTLs free them anyway)."""
    for key in (_ticket_key(family, node), alive_key(family, node)):
        await js.publish(f"$KV.{bucket}.{key}", b"", headers={"KV-Operation": "DEL"})


class Lease:
    """A held lease: :meth:`keep` renews its alive key until cancelled (run it as a task)."""

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
                # Written by someone else meanwhile (only we may write it: a stall let it
                # expire and our own late write landed): work on rather than abort a pull.
                log.warning("lease lost while working", extra={"lease": self.subject})
                return
            except Exception as e:
                self._on_error(e)
