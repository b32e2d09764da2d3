"""Errors no retry can fix end the attempt: one line, one metric, and the next event flows.

An oversized Fleet (over the size of a message) or a request JetStream rejects (4xx: over the
stream's max message size) used to be retried forever like a lost connection, wedging the
forwarder and every event behind it. Here each reaches a real nats-server through the
broadcaster's own forwarder and publisher.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from support.fakekube.harness import fleet as kube_fleet
from support.fakekube.harness import log_state

from broadcaster.catchup import LogView
from broadcaster.forwarding import Forwarder
from broadcaster.publishing import Outcome, Publisher
from broadcaster.settings import Settings, WatchTarget
from broadcaster.watching import Change, Listed
from wire.contract import MAX_EVENT_BYTES, Kind
from wire.eventlog import LogSettings, stream_config, stream_name
from wire.natsconn import NatsSettings

pytestmark = pytest.mark.nats

DEADLINE = 30.0
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def fleet(name: str, rv: int, **extra: Any) -> dict[str, Any]:
    obj = kube_fleet(name, f"registry.example/game:{rv}")
    obj["metadata"].update(uid=f"uid-{name}", resourceVersion=str(rv))
    obj.update(extra)
    return obj


def refused(reason: str) -> float:
    labels = {"kind": "fleet", "reason": reason}
    return REGISTRY.get_sample_value("image_syncer_broadcaster_events_refused_total", labels) or 0


@pytest.fixture
def settings(nats_settings: NatsSettings, log_settings: LogSettings) -> Settings:
    return Settings(nats=nats_settings, log=log_settings, backoff_initial=0.05, backoff_max=0.5)


async def forward(js: JetStreamContext, settings: Settings, *items: Listed | Change) -> None:
    forwarder = Forwarder(
        WatchTarget(Kind.FLEET), settings, Publisher(js, settings), LogView(js, settings.log)
    )
    task = asyncio.create_task(forwarder.run())
    try:
        for item in items:
            await forwarder.queue.put(item)
        await asyncio.wait_for(forwarder.queue.join(), DEADLINE)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_oversized_update_is_trimmed_of_what_no_reader_needs(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    # Each of the old object, the status and kubectl's last-applied copy is enough to push the
    # update over a message with the notes; the notes alone fit (and readers may need them).
    bulky, notes = "x" * (MAX_EVENT_BYTES // 2), "n" * (MAX_EVENT_BYTES // 2)
    before = fleet("big", 1, status={"note": bulky})
    after = fleet("big", 2, status={"note": bulky})
    after["metadata"]["annotations"] = {LAST_APPLIED: bulky, "team/notes": notes}
    await forward(js, settings, Listed([before], "1"), Change("MODIFIED", after))

    assert {k: o.resource_version for k, o in (await log_state(js, prefix)).items()} == {
        ("default", "big"): "2"
    }
    stored = await js.get_last_msg(
        stream_name(prefix, Kind.FLEET), f"{prefix}.fleet.events.updated.default.big"
    )
    assert stored.data is not None
    update = json.loads(stored.data)["message"]
    assert update["old_obj"] is None and "status" not in update["new_obj"]
    assert update["new_obj"]["metadata"]["annotations"] == {"team/notes": notes}
    assert update["new_obj"]["spec"] == after["spec"], "what the syncer reads is kept whole"


async def test_a_fleet_too_large_even_trimmed_is_refused_once_and_the_next_event_flows(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    huge = fleet("huge", 3)
    huge["metadata"]["annotations"] = {"team/notes": "x" * MAX_EVENT_BYTES}
    publisher = Publisher(js, settings)
    start = refused("too_large")
    result = await asyncio.wait_for(publisher.publish("fleet.events.added", huge), DEADLINE)
    assert result.outcome is Outcome.REFUSED
    assert refused("too_large") == start + 1

    await forward(
        js, settings, Listed([], "3"), Change("ADDED", huge), Change("ADDED", fleet("next", 4))
    )
    assert set(await log_state(js, prefix)) == {("default", "next")}
    assert refused("too_large") == start + 2


async def test_a_request_jetstream_rejects_is_refused_not_retried(
    js: JetStreamContext, settings: Settings, log_settings: LogSettings, prefix: str
) -> None:
    # An operator capped the stream's message size below this Fleet's.
    config = stream_config(log_settings, Kind.FLEET)
    config.max_msg_size = 4096
    await js.update_stream(config)
    wide = fleet("wide", 5)
    wide["metadata"]["annotations"] = {"team/notes": "x" * 8192}
    start = refused("rejected")

    await forward(
        js, settings, Listed([], "5"), Change("ADDED", wide), Change("ADDED", fleet("next", 6))
    )
    assert set(await log_state(js, prefix)) == {("default", "next")}
    assert refused("rejected") == start + 1


async def test_the_delete_of_a_fleet_too_large_to_update_still_removes_it(
    js: JetStreamContext, settings: Settings, prefix: str
) -> None:
    small = fleet("grown", 7)
    grown = fleet("grown", 8)
    grown["spec"]["template"]["spec"]["ports"] = [{"name": "x" * MAX_EVENT_BYTES}]
    gone = {**grown, "metadata": {**grown["metadata"], "resourceVersion": "9"}}
    # The update cannot be stored (the log keeps version 7); the delete must be, or the
    # Fleet would stay on every node for good. A tombstone needs no spec: only its name.
    await forward(
        js, settings, Listed([small], "7"), Change("MODIFIED", grown), Change("DELETED", gone)
    )
    assert await log_state(js, prefix) == {}
