"""The node's view of the event log: a full replay at start, then its own durable consumer.

This is the event path's loop and its order of operations; the parts live next to it:
:mod:`syncer.reading.replay` folds the whole log, :mod:`syncer.reading.durable` keeps the node's
durable consumer, :mod:`syncer.reading.dispatch` handles each delivered event. The sequence the node
has folded (:attr:`FleetConsumer.last_seq`) ties them together: the durable always starts right
after it.

Live. The loop long-polls the durable (:mod:`syncer.reading.longpoll`): one pull request held by the
server for ``--fetch-expiry`` and answered the moment an event is stored, then whatever else of a
burst is already waiting, in batches. An idle node costs one request per expiry, and no periodic
``consumer_info``: two missed idle heartbeats, or an error the server ends the poll with (a
deleted durable's 409), is what makes the loop check the durable. A reconnect (the server
restarted, the connection moved) ends the poll at once and checks the durable, since the request
died with the old connection; stopping and a rebuild end the poll at once too.

Rebuild. Folding the whole log again into a fresh state and swapping it in makes the node's
desired state the fold of the log as it is now, whatever happened to the stream behind the
syncer's back. It runs on an operator's replay request (``image-syncer replay --node``) and at
once when the durable is found lost, restarting the durable right after the fold; and after a
reconnect and every ``--refold-period`` (:mod:`syncer.reading.antientropy`), keeping the durable
where it is unless the stream is a new one. Sequences are never carried from one incarnation of the
stream to the next: a lost durable is never re-created after the sequence the node had folded, since
a stream lost and created again restarts at 1 and that durable would deliver nothing; and the
durable is started only once the stream it lands on is the one just folded (same creation
time).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ops.serving import Health
from syncer import metrics
from syncer.folding.desired import DesiredState
from syncer.pulling.inventory import Inventory
from syncer.reading.dispatch import Dispatcher
from syncer.reading.durable import Durable
from syncer.reading.longpoll import Poll
from syncer.reading.replay import LogPosition, replay_log
from syncer.settings import ConsumerSettings
from wire.contract import Kind, subject_filter
from wire.eventlog import stream_name
from wire.natsconn import next_reconnect

__all__ = ["FleetConsumer"]

log = logging.getLogger(__name__)

# A stream re-created again and again while we fold it: give up this rebuild, retry later.
_REBUILD_ATTEMPTS = 3


class _Ended(enum.Enum):
    POLL = "poll"  # the poll itself ended: look at its outcome
    RECONNECTED = "reconnected"  # its request died with the old connection
    INTERRUPTED = "interrupted"  # stopping, or a rebuild wants the loop paused


class FleetConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        settings: ConsumerSettings,
        desired: DesiredState,
        inventory: Inventory,
        health: Health,
        *,
        node: str,
        prefix: str,
        on_change: Callable[[], None] = lambda: None,
        on_rebuilt: Callable[[], None] = lambda: None,
    ) -> None:
        self._js = js
        self._on_rebuilt = on_rebuilt
        self._settings = settings
        self._desired = desired
        self._health = health
        self._on_change = on_change
        # Held by the live loop around each poll and by a rebuild, so they never interleave; a
        # rebuild sets ``_wake`` first, so it does not wait for a poll held by the server.
        self._pause = asyncio.Lock()
        self._wake = asyncio.Event()
        self.stream = stream_name(prefix, Kind.FLEET)
        self.subject = subject_filter(prefix, Kind.FLEET)
        self.durable = Durable(
            js, settings, node=node, prefix=prefix, stream=self.stream, subject=self.subject
        )
        self._dispatcher = Dispatcher(
            desired, inventory, ack_wait=settings.ack_wait, on_change=on_change
        )
        self._replayed = LogPosition()

    @property
    def last_seq(self) -> int:
        """The newest stream sequence folded, by the replay or the live loop."""
        return max(self._replayed.seq, self._dispatcher.last_seq)

    @property
    def stream_created(self) -> datetime | None:
        """Which incarnation of the stream :attr:`last_seq` belongs to (its creation time)."""
        return self._replayed.stream_created

    # --- replay ---------------------------------------------------------------------------

    async def replay(self) -> int:
        """Fold the whole log into the live state (at start); return the sequence the live
        consumer must start after."""
        self._replayed = await replay_log(self._js, self.stream, self.subject, self._desired)
        return self.last_seq

    async def rebuild(self, trigger: str = "request") -> None:
        """Fold the whole log into a fresh state, swap it in, restart the durable after it.

        The live loop is paused meanwhile. An error reading the log leaves the current state
        untouched; one restarting the durable is repaired by the live loop, which then finds the
        durable lost.
        """
        self._wake.set()
        async with self._pause:
            self._wake.clear()
            await self._rebuild(trigger, restart=True)

    async def refold(self, trigger: str) -> None:
        """Like :meth:`rebuild`, but the durable keeps its place when the stream is the one
        folded before: what it delivers next is folded on top (older events are stale), and
        there is no moment without a durable."""
        self._wake.set()
        async with self._pause:
            self._wake.clear()
            await self._rebuild(trigger, restart=False)

    async def _rebuild(self, trigger: str, *, restart: bool) -> None:
        before = _known(self._desired)
        for _ in range(_REBUILD_ATTEMPTS):
            fresh = DesiredState(admit=self._desired.admit)
            position = await replay_log(self._js, self.stream, self.subject, fresh, quiet=True)
            same_stream = position.stream_created == self._replayed.stream_created
            self._desired.replace_with(fresh)
            if not restart and same_stream:
                self._replayed = LogPosition(
                    max(position.seq, self._replayed.seq), position.stream_created
                )
                break
            self._replayed = position
            self._dispatcher.last_seq = 0  # the sequences before belong to the folded past
            await self._start_durable(position.seq)
            if await self._same_stream(position):
                break
            log.warning("stream re-created during the rebuild, folding again")
        else:
            raise RuntimeError(f"stream {self.stream} keeps being re-created")
        dropped = sorted(before - _known(self._desired))
        for fleet in dropped:
            # Its delete never reached the live loop: the durable was lost, the tombstone expired
            # while the node was cut off, or the stream itself was lost.
            log.info("fleet gone from the log, dropped", extra={"fleet": fleet})
        log.info(
            "desired state rebuilt from the whole log",
            extra={
                "trigger": trigger,
                "fleets_before": len(before),
                "fleets": len(self._desired),
                "dropped": len(dropped),
                "last_seq": position.seq,
                "durable_restarted": restart or not same_stream,
            },
        )
        self._on_change()
        self._on_rebuilt()

    async def _same_stream(self, position: LogPosition) -> bool:
        """Whether the stream is still the incarnation ``position`` was folded from."""
        info = await self._js.stream_info(self.stream)
        return info.created == position.stream_created

    # --- the durable ----------------------------------------------------------------------

    async def start_durable(self) -> None:
        """(Re)create the durable to deliver what comes after ``last_seq``, and bind to it."""
        await self._start_durable(self.last_seq)

    async def _start_durable(self, after_seq: int) -> None:
        if self._settings.provisioned:
            # Made at login, delivering from the start: skip what the fold already holds.
            self._dispatcher.skip_through = after_seq
        await self.durable.start(after_seq)

    async def _recover(self, stopping: asyncio.Event) -> None:
        await self.durable.recover(self._health, stopping, on_lost=self._rebuild_lost)

    async def _rebuild_lost(self) -> None:
        await self._rebuild("consumer_lost", restart=True)
        metrics.REPLAYS.labels("consumer_lost").inc()

    # --- live -----------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll for and handle events until ``stopping``."""
        batch = min(64, self._settings.max_ack_pending)
        allowance = max(60.0, 2 * self._settings.fetch_expiry)
        while not stopping.is_set():
            self._health.beat("consumer", allowance=allowance)
            async with self._pause:
                await self._poll_once(batch, stopping)
        self._health.forget("consumer")

    async def _poll_once(self, batch: int, stopping: asyncio.Event) -> None:
        s = self._settings
        poll = asyncio.ensure_future(self.durable.long_poll(s.fetch_expiry, s.fetch_heartbeat))
        ended = await self._finished(poll, stopping)
        if ended is _Ended.RECONNECTED:
            # The server may have restarted and dropped the memory-backed durable.
            await self._recover(stopping)
        if ended is not _Ended.POLL:
            return
        try:
            outcome, messages = poll.result()
            if outcome is Poll.SILENT:
                # Two idle heartbeats missed: is the durable still there?
                await self._recover(stopping)
                return
            while messages:
                for msg in messages:
                    await self._dispatcher.dispatch(msg)
                messages = await self.durable.waiting(batch)
        except Exception as e:
            metrics.NATS_ERRORS.labels("fetch").inc()
            log.warning("fetch failed", extra={"error": repr(e), "consumer": self.durable.name})
            await self._recover(stopping)

    async def _finished(
        self, poll: asyncio.Future[tuple[Poll, list[Msg]]], stopping: asyncio.Event
    ) -> _Ended:
        """Wait for ``poll`` to end, or cancel it on stopping, a rebuild or a reconnect.

        Messages a cancelled poll had already received stay in the subscription's queue and
        are the next poll's first answer, so none is skipped.
        """
        reconnected = asyncio.ensure_future(next_reconnect(self._js).wait())
        others: list[asyncio.Future[Any]] = [
            reconnected,
            asyncio.ensure_future(stopping.wait()),
            asyncio.ensure_future(self._wake.wait()),
        ]
        try:
            await asyncio.wait([poll, *others], return_when=asyncio.FIRST_COMPLETED)
            was_reconnect = reconnected.done()
        finally:
            for waiter in others:
                waiter.cancel()
        if poll.done():
            return _Ended.POLL
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await poll
        return _Ended.RECONNECTED if was_reconnect else _Ended.INTERRUPTED

    async def drain(self) -> None:
        """Wait for the events being settled, then stop taking deliveries."""
        await self._dispatcher.drain()
        await self.durable.unbind()


def _known(desired: DesiredState) -> set[str]:
    """The Fleets ``desired`` knows of, desired or excluded."""
    return set(desired.fleets()) | set(desired.excluded())
