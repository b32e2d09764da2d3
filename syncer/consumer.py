"""The node's view of the event log: a full replay at start, then its own durable consumer.

This is the event path's loop and its order of operations; the parts live next to it:
:mod:`syncer.replay` folds the whole log, :mod:`syncer.durable` keeps the node's durable
consumer, :mod:`syncer.dispatch` handles each delivered event. The sequence the node has folded
(:attr:`FleetConsumer.last_seq`) ties them together: the durable always starts right after it.

Rebuild. Folding the whole log again into a fresh state, swapping it in and restarting the
durable right after it makes the node's desired state the fold of the log as it is now, whatever
happened to the stream behind the syncer's back. It runs on an operator's replay request
(``image-syncer replay --node``), at once when the durable is found lost, and after a reconnect
and every ``--refold-period`` (:mod:`syncer.refold`). Sequences are never carried from one
incarnation of the stream to the next: a lost durable is never re-created after the sequence the
node had folded, since a stream lost and created again restarts at 1 and that durable would
deliver nothing; and the durable is started only once the stream it lands on is the one just
folded (same creation time).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

import nats.errors
from nats.js import JetStreamContext

from ops.serving import Health
from syncer import metrics
from syncer.desired import DesiredState
from syncer.dispatch import Dispatcher
from syncer.durable import Durable
from syncer.inventory import Inventory
from syncer.replay import LogPosition, replay_log
from syncer.settings import SyncerSettings
from wire.contract import Kind, subject_filter
from wire.eventlog import stream_name

__all__ = ["FleetConsumer"]

log = logging.getLogger(__name__)

_FETCH_TIMEOUT = 1.0
# Check that the durable still exists after this many idle fetches (a NATS restart drops it);
# rare enough that thousands of idle nodes do not load the JetStream API.
_IDLE_CHECK_EVERY = 30
# A stream re-created again and again while we fold it: give up this rebuild, retry later.
_REBUILD_ATTEMPTS = 3


class FleetConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        settings: SyncerSettings,
        desired: DesiredState,
        inventory: Inventory,
        health: Health,
        *,
        on_change: Callable[[], None] = lambda: None,
        on_rebuilt: Callable[[], None] = lambda: None,
    ) -> None:
        self._js = js
        self._on_rebuilt = on_rebuilt
        self._settings = settings
        self._desired = desired
        self._health = health
        self._on_change = on_change
        # Held by the live loop around each fetch and by a rebuild, so they never interleave.
        self._pause = asyncio.Lock()
        self.stream = stream_name(settings.subject_prefix, Kind.FLEET)
        self.subject = subject_filter(settings.subject_prefix, Kind.FLEET)
        self.durable = Durable(js, settings, self.stream, self.subject)
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

        The live loop is paused meanwhile; an error leaves the current state untouched.
        """
        async with self._pause:
            await self._rebuild(trigger, restart=True)

    async def refold(self, trigger: str) -> None:
        """Like :meth:`rebuild`, but the durable keeps its place when the stream is the one
        folded before: what it delivers next is folded on top (older events are stale), and
        there is no moment without a durable."""
        async with self._pause:
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
            await self.durable.start(position.seq)
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
        await self.durable.start(self.last_seq)

    async def _recover(self, stopping: asyncio.Event) -> None:
        await self.durable.recover(self._health, stopping, on_lost=self._rebuild_lost)

    async def _rebuild_lost(self) -> None:
        await self._rebuild("consumer_lost", restart=True)
        metrics.REPLAYS.labels("consumer_lost").inc()

    # --- live -----------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and handle events until ``stopping``."""
        idle = 0
        batch = min(64, self._settings.max_ack_pending)
        while not stopping.is_set():
            self._health.beat("consumer", allowance=60.0)
            async with self._pause:
                idle = await self._fetch_once(batch, idle, stopping)
        self._health.forget("consumer")

    async def _fetch_once(self, batch: int, idle: int, stopping: asyncio.Event) -> int:
        try:
            messages = await self.durable.fetch(batch, _FETCH_TIMEOUT)
        except nats.errors.TimeoutError:
            idle += 1
            if idle % _IDLE_CHECK_EVERY == 0:
                await self._recover(stopping)
            return idle
        except Exception as e:
            metrics.NATS_ERRORS.labels("fetch").inc()
            log.warning("fetch failed", extra={"error": repr(e), "consumer": self.durable.name})
            await self._recover(stopping)
            return idle
        for msg in messages:
            await self._dispatcher.dispatch(msg)
        return 0

    async def drain(self) -> None:
        """Wait for the events being settled, then stop taking deliveries."""
        await self._dispatcher.drain()
        await self.durable.unbind()


def _known(desired: DesiredState) -> set[str]:
    """The Fleets ``desired`` knows of, desired or excluded."""
    return set(desired.fleets()) | set(desired.excluded())
