"""When the syncer refolds the whole log: after a reconnect, on its timer, again after a failure.

The rebuild itself is a stand-in recording its triggers (the real one is exercised against
nats-server in test_syncer_stream_loss.py); the jitter is pinned through ``rng``. Waits poll with
a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from syncer.reading import antientropy
from syncer.reading.antientropy import Refolder

DEADLINE = 10.0


class Rebuilds:
    def __init__(self, failures: int = 0) -> None:
        self.triggers: list[str] = []
        self.failures = failures
        self._done = asyncio.Event()

    async def __call__(self, trigger: str) -> None:
        if self.failures:
            self.failures -= 1
            raise TimeoutError("nats away")
        self.triggers.append(trigger)
        self._done.set()

    async def count(self, wanted: int) -> list[str]:
        """The triggers once ``wanted`` rebuilds succeeded (within the deadline)."""
        async with asyncio.timeout(DEADLINE):
            while len(self.triggers) < wanted:
                self._done.clear()
                await self._done.wait()
        return self.triggers


@pytest.fixture
async def stopping() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()


def running(refolder: Refolder, stopping: asyncio.Event) -> asyncio.Task[None]:
    return asyncio.create_task(refolder.run(stopping))


async def test_a_reconnect_refolds_once_and_the_timer_stays_off_at_zero(
    stopping: asyncio.Event,
) -> None:
    rebuilds = Rebuilds()
    refolder = Refolder(rebuilds, period=0.0, rng=lambda: 0.0)
    task = running(refolder, stopping)

    refolder.reconnected()
    assert await rebuilds.count(1) == ["reconnect"]
    refolder.reconnected()
    assert await rebuilds.count(2) == ["reconnect", "reconnect"]

    stopping.set()
    await asyncio.wait_for(task, DEADLINE)
    assert rebuilds.triggers == ["reconnect", "reconnect"]


async def test_the_timer_refolds_every_period(stopping: asyncio.Event) -> None:
    rebuilds = Rebuilds()
    task = running(Refolder(rebuilds, period=0.02, rng=lambda: 0.5), stopping)

    assert set(await rebuilds.count(3)) == {"timer"}
    stopping.set()
    await asyncio.wait_for(task, DEADLINE)


async def test_a_failed_refold_is_retried(
    stopping: asyncio.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(antientropy, "_RETRY_AFTER", 0.01)
    rebuilds = Rebuilds(failures=2)
    refolder = Refolder(rebuilds, period=0.0, rng=lambda: 0.0)
    task = running(refolder, stopping)

    refolder.reconnected()
    assert await rebuilds.count(1) == ["reconnect"]
    assert rebuilds.failures == 0

    stopping.set()
    await asyncio.wait_for(task, DEADLINE)
