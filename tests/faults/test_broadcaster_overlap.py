"""The log never goes backwards: overlapping broadcasters, a stale leader, an interrupted purge.

Each test drives the broadcaster's parts (a :class:`Forwarder` fed list snapshots and watch events
by hand, its :class:`Publisher` on a real nats-server) through one exact interleaving from issue
10, pausing one side at the step where the race is lost: a rolling update where the old pod still
publishes while the new one catches up; an HA leader cut off from NATS whose buffered publish
arrives after the new leader's; a broadcaster stopped between a tombstone's ack and its purge.
Nothing waits on time except a tombstone's TTL, which is polled with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from nats.js import JetStreamContext
from support.fakekube.harness import fleet as kube_fleet
from support.fakekube.harness import log_state
from support.linkproxy import LinkProxy
from support.polling import eventually

from broadcaster.catchup import LogView
from broadcaster.forwarding import Forwarder
from broadcaster.ordering import Recorded
from broadcaster.publishing import Publisher
from broadcaster.settings import Settings, WatchTarget
from broadcaster.watching import Change, Listed
from image_syncer.sandbox.nats_server import NatsServer
from wire.contract import Kind, subject_for
from wire.eventlog import LogSettings, ensure_streams, publish_event, stream_name
from wire.natsconn import NatsSettings, connect

pytestmark = pytest.mark.nats

DEADLINE = 30.0
F = ("default", "f")


def fleet(uid: str, rv: int, name: str = "f") -> dict[str, Any]:
    obj = kube_fleet(name, f"registry.example/game:{rv}")
    obj["metadata"].update(uid=uid, resourceVersion=str(rv))
    return obj


@pytest.fixture
def settings(nats_settings: NatsSettings, log_settings: LogSettings) -> Settings:
    return Settings(nats=nats_settings, log=log_settings, backoff_initial=0.05, backoff_max=0.5)


class Driven:
    """One broadcaster's forwarder, run as the runner runs it, fed by the test."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.task = asyncio.create_task(forwarder.run())

    async def feed(self, *items: Listed | Change) -> None:
        """Hand items over and wait until each is published (or skipped)."""
        for item in items:
            await self.forwarder.queue.put(item)
        await asyncio.wait_for(self.forwarder.queue.join(), DEADLINE)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class PausedView(LogView):
    """Reads the whole log, then waits for the test before handing the result over."""

    def __init__(self, js: JetStreamContext, settings: LogSettings) -> None:
        super().__init__(js, settings)
        self.read_done, self.resume = asyncio.Event(), asyncio.Event()

    async def recorded(self, kind: Kind) -> dict[tuple[str, str], Recorded]:
        state = await super().recorded(kind)
        self.read_done.set()
        await self.resume.wait()
        return state


@asynccontextmanager
async def broadcaster(
    js: JetStreamContext,
    settings: Settings,
    view: LogView | None = None,
    publisher: Publisher | None = None,
) -> AsyncIterator[Driven]:
    view = view or LogView(js, settings.log)
    publisher = publisher or Publisher(js, settings)
    driven = Driven(Forwarder(WatchTarget(Kind.FLEET), settings, publisher, view))
    try:
        yield driven
    finally:
        await driven.stop()


def listed(*objects: dict[str, Any], rv: int) -> Listed:
    return Listed(list(objects), str(rv))


