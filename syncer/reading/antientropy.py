"""Anti-entropy: fold the whole log again now and then, to undo what no event will ever say.

The live consumer learns only what its durable delivers, and two things never arrive that way:

- a Fleet deleted while this node was cut off from NATS for longer than a tombstone lives: the
  delete purged the Fleet's older messages, the tombstone expired, and nothing left in the log
  says the Fleet existed;
- a log whose stream was lost and created again: sequences restart at 1, so a durable created
  after the old last sequence delivers nothing.

The fold of the whole log as it is now is the truth, and it costs what the live Fleets cost
(compaction), so the node folds it again, swaps it in and restarts its durable right after it.
The consumer does so at once when it finds its durable lost (a NATS restart, a re-created
stream); this module does so after a reconnect and every ``--refold-period``. Both are spread
with jitter: the nodes of a cluster reconnect together after a NATS restart, and must not all
read the log in the same second.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from ops.lifecycle import wait_any
from syncer import metrics

__all__ = ["Refolder"]

log = logging.getLogger(__name__)

# After a reconnect the refold starts within this long (uniformly spread), at most a tenth of
# the period: soon enough for a node to shed a stale Fleet in seconds, late enough that a
# thousand reconnecting nodes do not read the log in the same second.
_RECONNECT_SPREAD = 30.0
# A refold that failed (NATS away again) is tried again after this long.
_RETRY_AFTER = 10.0

Rebuild = Callable[[str], Awaitable[None]]


class Refolder:
    """Calls ``rebuild(trigger)`` after :meth:`reconnected` and every ``period`` (0: never)."""

    def __init__(
        self,
        rebuild: Rebuild,
        *,
        period: float,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rebuild = rebuild
        self._period = period
        self._rng = rng
        self._clock = clock
        self._wake = asyncio.Event()
        self._due: dict[str, float] = {}  # trigger -> when
        if period > 0:
            self._due["timer"] = clock() + self._jittered(period)

    def reconnected(self) -> None:
        """The NATS connection came back: refold soon (jittered), whatever the durable says."""
        spread = min(_RECONNECT_SPREAD, self._period / 10) if self._period > 0 else 0.0
        due = self._clock() + spread * self._rng()
        self._due["reconnect"] = min(due, self._due.get("reconnect", due))
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            trigger, due = self._next()
            self._wake.clear()
            if due > self._clock():
                await wait_any(stopping, self._wake, timeout=due - self._clock())
                continue
            del self._due[trigger]
            if await self._refold(trigger) and trigger == "timer":
                self._due["timer"] = self._clock() + self._jittered(self._period)

    def _next(self) -> tuple[str, float]:
        if not self._due:
            return "", float("inf")
        return min(self._due.items(), key=lambda item: item[1])

    async def _refold(self, trigger: str) -> bool:
        try:
            await self._rebuild(trigger)
        except Exception as e:
            log.warning(
                "refold failed, retrying",
                extra={"trigger": trigger, "error": repr(e), "retry_in": _RETRY_AFTER},
            )
            retry = self._clock() + _RETRY_AFTER
            self._due[trigger] = min(retry, self._due.get(trigger, retry))
            return False
        metrics.REPLAYS.labels(trigger).inc()
        return True

    def _jittered(self, period: float) -> float:
        return period * (0.9 + 0.2 * self._rng())
