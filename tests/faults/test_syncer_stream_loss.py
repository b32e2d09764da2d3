"""The node converges on the log as it is now after the log's stream was lost and re-created,
after a partition that outlived a deleted Fleet's tombstone, and on its refold timer.

Both against the real thing: nats-server, containerd and docker-registry, the syncer in-process.
The stream is deleted and re-created as ``Publisher``'s repair or an operator would; the partition
is a TCP relay (tests/support/linkcut.py) between the syncer and nats-server, cut while the test keeps
publishing on a direct connection. Each waits for an end state with a deadline; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import nats.js.errors
import pytest
from nats.js import JetStreamContext
from support.faults_harness import eventually
from support.linkcut import Link
from support.syncer_harness import (
    RunningSyncer,
    fleet,
    info_logs_fixture,
    logged,
    override,
    settings_fixture,
)

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from syncer.settings import SyncerSettings
from wire.contract import Kind, subject_for
from wire.eventlog import LogSettings, ensure_streams, publish_event, stream_name
from wire.natsconn import NatsSettings
from wire.nodestatus import NodeStatus, StatusSettings, get_status, open_status_bucket

pytestmark = [pytest.mark.nats, pytest.mark.cri]

settings = settings_fixture
info_logs = info_logs_fixture


async def _status(js: JetStreamContext, settings: SyncerSettings) -> NodeStatus | None:
    kv = await open_status_bucket(js, StatusSettings(prefix=settings.subject_prefix))
    return await get_status(kv, settings.node_name) if kv is not None else None


async def _reports(js: JetStreamContext, settings: SyncerSettings, seqs: dict[str, int]) -> bool:
    status = await _status(js, settings)
    return status is not None and status.summary.fleets == seqs


async def test_a_recreated_stream_is_followed_from_its_first_sequence(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    old, new, dropped, added = push(), push(), push(), push()
    publish = publish_event
    running = await RunningSyncer(settings).start()
    try:
        await publish(js, log_settings, "fleet.events.added", fleet("a", old))
        await publish(js, log_settings, "fleet.events.added", fleet("b", dropped))
        for rv in ("2", "3", "4"):  # sequences the new stream will reach again
            await publish(js, log_settings, "fleet.events.updated", fleet("b", dropped, rv=rv))
        await eventually(lambda: {old, dropped} <= containerd.image_refs(), "first images")
        await eventually(
            lambda: _reports(js, settings, {"default/a": 1, "default/b": 5}), "seqs reported"
        )
        old_stream = await js.stream_info(stream_name(settings.subject_prefix, Kind.FLEET))
        before = await _status(js, settings)
        assert before is not None and before.summary.log_created == old_stream.created

        # The stream is lost and created again: its sequences restart at 1.
        await js.delete_stream(stream_name(settings.subject_prefix, Kind.FLEET))
        await ensure_streams(js, log_settings)
        await publish(js, log_settings, "fleet.events.added", fleet("d", added))  # seq 1
        await publish(js, log_settings, "fleet.events.updated", fleet("a", new, rv="5"))  # seq 2

        await eventually(lambda: {new, added} <= containerd.image_refs(), "the new log followed")
        # The node states the new log's sequences, so `wait` judges it on the new images; the
        # Fleet the new log does not hold is gone from the node.
        await eventually(
            lambda: _reports(js, settings, {"default/a": 2, "default/d": 1}),
            "the new stream's sequences reported, and only its Fleets",
        )
        status = await _status(js, settings)
        assert status is not None
        assert set(status.summary.fleets) == {"default/a", "default/d"}
        # ...and says which stream they are of, so `wait` never compares across the two.
        info = await js.stream_info(stream_name(settings.subject_prefix, Kind.FLEET))
        assert status.summary.log_created == info.created
    finally:
        assert await running.stop() == 0


@pytest.fixture
async def link(nats_server: NatsServer) -> AsyncIterator[Link]:
    relay = await Link.to(nats_server.url).start()
    yield relay
    await relay.close()


async def _holds_nothing_of(js: JetStreamContext, settings: SyncerSettings, name: str) -> bool:
    stream = stream_name(settings.subject_prefix, Kind.FLEET)
    for action in ("added", "updated", "deleted"):
        subject = subject_for(settings.subject_prefix, f"fleet.events.{action}", "default", name)
        try:
            await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            continue
        return False
    return True


async def test_a_fleet_deleted_while_the_node_was_cut_off_longer_than_its_tombstone_is_dropped(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    link: Link,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gone, kept = push(), push()
    short_tombstones = replace(log_settings, tombstone_ttl=1.0)
    cut_off = override(
        settings,
        nats=NatsSettings(servers=(link.url,)),
        remove_unused=True,
        remove_grace=0.0,
        # Writes land well after the removal: the read below must wait for them (it did not,
        # and failed on a loaded machine, where the throttle of 0.2s was enough for the race).
        status_interval=3.0,
    )
    running = await RunningSyncer(cut_off).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("gone", gone))
        await publish_event(js, log_settings, "fleet.events.added", fleet("kept", kept))
        await eventually(lambda: {gone, kept} <= containerd.image_refs(), "both pulled")

        await link.cut()
        await eventually(
            lambda: any(r.getMessage().startswith("nats disconnected") for r in caplog.records),
            "the syncer cut off",
        )
        await publish_event(
            js, short_tombstones, "fleet.events.deleted", fleet("gone", gone, rv="2")
        )
        # The delete was never delivered, and now nothing in the log says the Fleet existed.
        await eventually(lambda: _holds_nothing_of(js, settings, "gone"), "the tombstone expired")
        assert not logged(caplog, "fleet deleted", fleet="default/gone")
        await link.restore()
        await eventually(
            lambda: any(r.getMessage().startswith("nats reconnected") for r in caplog.records),
            "the syncer back on NATS",
        )

        await eventually(
            lambda: gone not in containerd.image_refs(), "the deleted Fleet's image removed"
        )
        # The status is written apart from the removal (at most once per --status-interval):
        # the image may be gone before the entry saying so lands. Wait for it, as `wait` does.
        await eventually(lambda: _reports_fleets(js, cut_off, {"default/kept"}), "status")
        assert kept in containerd.image_refs()
    finally:
        await link.restore()
        assert await running.stop() == 0


async def test_the_refold_timer_drops_a_fleet_gone_from_the_log_without_an_event(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gone, kept = push(), push()
    running = await RunningSyncer(override(settings, refold_period=1.0)).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("gone", gone))
        await publish_event(js, log_settings, "fleet.events.added", fleet("kept", kept))
        await eventually(
            lambda: _reports_fleets(js, settings, {"default/gone", "default/kept"}), "both folded"
        )

        # The Fleet leaves the log with no event at all (what an expired tombstone leaves
        # behind), while the node stays connected: only the timer can notice.
        subject = subject_for(settings.subject_prefix, "fleet.events.added", "default", "gone")
        await js.purge_stream(stream_name(settings.subject_prefix, Kind.FLEET), subject=subject)

        await eventually(lambda: _reports_fleets(js, settings, {"default/kept"}), "dropped")
        assert logged(caplog, "fleet gone from the log, dropped", fleet="default/gone")
        assert any(getattr(r, "trigger", None) == "timer" for r in caplog.records)
    finally:
        assert await running.stop() == 0


async def _reports_fleets(js: JetStreamContext, settings: SyncerSettings, fleets: set[str]) -> bool:
    status = await _status(js, settings)
    return status is not None and set(status.summary.fleets) == fleets
