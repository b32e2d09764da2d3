"""Stopping the node syncer is bounded, even when a cancellation is lost on the way.

Python 3.11's ``asyncio.wait_for`` returns the awaited result instead of raising when the result
arrives at the moment of the cancel. Under load this happened to the syncer's replay-request watch
at stop (then a KV watcher): the watch, which ended only when cancelled, ran on and the syncer
never returned. The race is made certain here by making every wait of the syncer's pushed
consumers (replay requests, node images; ``syncer.following``) swallow the cancel like that; NATS
and containerd are real. A pass of the reconcile that hangs
(a call without a deadline) must not keep the syncer from stopping either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator

import pytest
from nats.js import JetStreamContext
from support.syncer_harness import (  # noqa: F401  (fixtures)
    RunningSyncer,
    eventually,
    fleet,
    info_logs_fixture,
    logged,
    override,
    settings_fixture,
)

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.registry import Registry
from ops.lifecycle import cancel_and_wait, until_stopping
from syncer.folding.references import Holding, ImageRef
from syncer.following import PushedSubjects
from syncer.keeping.keeper import Keeper
from syncer.pulling.puller import Puller, PullResult
from syncer.runner import _Syncer, run
from syncer.runtime.cri import RuntimeImage
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings, publish_event
from wire.nodestatus import NodeStatus, StatusSettings, get_status, open_status_bucket
from wire.permissions import REPLAY_CONSUMER_SUFFIX

pytestmark = [pytest.mark.nats, pytest.mark.cri]


@pytest.fixture
def lost_cancels(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.Event]:
    """Every wait for a pushed message swallows its cancel, as wait_for does when a message
    arrives with it; the event is set once the replay-request watch waits."""
    waiting = asyncio.Event()
    wait: Callable[..., Awaitable[object]] = PushedSubjects.next

    async def swallowing(self: PushedSubjects, timeout: float) -> object:
        if self.name.endswith(REPLAY_CONSUMER_SUFFIX):
            waiting.set()
        try:
            return await wait(self, timeout)
        except asyncio.CancelledError:
            return None  # "the message came": the cancel is gone

    monkeypatch.setattr(PushedSubjects, "next", swallowing)
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


async def test_a_stop_during_the_start_drains_what_the_start_began(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    own_registry: Registry,
    push: Callable[..., str],
    containerd: Containerd,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 23: a stop while the start was still under way (here: after its first reconcile,
    creating the durable while NATS does not answer) skipped the stop's drain: the pulls the
    first reconcile began were dropped, the keeper never closed."""
    image = push(into=own_registry)
    durable, pulling = asyncio.Event(), asyncio.Event()
    attempt = Puller._attempt

    async def seen(self: Puller, image: ImageRef) -> PullResult:
        pulling.set()
        return await attempt(self, image)

    monkeypatch.setattr(Puller, "_attempt", seen)

    async def never_created(self: object) -> bool:
        durable.set()
        await asyncio.Event().wait()
        return False

    monkeypatch.setattr(_Syncer, "_start_durable", never_created)
    assert own_registry.process is not None
    os.killpg(own_registry.process.pid, signal.SIGSTOP)  # the first reconcile's pull waits
    try:
        stopping = asyncio.Event()
        task = asyncio.create_task(run(override(settings, extra_image=(image,)), stopping))
        await asyncio.wait_for(durable.wait(), 60)
        await asyncio.wait_for(pulling.wait(), 60)  # the runtime is pulling
        stopping.set()
    finally:
        os.killpg(own_registry.process.pid, signal.SIGCONT)

    assert await asyncio.wait_for(task, 60) == 0
    assert logged(caplog, "draining")
    assert image in containerd.image_refs()  # the pull in flight was let finish


async def test_the_last_status_is_written_though_the_throttle_says_not_yet(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    """Issue 23 fault 11: the status is written at most once per --status-interval, and the
    write at stop went through that throttle: a stopped node kept showing the state of its
    last write (here: the one at start, before the Fleet) until the entry's TTL."""
    image = push()
    quiet = override(settings, status_interval=600.0)
    running = await RunningSyncer(quiet).start()
    try:
        await eventually(lambda: status_of(js, quiet), "the first status write")
        await publish_event(js, log_settings, "fleet.events.added", fleet("last", image))
        await eventually(lambda: image in containerd.image_refs(), "the image pulled")
    finally:
        assert await running.stop() == 0

    status = await status_of(js, quiet)
    assert status is not None
    assert "default/last" in status.summary.fleets and not status.summary.missing


async def status_of(js: JetStreamContext, settings: SyncerSettings) -> NodeStatus | None:
    kv = await open_status_bucket(js, StatusSettings(prefix=settings.subject_prefix))
    return await get_status(kv, settings.node_name) if kv is not None else None


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