async def versions(js: JetStreamContext, prefix: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The fold of the log: (uid, resourceVersion) of every live object."""
    return {key: (o.uid, o.resource_version) for key, o in (await log_state(js, prefix)).items()}


# --- bug 1: two broadcasters at once (a rolling update of the Deployment) ---------------------


async def test_a_stale_list_does_not_roll_back_what_the_other_broadcaster_published(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    async with broadcaster(js, settings) as old, broadcaster(js, settings) as new:
        await old.feed(listed(fleet("u1", 6), rv=6))
        await old.feed(Change("MODIFIED", fleet("u1", 7)))
        # The new pod listed before the update and reads the log after it.
        await new.feed(listed(fleet("u1", 6), rv=6))
        # Its own watch then reports rv 7, which JetStream drops as a duplicate of old's.
        await new.feed(Change("MODIFIED", fleet("u1", 7)))
    assert await versions(js, prefix) == {F: ("u1", "7")}


async def test_a_catch_up_planned_from_a_stale_read_of_the_log_is_refused_and_replanned(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    paused = PausedView(js, settings.log)
    async with broadcaster(js, settings) as old:
        await old.feed(listed(fleet("u1", 5), rv=5))
        async with broadcaster(js, settings, paused) as new:
            await new.forwarder.queue.put(listed(fleet("u1", 6), rv=6))
            await asyncio.wait_for(paused.read_done.wait(), DEADLINE)
            # While the new pod holds its view (rv 5), the old one restarts its watch and its
            # catch-up publishes rv 7.
            await old.feed(listed(fleet("u1", 7), rv=7))
            paused.resume.set()
            await asyncio.wait_for(new.forwarder.queue.join(), DEADLINE)
            await new.feed(Change("MODIFIED", fleet("u1", 7)))
    assert await versions(js, prefix) == {F: ("u1", "7")}


async def test_a_duplicate_delete_does_not_purge_the_recreated_fleet(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    async with broadcaster(js, settings) as old, broadcaster(js, settings) as new:
        await old.feed(listed(fleet("u1", 5), rv=5))
        await new.feed(listed(fleet("u1", 5), rv=5))
        # F is deleted and created again under a new uid; the old pod publishes both.
        await old.feed(Change("DELETED", fleet("u1", 7)), Change("ADDED", fleet("u2", 8)))
        # The new pod's watch, a step behind, reports the same delete, then the same add.
        await new.feed(Change("DELETED", fleet("u1", 7)), Change("ADDED", fleet("u2", 8)))
    assert await versions(js, prefix) == {F: ("u2", "8")}


async def test_a_list_taken_between_delete_and_recreate_does_not_delete_the_new_fleet(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    async with broadcaster(js, settings) as old, broadcaster(js, settings) as new:
        await old.feed(listed(fleet("u1", 5), rv=5))
        await old.feed(Change("DELETED", fleet("u1", 7)), Change("ADDED", fleet("u2", 8)))
        # The new pod listed at rv 7 (F absent) and reads the log after the re-create.
        await new.feed(listed(rv=7))
        await new.feed(Change("ADDED", fleet("u2", 8)))
    assert await versions(js, prefix) == {F: ("u2", "8")}


async def test_a_delete_planned_from_a_stale_read_does_not_remove_the_recreated_fleet(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    paused = PausedView(js, settings.log)
    async with broadcaster(js, settings) as old:
        await old.feed(listed(fleet("u1", 5), rv=5))
        async with broadcaster(js, settings, paused) as new:
            # The new pod reads the log (u1 live), then lists at rv 7: F is gone.
            await new.forwarder.queue.put(listed(rv=7))
            await asyncio.wait_for(paused.read_done.wait(), DEADLINE)
            await old.feed(Change("DELETED", fleet("u1", 7)), Change("ADDED", fleet("u2", 8)))
            paused.resume.set()
            await asyncio.wait_for(new.forwarder.queue.join(), DEADLINE)
            await new.feed(Change("ADDED", fleet("u2", 8)))
    assert await versions(js, prefix) == {F: ("u2", "8")}


async def test_a_fleet_that_leaves_and_reenters_the_label_selector_is_published_again(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    async with broadcaster(js, settings) as one:
        await one.feed(listed(fleet("u1", 5), rv=5))
        # A label-selected watch reports leaving the selector as a delete of the same uid...
        await one.feed(Change("DELETED", fleet("u1", 6)))
        assert await versions(js, prefix) == {}
        # ...and coming back as an add: a tombstone is final only up to its resourceVersion.
        await one.feed(Change("ADDED", fleet("u1", 7)))
    assert await versions(js, prefix) == {F: ("u1", "7")}


async def test_a_list_older_than_a_missed_delete_does_not_bring_the_fleet_back(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    async with broadcaster(js, settings) as first:
        await first.feed(listed(fleet("u1", 5), rv=5))
    # F changed at rv 6 and was deleted at rv 7 while nobody watched. One broadcaster lists at
    # rv 9 and publishes the delete it missed; another, which listed at rv 6, catches up after.
    async with broadcaster(js, settings) as current, broadcaster(js, settings) as stale:
        await current.feed(listed(rv=9))
        seq = (await js.stream_info(stream_name(prefix, Kind.FLEET))).state.last_seq
        await stale.feed(listed(fleet("u1", 6), rv=6))
        assert (await js.stream_info(stream_name(prefix, Kind.FLEET))).state.last_seq == seq
        await stale.feed(Change("DELETED", fleet("u1", 7)))
    assert await versions(js, prefix) == {}


# --- bug 2: an HA leader cut off from NATS, its publish buffered by the client ----------------


async def test_a_deposed_leaders_buffered_publish_cannot_land_over_the_new_leaders(
    nats_server: NatsServer, js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    async with LinkProxy("127.0.0.1", nats_server.port) as link:
        cut_off = await connect(NatsSettings(servers=(link.url,)), name="deposed leader")
        try:
            old_js = cut_off.jetstream()
            async with broadcaster(old_js, settings) as old:
                await old.feed(listed(fleet("u1", 5), rv=5))
                link.cut()
                await eventually(lambda: not cut_off.is_connected, "the old leader to lose NATS")
                # Its watch reports rv 6: the publish waits in the client's reconnect buffer.
                await old.forwarder.queue.put(Change("MODIFIED", fleet("u1", 6)))
                await eventually(
                    lambda: cut_off.pending_data_size > 0, "the publish to be buffered"
                )
            # The lease expired: the old leader's forwarder is cancelled (the buffer is not).
            async with broadcaster(js, settings) as new:
                await new.feed(listed(fleet("u1", 7), rv=7))
                link.restore()
                await eventually(lambda: cut_off.is_connected, "the old leader to reconnect")
                # The stream handles one connection's messages in order: once a probe sent
                # after the buffer is acked, the buffered publish has been stored or refused.
                probe = fleet("p1", 1, name="probe")
                await publish_event(old_js, settings.log, "fleet.events.added", probe)
                await new.feed(Change("MODIFIED", fleet("u1", 7)))
        finally:
            await cut_off.close()
    assert await versions(js, prefix) == {F: ("u1", "7"), ("default", "probe"): ("p1", "1")}


# --- bug 6: stopped between a tombstone's ack and the purge ------------------------------------


class PurgeGate:
    """The real JetStream context, except that a purge waits at the door until the test says."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def purge_stream(self, *args: Any, **kwargs: Any) -> bool:
        self.reached.set()
        await self.opened.wait()
        return bool(await self._js.purge_stream(*args, **kwargs))


async def test_a_purge_interrupted_after_the_tombstone_is_repaired_by_the_next_catch_up(
    nats_settings: NatsSettings, prefix: str
) -> None:
    short = LogSettings(prefix=prefix, tombstone_ttl=1.0)
    settings = Settings(nats=nats_settings, log=short, backoff_initial=0.05, backoff_max=0.5)
    nc = await connect(nats_settings, name="tests")
    try:
        js = nc.jetstream()
        await ensure_streams(js, short)
        async with broadcaster(js, settings) as first:
            await first.feed(listed(fleet("u1", 5), rv=5))
        gate = PurgeGate(js)
        async with broadcaster(js, settings, publisher=Publisher(gate, settings)) as stopping:  # type: ignore[arg-type]
            await stopping.feed(listed(fleet("u1", 5), rv=5))
            await stopping.forwarder.queue.put(Change("DELETED", fleet("u1", 6)))
            # The tombstone is acked; the broadcaster is stopped (drain timeout, lease lost)
            # before its purge of the Fleet's older messages goes out.
            await asyncio.wait_for(gate.reached.wait(), DEADLINE)
        subjects = await js.stream_info(stream_name(prefix, Kind.FLEET), subjects_filter=">")
        # The interleaving under test: the added message left over (its purge never went out).
        # The tombstone was stored (acked above) but may have expired already (1s TTL) on a
        # loaded machine; what matters is what is left once it has.
        actions = {s.split(".")[3] for s in subjects.state.subjects or {}}
        assert "added" in actions and actions <= {"added", "deleted"}, actions
        async with broadcaster(js, settings) as restarted:
            await restarted.feed(listed(rv=9))
        await eventually(lambda: tombstone_gone(js, prefix), "the tombstone to expire")
        assert await versions(js, prefix) == {}, "the deleted Fleet came back"
    finally:
        await nc.close()


async def tombstone_gone(js: JetStreamContext, prefix: str) -> bool:
    info = await js.stream_info(stream_name(prefix, Kind.FLEET), subjects_filter=">")
    return not any(".deleted." in s for s in info.state.subjects or {})


async def test_an_undecodable_newest_message_is_overwritten_not_fought(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    async with broadcaster(js, settings) as one:
        await one.feed(listed(rv=4))
        # Someone with the admin credentials wrote junk on the Fleet's subject.
        await js.publish(subject_for(prefix, "fleet.events.added", *F), b"{not json")
        await one.feed(Change("ADDED", fleet("u1", 5)))
    assert await versions(js, prefix) == {F: ("u1", "5")}
