"""What an idle syncer costs the cluster, counted by a real nats-server of the test's own.

The only client messages an idle node may send are its long poll (one held pull request per
expiry) and its heartbeat (``beat.<node>``, a few dozen bytes). Node images and replay requests
are pushed to it; its status entry is written only when something a reader uses changed, not
every reconcile. Every message the syncer sends is seen here through a subscription on ``>``
(the server delivers each to it), and the server's own ``in_msgs`` is read beside.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from support.fleetdicts import fleet
from support.polling import eventually
from support.syncer_harness import RunningSyncer, settings_with
from support.tmpfs import tmpfs_containerd

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from wire.contract import AGONES_SDK_SOURCE, NodeImages
from wire.eventlog import (
    MAX_CONSUMERS,
    LogSettings,
    ensure_node_images_stream,
    ensure_streams,
    node_images_stream_name,
    publish_event,
    publish_node_images,
)
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    StatusSettings,
    beat_key,
    decode_status,
    ensure_status_bucket,
    list_statuses,
    node_key,
)

pytestmark = [pytest.mark.nats, pytest.mark.cri]

PREFIX = "idle"
NODE = "node-idle.example"
BEATS = 3


def in_msgs(server: NatsServer) -> int:
    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5) as response:
        count: int = json.load(response)["in_msgs"]
        return count


@pytest.fixture
async def admin(own_nats_server: NatsServer) -> AsyncIterator[Client]:
    nc = await connect(NatsSettings(servers=(own_nats_server.url,)), name="test admin")
    yield nc
    await nc.close()


class Seen:
    """Every client message on the server, by subject, in the order the server delivered them."""

    def __init__(self) -> None:
        self.subjects: list[str] = []

    async def record(self, msg: Msg) -> None:
        # Inbox traffic and advisories are the server's: replies, deliveries, heartbeats.
        if not msg.subject.startswith(("_INBOX.", "$JS.EVENT.")):
            self.subjects.append(msg.subject)

    def count(self, subject: str) -> int:
        return self.subjects.count(subject)


@pytest.fixture
def quiet_containerd(tmp_path: Path) -> Iterator[Containerd]:
    """Its image filesystem a tmpfs of its own: the suite's other tests write to the machine's
    disk meanwhile, and its usage is part of the node's status."""
    with tmpfs_containerd(tmp_path / "ctrd", "256m") as runtime:
        yield runtime


def _grow_within_the_percent(root: Path) -> None:
    """Write half of what the filesystem under ``root`` may still take before its used share
    reaches the next whole percent."""
    stat = os.statvfs(root)
    capacity = stat.f_blocks * stat.f_frsize
    used = capacity - stat.f_bavail * stat.f_frsize
    room = (math.floor(used * 100 / capacity) + 1) * capacity // 100 - used
    (root / "growing.log").write_bytes(b"x" * (room // 2))


async def test_an_idle_syncer_sends_only_its_poll_and_its_heartbeat(
    own_nats_server: NatsServer,
    admin: Client,
    quiet_containerd: Containerd,
    push: Callable[..., str],
) -> None:
    containerd = quiet_containerd
    js = admin.jetstream()
    log = LogSettings(prefix=PREFIX)
    status = StatusSettings(prefix=PREFIX)
    # What the install and the broadcaster create before any node runs.
    await ensure_streams(js, log)
    await ensure_node_images_stream(js, log)
    await publish_node_images(js, log, NodeImages(AGONES_SDK_SOURCE, [push()]))
    kv = await ensure_status_bucket(js, status)
    await publish_event(js, log, "fleet.events.added", fleet("idle", push()))
    seen = Seen()
    await admin.subscribe(">", cb=seen.record)
    settings = settings_with(
        node_name=NODE,
        cri_endpoint=containerd.endpoint,
        # Many reconciles per heartbeat: each used to rewrite the whole status entry.
        sync_period=0.3,
        pull_timeout=30.0,
        subject_prefix=PREFIX,
        metrics_addr="",
        status_interval=0.2,
        status_heartbeat=2.0,
        fetch_expiry=3.0,
        fetch_heartbeat=1.0,
        nats=NatsSettings(servers=(own_nats_server.url,)),
    )
    node_subject = f"$KV.{status.bucket}.{node_key(NODE)}"
    beat_subject = f"$KV.{status.bucket}.{beat_key(NODE)}"
    running = await RunningSyncer(settings).start()
    try:

        async def settled() -> bool:
            entry = decode_status((await kv.get(node_key(NODE))).value or b"")
            pins = entry.summary.pins
            # Pinned too: a pin finishing late (its ledger record, then the status saying so)
            # is the end of the work, not idle traffic.
            return (
                len(entry.summary.fleets) == 1
                and not entry.summary.missing
                and pins is not None
                and pins.images > 0
                and pins.pinned == pins.images
            )

        await eventually(settled, "the node holds its images", tolerate=(KeyNotFoundError,))
        await admin.flush()
        start, before = len(seen.subjects), await asyncio.to_thread(in_msgs, own_nats_server)

        def writes() -> int:
            return seen.count(beat_subject) + seen.count(node_subject)

        # A window of BEATS writes of either kind: an idle node's are all heartbeats, even
        # while its disk moves (logs, other pods) by less than a whole percent.
        _grow_within_the_percent(containerd.state_dir / "root")
        base = writes()
        await eventually(lambda: writes() >= base + BEATS, f"{BEATS} more status writes")
        after = await asyncio.to_thread(in_msgs, own_nats_server)
        await admin.flush()
        window = seen.subjects[start:]

        msg_next = f"$JS.API.CONSUMER.MSG.NEXT.{PREFIX.upper()}_FLEETS.syncer-node-idle_example"
        others = sorted({s for s in window if s not in (beat_subject, msg_next)})
        assert others == [], f"an idle syncer sent {others}"
        assert window.count(node_subject) == 0
        # Each poll is held for the whole expiry: at most one per expiry, plus the one running.
        polls = window.count(msg_next)
        assert polls <= BEATS * settings.status.heartbeat / settings.consumer.fetch_expiry + 1
        assert after - before <= len(window) + 1, (after - before, window)

        # The reader still sees the reconciles: the heartbeat carries the last one's time.
        entry = decode_status((await kv.get(node_key(NODE))).value or b"")
        statuses, _ = await list_statuses(kv)
        last = statuses[NODE].summary.last_reconcile
        assert last is not None and entry.summary.last_reconcile is not None
        assert last > entry.summary.last_reconcile

        # And news is still written at once.
        entries = seen.count(node_subject)
        await publish_event(js, log, "fleet.events.added", fleet("news", push()))
        await eventually(lambda: seen.count(node_subject) > entries, "the news written")
        written = msgspec.json.decode((await kv.get(node_key(NODE))).value or b"")
        assert "default/news" in written["summary"]["fleets"]
    finally:
        assert await running.stop() == 0


async def test_the_streams_of_the_pushed_consumers_admit_one_per_node_past_a_thousand(
    admin: Client,
) -> None:
    # nats-server caps a stream at 1,000 consumers unless it sets its own limit: with one pushed
    # consumer per node on each, the 1,001st node could follow neither (seen at 2,000 simulated
    # nodes: "maximum consumers limit reached", re-created over and over).
    js = admin.jetstream()
    log = LogSettings(prefix=PREFIX)
    status = StatusSettings(prefix=PREFIX)
    await ensure_node_images_stream(js, log)
    await ensure_status_bucket(js, status)
    for stream in (node_images_stream_name(PREFIX), f"KV_{status.bucket}"):
        assert (await js.stream_info(stream)).config.max_consumers == MAX_CONSUMERS, stream
