"""Handling one delivered event: fold it, make its images present, then ack, nak or terminate.

An event is acked once its images are present, or once a failed pull is recorded and left to the
retry machinery (backoff plus the periodic reconcile); a long pull keeps its message alive with
in-progress signals. An unreachable runtime naks it with a delay. Messages that cannot be used
are terminated with one log line and a metric; nothing stops the live loop.

Events are folded strictly in delivery order. Only an event that needs pulls gets a task of its
own (settled in the background, so a slow pull never holds up the events behind it); the common
case, images already on the node, costs no task at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from syncer import metrics
from syncer.folding.desired import DesiredState, Outcome
from syncer.folding.references import ImageRef
from syncer.folding.transitions import fold
from syncer.pulling.inventory import Inventory
from wire.contract import ContractError, Event, decode_event

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

_NAK_DELAY = 5.0


class Dispatcher:
    def __init__(
        self,
        desired: DesiredState,
        inventory: Inventory,
        *,
        ack_wait: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._desired = desired
        self._inventory = inventory
        self._ack_wait = ack_wait
        self._on_change = on_change
        self.last_seq = 0
        # Delivered again by a durable that could not be restarted after the replay (one made at
        # the node's login): already folded, acked without folding again.
        self.skip_through = 0
        self._settling: set[asyncio.Task[None]] = set()

    async def dispatch(self, msg: Msg) -> None:
        """Fold one message; ack it at once unless it needs pulls (then settled in a task)."""
        try:
            event = decode_event(msg.data)
        except ContractError as e:
            self._terminate(msg, "malformed", str(e))
            return
        if msg.metadata.num_delivered > 1:
            metrics.REDELIVERED.inc()
        seq = msg.metadata.sequence.stream
        if seq <= self.skip_through:
            await self._ack(msg, event.event_type, "stale")
            return
        self.last_seq = max(self.last_seq, seq)
        # The lag as the server saw it when delivering: no consumer_info needed for the gauges.
        metrics.CONSUMER_LAG.set(msg.metadata.num_pending or 0)
        metrics.CONSUMER_ACK_PENDING.set(len(self._settling))
        applied = fold(self._desired, event, seq)
        self._on_change()
        if applied.outcome is Outcome.NOT_A_FLEET:
            self._terminate(msg, "not_a_fleet", f"{event.event_type} on the Fleet stream")
            return
        if applied.outcome is not Outcome.APPLIED:
            result = "stale" if applied.outcome is Outcome.STALE else "acked"
            await self._ack(msg, event.event_type, result)
            return
        missing = self._inventory.missing_for(applied.fleet, applied.images)
        if not missing:
            await self._ack(msg, event.event_type, "acked")
            return
        self._spawn(self._settle(msg, event, missing))

    async def drain(self) -> None:
        """Wait for the events being settled."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, msg: Msg, event: Event, missing: list[ImageRef]) -> None:
        pulls = self._inventory.pull_all(missing)
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        try:
            results = await asyncio.gather(*(asyncio.shield(p) for p in pulls))
        finally:
            heartbeat.cancel()
        retry = [r for r in results if r.transient or r.error == "stopping"]
        if retry:
            await self._nak(msg, event.event_type, 0.0 if retry[0].deferred else _NAK_DELAY)
        else:
            # Failures are logged by the inventory and retried by the reconcile.
            await self._ack(msg, event.event_type, "acked")

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(1.0, self._ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

    async def _ack(self, msg: Msg, event_type: str, result: str) -> None:
        try:
            await msg.ack()
        except nats.errors.Error as e:
            # Redelivered later and folded again: harmless, the fold is idempotent.
            metrics.NATS_ERRORS.labels("ack").inc()
            log.warning("ack failed", extra={"error": repr(e)})
            result = "ack_failed"
        metrics.EVENTS.labels(event_type, result).inc()

    async def _nak(self, msg: Msg, event_type: str, delay: float) -> None:
        try:
            await msg.nak(delay=delay or None)
        except nats.errors.Error:
            metrics.NATS_ERRORS.labels("nak").inc()
        metrics.EVENTS.labels(event_type, "nakked").inc()

    def _terminate(self, msg: Msg, reason: str, detail: str) -> None:
        seq = msg.metadata.sequence.stream if msg.reply else None
        log.warning(
            "message terminated",
            extra={"reason": reason, "detail": detail, "subject": msg.subject, "seq": seq},
        )
        metrics.TERMINATED.labels(reason).inc()
        metrics.EVENTS.labels("unknown", "terminated").inc()

        async def term() -> None:
            with contextlib.suppress(nats.errors.Error):
                await msg.term()

        self._spawn(term())
