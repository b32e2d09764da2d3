"""The node's view of the event log: a full replay at start, then its own durable consumer.

This is the event path's loop and its order of operations; the parts live next to it:
:mod:`syncer.replay` folds the whole log, :mod:`syncer.durable` keeps the node's durable
consumer, :mod:`syncer.dispatch` handles each delivered event. The sequence the node has folded
(:attr:`FleetConsumer.last_seq`) ties them together: the durable always starts right after it.

Rebuild. An operator's replay request (``image-syncer replay --node``) folds the whole log again
into a fresh state while the live loop is paused, swaps it in, and restarts the durable after the
replayed sequence: whatever happened to the stream behind the syncer's back, the node's desired
state is the fold of the log as it is now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext

from ops.serving import Health
from syncer import metrics
from syncer.desired import DesiredState
from syncer.dispatch import Dispatcher
from syncer.durable import Durable
from syncer.inventory import Inventory
from syncer.replay import replay_log
from syncer.settings import SyncerSettings
from wire.contract import Kind, subject_filter
from wire.eventlog import stream_name

__all__ = ["FleetConsumer"]

log = logging.getLogger(__name__)

_FETCH_TIMEOUT = 1.0
# Check that the durable still exists after this many idle fetches (a NATS restart drops it);
# rare enough that thousands of idle nodes do not load the JetStream API.
_IDLE_CHECK_EVERY = 30


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
    ) -> None:
        self._js = js
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
        self._replayed_seq = 0

    @property
    def last_seq(self) -> int:
        """The newest stream sequence folded, by the replay or the live loop."""
        return max(self._replayed_seq, self._dispatcher.last_seq)

    # --- replay ---------------------------------------------------------------------------

    async def replay(self, into: DesiredState | None = None) -> int:
        """Fold the whole log (into ``into``, default the live state); return the sequence the
        live consumer must start after."""
        desired = self._desired if into is None else into
        seq = await replay_log(self._js, self.stream, self.subject, desired)
        self._replayed_seq = max(self._replayed_seq, seq)
        return self.last_seq

    async def rebuild(self) -> None:
        """Replay the whole log into a fresh state, swap it in, restart the durable after it.

        The live loop is paused meanwhile; an error leaves the current state untouched.
        """
        async with self._pause:
            fresh = DesiredState(admit=self._desired.admit)
            before = len(self._desired)
            await self.replay(into=fresh)
            self._desired.replace_with(fresh)
            await self.start_durable()
        log.info(
            "desired state rebuilt from the whole log",
            extra={"fleets_before": before, "fleets": len(self._desired)},
        )
        self._on_change()

    # --- the durable ----------------------------------------------------------------------

    async def start_durable(self) -> None:
        """(Re)create the durable to deliver what comes after ``last_seq``, and bind to it."""
        await self.durable.start(self.last_seq)

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
                await self.durable.recover(self.last_seq, self._health, stopping)
            return idle
        except Exception as e:
            metrics.NATS_ERRORS.labels("fetch").inc()
            log.warning("fetch failed", extra={"error": repr(e), "consumer": self.durable.name})
            await self.durable.recover(self.last_seq, self._health, stopping)
            return idle
        for msg in messages:
            await self._dispatcher.dispatch(msg)
        return 0

    async def drain(self) -> None:
        """Wait for the events being settled, then stop taking deliveries."""
        await self._dispatcher.drain()
        await self.durable.unbind()
