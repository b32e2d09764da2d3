"""The live loop's long poll against the real nats-server and containerd.

An idle node must cost the cluster one held pull request per expiry and nothing else, say
nothing, and still notice at once a server restart or an operator deleting its durable. The
expiry here is ten minutes wherever the test is about noticing a fault: the event published
after the fault can only arrive within the test's deadline if the loop recovered on its own
signal (the reconnect, the server's 409), not because a poll ran out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from support.fleetdicts import fleet
from support.syncer_harness import RunningSyncer, eventually, logged, override, settings_with

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from syncer.reading.durable import Durable
from syncer.reading.longpoll import Poll
from syncer.settings import SyncerSettings
from wire.contract import Kind
from wire.eventlog import LogSettings, ensure_streams, publish_event, stream_name
from wire.natsconn import NatsSettings, connect

pytestmark = [pytest.mark.nats, pytest.mark.cri]

LONG = 600.0


@pytest.fixture
def base(containerd: Containerd, prefix: str) -> SyncerSettings:
    return settings_with(
        node_name="node-longpoll.example",
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        pull_timeout=30.0,
        pull_backoff_min=0.2,
        pull_backoff_max=1.0,
        subject_prefix=prefix,
        metrics_addr="",
        status_interval=0.2,
        fetch_expiry=LONG,
        fetch_heartbeat=5.0,
    )


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Poll]]:
    """Every long poll's outcome, in order."""
    outcomes: list[Poll] = []
    original = Durable.long_poll

    async def recording(self: Durable, expiry: float, heartbeat: float):  # type: ignore[no-untyped-def]
        outcome, messages = await original(self, expiry, heartbeat)
        outcomes.append(outcome)
        return outcome, messages

    monkeypatch.setattr(Durable, "long_poll", recording)
    yield outcomes


@pytest.fixture
def existence_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every time the loop asked the server whether its durable exists (consumer_info)."""
    checks: list[str] = []
    original = Durable._exists

    async def counting(self: Durable) -> bool:
        checks.append(self.name)
        return await original(self)

    monkeypatch.setattr(Durable, "_exists", counting)
    return checks


async def publish_once_jetstream_is_back(
    js: JetStreamContext, log_settings: LogSettings, obj: dict[str, Any]
) -> None:
    """Publish as the broadcaster would, retrying while the restarted server recovers its
    streams (it answers with timeouts and 503s for a moment)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            await publish_event(js, log_settings, "fleet.events.added", obj)
            return
        except nats.errors.Error:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def durable_exists(js: JetStreamContext, stream: str, durable: str) -> None:
    """Until the syncer has created its durable (ready may be reported a moment before)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            await js.consumer_info(stream, durable)
            return
        except nats.js.errors.NotFoundError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def present(containerd: Containerd, image: str) -> bool:
    return image in containerd.image_refs()


async def test_an_idle_syncer_polls_silently_and_asks_nothing_else(
    base: SyncerSettings,
    nats_settings: NatsSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
    polls: list[Poll],
    existence_checks: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = override(base, nats=nats_settings, fetch_expiry=3.0, fetch_heartbeat=1.0)
    caplog.set_level(logging.INFO)
    running = await RunningSyncer(settings).start()
    try:
        await eventually(lambda: polls.count(Poll.IDLE) >= 2, "two idle polls")
        # Idle polls end in silence: no warning, no "fetch failed", no consumer_info.
        loop_warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING
            and r.name in ("syncer.reading.consumer", "syncer.reading.durable")
        ]
        assert loop_warnings == []
        assert existence_checks == []
        # And the next event still arrives through the held request.
        image = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("idle", image))
        await eventually(lambda: present(containerd, image), "the image pulled")
        assert Poll.MESSAGES in polls
    finally:
        assert await running.stop() == 0


async def test_the_long_poll_recovers_after_a_nats_restart(
    base: SyncerSettings,
    own_nats_server: NatsServer,
    containerd: Containerd,
    prefix: str,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    nats = NatsSettings(servers=(own_nats_server.url,))
    log_settings = LogSettings(prefix=prefix)
    nc = await connect(nats, name="tests")
    js = nc.jetstream()
    await ensure_streams(js, log_settings)
    caplog.set_level(logging.INFO)
    running = await RunningSyncer(override(base, nats=nats)).start()
    try:
        first = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("before", first))
        await eventually(lambda: present(containerd, first), "the first image pulled")
        # The restart drops the memory-backed durable and the request the server was holding.
        own_nats_server.restart()
        await eventually(lambda: nc.is_connected, "the test client reconnected")
        second = push()
        await publish_once_jetstream_is_back(js, log_settings, fleet("after", second))
        await eventually(lambda: present(containerd, second), "the image published after")
        assert logged(caplog, "consumer lost")
    finally:
        assert await running.stop() == 0
        await nc.close()


async def test_the_long_poll_recovers_when_its_durable_is_deleted(
    base: SyncerSettings,
    nats_settings: NatsSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    prefix: str,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = override(base, nats=nats_settings)
    caplog.set_level(logging.INFO)
    running = await RunningSyncer(settings).start()
    try:
        # An operator (or an inactive_threshold gone wrong) deletes the node's durable while
        # the server holds the node's pull request.
        stream = stream_name(prefix, Kind.FLEET)
        await durable_exists(js, stream, settings.durable)
        assert await js.delete_consumer(stream, settings.durable)
        await eventually(lambda: bool(logged(caplog, "consumer lost")), "the loss noticed")
        image = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("later", image))
        await eventually(lambda: present(containerd, image), "the image published after")
    finally:
        assert await running.stop() == 0
