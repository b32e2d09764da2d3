"""The broadcaster against a real nats-server and the fake API server, through the real client.

Each test runs the broadcaster in-process as an asyncio task and waits, with a deadline, for the
event log to reach the state the cluster is in.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
from nats.js import JetStreamContext
from support.broadcaster_harness import broadcasting, counter
from support.broadcaster_harness import settings_fixture as settings_fixture
from support.fakekube import FakeKube
from support.fakekube.harness import fleet, gameserver, log_messages, wait_converged, with_image
from support.polling import eventually as wait_until

from broadcaster import metrics
from broadcaster.runner import run
from broadcaster.settings import Settings
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from ops.logs import fields_of
from ops.serving import Health
from wire.contract import Kind, message_id
from wire.eventlog import stream_name
from wire.natsconn import NatsSettings, connect

pytestmark = pytest.mark.nats


async def test_add_update_delete_reach_the_stream(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    before = kube.create("fleets", fleet("before", "game:1"))
    async with broadcasting(settings):
        await wait_converged(js, prefix, kube.objects())
        created = kube.create("fleets", fleet("simple.game", "game:1", namespace="team-a"))
        updated = kube.update("fleets", with_image(created, "game:2"))
        deleted = kube.delete("fleets", "default", "before")
        fresh = kube.create("fleets", fleet("fresh", "game:3"))
        await wait_converged(js, prefix, kube.objects())

    messages = await log_messages(js, prefix)
    by_subject = {m.subject: m for m in messages}
    # An update supersedes the object's added message and a delete all of them: the log keeps
    # one message per object.
    assert sorted(by_subject) == sorted(
        [
            f"{prefix}.fleet.events.added.default.fresh",
            f"{prefix}.fleet.events.updated.team-a.simple_game",
            f"{prefix}.fleet.events.deleted.default.before",
        ]
    )
    added = by_subject[f"{prefix}.fleet.events.added.default.fresh"]
    assert added.event.obj.metadata.uid == fresh["metadata"]["uid"]
    update = by_subject[f"{prefix}.fleet.events.updated.team-a.simple_game"]
    assert update.event.obj.metadata.resource_version == updated["metadata"]["resourceVersion"]
    assert update.event.old is not None
    assert update.event.old.metadata.resource_version == created["metadata"]["resourceVersion"]
    assert (update.event.obj.pod_spec.containers or [])[0].image == "game:2"
    assert update.headers["Nats-Msg-Id"] == message_id(
        updated["metadata"]["uid"], updated["metadata"]["resourceVersion"], "fleet.events.updated"
    )
    tombstone = by_subject[f"{prefix}.fleet.events.deleted.default.before"]
    assert tombstone.event.obj.metadata.uid == before["metadata"]["uid"]
    assert tombstone.event.obj.metadata.resource_version == deleted["metadata"]["resourceVersion"]


async def test_envelope_is_the_go_broadcasters_shape_without_managed_fields(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    import json

    async with broadcasting(settings):
        kube.create("fleets", fleet("shape"))
        await wait_converged(js, prefix, kube.objects())
    message = await js.get_last_msg(
        stream_name(prefix, settings.kinds[0]), f"{prefix}.fleet.events.added.default.shape"
    )
    assert message.data is not None
    envelope = json.loads(message.data)
    assert envelope["header"] == {"headers": {"event_type": "fleet.events.added"}}
    assert envelope["message"]["kind"] == "Fleet"
    assert envelope["message"]["apiVersion"] == "agones.dev/v1"
    assert "managedFields" not in envelope["message"]["metadata"]


async def test_a_second_broadcaster_stores_nothing_twice(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    kind = str(settings.kinds[0])

    def settled() -> float:
        # Every change each process saw ends in one of these: acked (stored or a duplicate),
        # refused as stale by the log (the other process wrote first), or skipped as known.
        return (
            sum(
                counter(metrics.EVENTS_PUBLISHED, event_type=t)
                for t in ("fleet.events.added", "fleet.events.updated")
            )
            + counter(metrics.EVENTS_SUPERSEDED, kind=kind)
            + counter(metrics.EVENTS_SKIPPED, kind=kind)
        )

    start = settled()
    second = replace(settings, metrics_addr=f"127.0.0.1:{free_port()}")
    async with broadcasting(settings), broadcasting(second):
        obj = kube.create("fleets", fleet("twice", "game:1"))
        for version in (2, 3, 4):
            obj = kube.update("fleets", with_image(obj, f"game:{version}"))
        await wait_converged(js, prefix, kube.objects())
        await wait_until(lambda: settled() - start >= 8, "both broadcasters to settle 4 changes")
    # ...but JetStream stored each change once.
    info = await js.stream_info(stream_name(prefix, settings.kinds[0]))
    assert info.state.last_seq == 4


async def test_compaction_keeps_the_newest_event_per_fleet(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    async with broadcasting(settings):
        obj = kube.create("fleets", fleet("busy", "game:0"))
        other = kube.create("fleets", fleet("quiet", "game:0"))
        for version in range(1, 6):
            obj = kube.update("fleets", with_image(obj, f"game:{version}"))
        await wait_converged(js, prefix, kube.objects())

    messages = await log_messages(js, prefix)
    busy = [m for m in messages if m.subject.endswith(".default.busy")]
    assert [m.event.action for m in busy] == ["updated"]
    assert busy[-1].event.obj.metadata.resource_version == obj["metadata"]["resourceVersion"]
    assert (busy[-1].event.obj.pod_spec.containers or [])[0].image == "game:5"
    quiet = [m for m in messages if m.subject.endswith(".default.quiet")]
    assert [m.event.obj.metadata.uid for m in quiet] == [other["metadata"]["uid"]]


async def test_namespace_and_label_selector_filter_what_is_published(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    filtered = replace(
        settings, namespaces=("ns-a", "ns-b"), label_selector="team in (red),!legacy"
    )
    red = {"team": "red"}
    async with broadcasting(filtered):
        kube.create("fleets", fleet("a", namespace="ns-a", labels=red))
        kube.create("fleets", fleet("b", namespace="ns-b", labels=red))
        kube.create("fleets", fleet("other-ns", namespace="ns-c", labels=red))
        kube.create("fleets", fleet("blue", namespace="ns-a", labels={"team": "blue"}))
        kube.create("fleets", fleet("old", namespace="ns-a", labels={**red, "legacy": "1"}))
        wanted = [o for o in kube.objects() if o["metadata"]["name"] in ("a", "b")]
        await wait_converged(js, prefix, wanted)

        # Leaving the selector reads as a delete, entering it as an add.
        b = kube.get("fleets", "ns-b", "b")
        blue = kube.get("fleets", "ns-a", "blue")
        assert b is not None and blue is not None
        b["metadata"]["labels"] = {"team": "blue"}
        blue["metadata"]["labels"] = red
        kube.update("fleets", b)
        kube.update("fleets", blue)
        wanted = [o for o in kube.objects() if o["metadata"]["name"] in ("a", "blue")]
        state = await wait_converged(js, prefix, wanted)
    assert state[("ns-a", "blue")].event_type == "fleet.events.added"
    subjects = [m.subject for m in await log_messages(js, prefix)]
    assert f"{prefix}.fleet.events.deleted.ns-b.b" in subjects
    assert not [s for s in subjects if ".ns-c." in s or s.endswith(".old")]


@pytest.mark.parametrize("when", ["mid-stream", "on-reconnect"])
async def test_watch_expiry_publishes_the_delete_made_during_the_gap(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str, when: str
) -> None:
    expired_before = counter(metrics.WATCH_RESTARTS, kind="fleet", reason="expired")
    keep = kube.create("fleets", fleet("keep", "game:1"))
    kube.create("fleets", fleet("gone"))
    async with broadcasting(settings):
        await wait_converged(js, prefix, kube.objects())
        kube.wait_for_watches(1)
        with kube.hold_watches():
            if when == "on-reconnect":
                kube.drop_watches()
            kube.delete("fleets", "default", "gone")
            kube.update("fleets", with_image(keep, "game:2"))
            kube.create("fleets", fleet("new"))
            kube.compact()
        state = await wait_converged(js, prefix, kube.objects())
        assert counter(metrics.WATCH_RESTARTS, kind="fleet", reason="expired") > expired_before
    assert state[("default", "keep")].image == "game:2"
    subjects = [m.subject for m in await log_messages(js, prefix)]
    assert f"{prefix}.fleet.events.deleted.default.gone" in subjects


async def test_bookmarks_move_the_resume_point_so_no_relist_is_needed(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    scoped = replace(settings, namespaces=("watched",))
    async with broadcasting(scoped):
        kube.wait_for_watches(1)
        lists = kube.list_calls()
        # Traffic the watch does not see, then a bookmark carrying the newer resourceVersion.
        for i in range(3):
            kube.create("fleets", fleet(f"elsewhere-{i}", namespace="unwatched"))
        kube.bookmark()
        await wait_until(lambda: _bookmarked(kube), "the bookmark to be sent")
        kube.compact()
        kube.drop_watches()
        kube.create("fleets", fleet("seen", namespace="watched"))
        wanted = [o for o in kube.objects() if o["metadata"]["namespace"] == "watched"]
        await wait_converged(js, prefix, wanted)
        assert kube.list_calls() == lists


def _bookmarked(kube: FakeKube) -> bool:
    return kube.bookmarks_sent > 0


async def test_restart_converges_to_what_changed_while_away(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    kept = kube.create("fleets", fleet("kept", "game:1"))
    kube.create("fleets", fleet("removed"))
    recreated = kube.create("fleets", fleet("recreated", "game:1"))
    kube.create("fleets", fleet("untouched"))
    async with broadcasting(settings):
        await wait_converged(js, prefix, kube.objects())

    kube.update("fleets", with_image(kept, "game:2"))
    kube.delete("fleets", "default", "removed")
    kube.delete("fleets", "default", "recreated")
    new = kube.create("fleets", fleet("recreated", "game:9"))
    kube.create("fleets", fleet("added-while-away"))
    seq_before = (await js.stream_info(stream_name(prefix, settings.kinds[0]))).state.last_seq

    async with broadcasting(settings):
        state = await wait_converged(js, prefix, kube.objects())
    assert state[("default", "kept")].image == "game:2"
    assert (
        state[("default", "recreated")].uid
        == new["metadata"]["uid"]
        != recreated["metadata"]["uid"]
    )
    messages = await log_messages(js, prefix)
    fresh = {
        m.subject.removeprefix(f"{prefix}.fleet.events.") for m in messages if m.seq > seq_before
    }
    # Exactly what changed: nothing for the untouched Fleet. The re-created Fleet was published
    # as the old uid's delete, then the new uid's add, which supersedes that tombstone.
    assert fresh == {
        "updated.default.kept",
        "deleted.default.removed",
        "added.default.recreated",
        "added.default.added-while-away",
    }
    last_seq = (await js.stream_info(stream_name(prefix, settings.kinds[0]))).state.last_seq
    assert last_seq - seq_before == 5


async def test_nats_restart_while_running_loses_nothing(
    kube: FakeKube, settings: Settings, own_nats_server: NatsServer, prefix: str
) -> None:
    own = replace(settings, nats=NatsSettings(servers=(own_nats_server.url,)))
    nc = await connect(own.nats, name="test")
    try:
        js = nc.jetstream()
        async with broadcasting(own):
            first = kube.create("fleets", fleet("first", "game:1"))
            await wait_converged(js, prefix, kube.objects())
            own_nats_server.stop()
            kube.update("fleets", with_image(first, "game:2"))
            kube.create("fleets", fleet("during-outage"))
            own_nats_server.start()
            kube.create("fleets", fleet("after-outage"))
            await wait_converged(js, prefix, kube.objects(), timeout=60)
            own_nats_server.restart()
            kube.delete("fleets", "default", "first")
            state = await wait_converged(js, prefix, kube.objects(), timeout=60)
        assert set(state) == {("default", "during-outage"), ("default", "after-outage")}
    finally:
        await nc.close()


async def test_gameservers_go_to_their_own_stream(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    both = replace(settings, kinds=(Kind.FLEET, Kind.GAMESERVER))
    async with broadcasting(both):
        kube.create("fleets", fleet("f"))
        kube.create("gameservers", gameserver("gs-1", "game:7"))
        await wait_converged(js, prefix, kube.objects("fleets"))
        state = await wait_converged(js, prefix, kube.objects("gameservers"), kind=Kind.GAMESERVER)
    assert state[("default", "gs-1")].image == "game:7"
    assert state[("default", "gs-1")].event_type == "gameserver.events.added"


async def test_readyz_and_metrics_answer(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    async with broadcasting(settings):
        kube.create("fleets", fleet("probed"))
        await wait_converged(js, prefix, kube.objects())
        base = f"http://{settings.metrics_addr}"
        ready = await asyncio.to_thread(_get, f"{base}/readyz")
        live = await asyncio.to_thread(_get, f"{base}/healthz")
        exposition = await asyncio.to_thread(_get, f"{base}/metrics")
    assert ready == (200, "ok\n")
    assert live[0] == 200
    text = exposition[1]
    assert (
        'image_syncer_broadcaster_events_published_total{event_type="fleet.events.added"}' in text
    )
    assert "image_syncer_broadcaster_last_publish_timestamp_seconds" in text
    assert "image_syncer_broadcaster_publish_errors_total" in text


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


async def test_a_missing_fleet_crd_is_one_line_naming_it_until_installed(
    kube: FakeKube,
    settings: Settings,
    js: JetStreamContext,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Agones not installed: the real server's plain 404 names nothing, so the broadcaster must."""
    caplog.set_level(logging.INFO, logger="broadcaster")
    kube.unserve("fleets")
    missing = counter(metrics.CRD_MISSING, crd="fleets.agones.dev")
    async with broadcasting_unready(replace(settings, missing_crd_log_interval=3600.0)):
        # Several lists refused, and one line said for all of them.
        await wait_until(
            lambda: counter(metrics.CRD_MISSING, crd="fleets.agones.dev") >= missing + 3,
            "the list to be retried while the CRD is missing",
        )
        said = [r for r in caplog.records if r.getMessage().startswith("CRD not installed")]
        assert len(said) == 1
        assert fields_of(said[0])["crd"] == "fleets.agones.dev"
        assert said[0].levelno == logging.WARNING
        assert not [r for r in caplog.records if r.getMessage() == "list failed, retrying"]
        # Agones is installed: the broadcaster lists, says so once, and publishes.
        kube.serve("fleets")
        kube.create("fleets", fleet("late", "game:1"))
        await wait_converged(js, prefix, kube.objects())
        assert [r for r in caplog.records if r.getMessage() == "CRD installed, listing"]


@asynccontextmanager
async def broadcasting_unready(settings: Settings) -> AsyncIterator[None]:
    """Run the broadcaster until the block ends, without waiting for it to be ready."""
    stopping = asyncio.Event()
    task = asyncio.create_task(run(settings, stopping, health=Health()))
    try:
        yield
    finally:
        stopping.set()
        assert await asyncio.wait_for(task, 30) == 0
