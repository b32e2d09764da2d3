"""Stopping the node syncer is bounded, even when a cancellation is lost on the way.

Python 3.11's ``asyncio.wait_for`` (nats-py's KV watcher waits through it) returns the awaited
result instead of raising when the result arrives at the moment of the cancel. Under load this
happened to the syncer's replay-request watch at stop: the watch, which ended only when cancelled,
ran on and the syncer never returned. The race is made certain here by a watcher whose wait always
swallows the cancel like that; NATS and containerd are real. A pass of the reconcile that hangs
(a call without a deadline) must not keep the syncer from stopping either.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator

import pytest
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from syncer_harness import (  # noqa: F401  (fixtures)
    RunningSyncer,
    info_logs_fixture,
    logged,
    settings_fixture,
)

from ops.lifecycle import cancel_and_wait, until_stopping
from syncer.cri import RuntimeImage
from syncer.keeping import Keeper
from syncer.references import Holding, ImageRef
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings

pytestmark = [pytest.mark.nats, pytest.mark.cri]


@pytest.fixture
def lost_cancels(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.Event]:
    """Every KV watcher wait swallows its cancel, as wait_for does when an update arrives with it;
    the event is set once a watcher waits."""
    waiting = asyncio.Event()
    updates: Callable[..., Awaitable[object]] = KeyValue.KeyWatcher.updates

    async def swallowing(self: KeyValue.KeyWatcher, timeout: float = 5.0) -> object:
        waiting.set()
        try:
            return await updates(self, timeout)
        except asyncio.CancelledError:
            return None  # "the update came": the cancel is gone

    monkeypatch.setattr(KeyValue.KeyWatcher, "updates", swallowing)
    yield waiting


async def test_the_syncer_stops_though_its_replay_watch_loses_the_cancel(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    lost_cancels: asyncio.Event,
) -> None:
    running = await RunningSyncer(settings).start()
    try:
        async with asyncio.timeout(60):
            await lost_cancels.wait()  # the replay-request watch waits for a request
    finally:
        assert await running.stop() == 0


async def test_a_reconcile_pass_that_hangs_is_cancelled_at_stop(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hanging = asyncio.Event()
    after_list = Keeper.after_list
    passes = 0

    async def hangs_after_the_first(
        self: Keeper,
        wanted: Collection[ImageRef],
        present: Holding,
        images: Iterable[RuntimeImage] = (),
    ) -> None:
        nonlocal passes
        passes += 1
        if passes == 1:  # the one at start
            await after_list(self, wanted, present, images)
            return
        hanging.set()
        await asyncio.Event().wait()  # e.g. a NATS or containerd call without a deadline

    monkeypatch.setattr(Keeper, "after_list", hangs_after_the_first)
    running = await RunningSyncer(settings).start()
    try:
        async with asyncio.timeout(60):
            await hanging.wait()
    finally:
        assert await running.stop() == 0
    assert logged(caplog, "loops did not end in time, cancelled")


async def test_cancel_and_wait_cancels_again_a_task_that_lost_the_first_cancel() -> None:
    waiting = asyncio.Event()

    async def loses_one_cancel() -> None:
        waiting.set()
        with contextlib.suppress(asyncio.CancelledError):  # lost: carries on regardless
            await asyncio.Event().wait()
        await asyncio.Event().wait()

    task = asyncio.create_task(loses_one_cancel())
    await waiting.wait()
    assert await cancel_and_wait([task], patience=60.0, again_every=0.05) == set()
    assert task.cancelled()


async def test_cancel_and_wait_gives_up_on_a_task_that_never_ends() -> None:
    release, waiting = asyncio.Event(), asyncio.Event()

    async def never_ends() -> None:
        waiting.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    task = asyncio.create_task(never_ends())
    await waiting.wait()
    assert await cancel_and_wait([task], patience=0.2, again_every=0.05) == {task}
    release.set()
    await task


async def test_until_stopping_passes_on_a_cancel_that_comes_while_its_work_winds_down() -> None:
    stopping, started, winding, release = (asyncio.Event() for _ in range(4))

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            winding.set()  # cleaning up, as a NATS unsubscribe does
            await release.wait()
            raise

    caller = asyncio.create_task(until_stopping(stopping, work()))
    await started.wait()
    stopping.set()
    await winding.wait()
    caller.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
