"""Node status in NATS KV: the contract, the syncer's reporter, and replay requests.

Everything runs against the real nats-server; the reporter's clocks are injected so throttling
and heartbeats are decided by the test's clock, never by how fast this machine happens to be.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext
from support.polling import DEADLINE, eventually

from image_syncer.sandbox.nats_server import NatsServer
from syncer.reporting.replaykv import (
    PendingReplay,
    complete_replay,
    pending_replay,
    watch_replay_requests,
)
from syncer.reporting.reporter import StatusReporter
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    DEFAULT_BUCKET,
    DiskSummary,
    FleetGap,
    Heartbeat,
    Missing,
    MissingState,
    NodeState,
    NodeStatus,
    OutdatedEntry,
    PinSummary,
    StatusError,
    StatusSettings,
    StatusWatch,
    bucket_name,
    decode_status,
    encode_status,
    ensure_status_bucket,
    get_status,
    is_stale,
    list_statuses,
    node_key,
    parse_fleet,
    put_heartbeat,
    put_status,
    request_replay,
    summarize,
)
from wire.readiness import FleetTarget, Readiness, fleet_progress, node_readiness

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Clocks:
    """A monotonic and a wall clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.now)


@pytest.fixture
def settings(prefix: str) -> StatusSettings:
    return StatusSettings(prefix=prefix)


def reporter(
    js: JetStreamContext,
    settings: StatusSettings,
    state: list[NodeState],
    clocks: Clocks,
    **kw: Any,
) -> StatusReporter:
    return StatusReporter(
        js,
        settings,
        "node-a",
        lambda: state[0],
        version="1.2.3",
        interval=5.0,
        heartbeat=30.0,
        clock=clocks.monotonic,
        wall_clock=clocks.wall,
        **kw,
    )


# --- Contract -------------------------------------------------------------------------------


def test_bucket_is_named_after_the_prefix() -> None:
    assert bucket_name("agones") == DEFAULT_BUCKET == "IMAGE_SYNCER_NODES"
    assert bucket_name("t1.dev") == "IMAGE_SYNCER_NODES_T1_DEV"


def test_fleet_and_node_names_are_checked() -> None:
    assert parse_fleet("default/simple-game-server") == "default/simple-game-server"
    for bad in ("simple", "default/", "/x", "Default/x", "a/b/c"):
        with pytest.raises(StatusError, match="NAMESPACE/NAME"):
            parse_fleet(bad)
    assert node_key("ip-10-0-0-1.ec2.internal") == "node.ip-10-0-0-1.ec2.internal"
    with pytest.raises(StatusError, match="node name"):
        node_key("bad node")


def test_the_summary_names_only_what_is_missing_and_why() -> None:
    state = summarize(
        desired={"default/a": ["img1", "img2", "img3", "img4", "img1"], "default/b": ["img5"]},
        present={"img1", "img5", "unrelated"},
        pulling={"img2"},
        waiting_slot={"img4"},
        failed={"img3": "401 Unauthorized"},
        fleet_seqs={"default/a": 4, "default/b": 5, "default/c": 6},
        excluded={"default/c"},
    )
    assert state.fleets == {"default/a": 4, "default/b": 5}
    assert state.excluded == {"default/c": 6}
    assert state.gaps == {"default/a": FleetGap(total=4, missing=("img2", "img3", "img4"))}
    assert state.missing == {
        "img2": Missing(MissingState.PULLING),
        "img3": Missing(MissingState.FAILED, "401 Unauthorized"),
        "img4": Missing(MissingState.WAITING_SLOT),
    }
    status = NodeStatus(node="n", version="v", reported_at=T0, started_at=T0, summary=state)
    progress = fleet_progress(status, "default/a")
    assert progress is not None and progress.total == 4 and progress.ready == 1
    assert list(progress.missing) == ["img2", "img3", "img4"] and not progress.complete
    assert fleet_progress(status, "default/b").complete  # type: ignore[union-attr]
    assert fleet_progress(status, "default/c") is None  # excluded
    assert not is_stale(status, T0 + timedelta(seconds=60), 60)
    assert is_stale(status, T0 + timedelta(seconds=61), 60)


def test_held_images_are_pending_with_the_reason_and_summaries_round_trip() -> None:
    paused = "image filesystem / 91% used, at or above --max-image-fs-usage 80%"
    state = summarize(
        desired={"default/a": ["img1", "img2", "img3"]},
        present={"img1"},
        failed={"img3": "401 Unauthorized"},
        held={"img2": paused, "img3": "removed 3 times within 1h; re-pull in 60s"},
        fleet_seqs={"default/a": 1},
        pins=PinSummary(enabled=True, runtime="containerd 1.7.20", images=1, pinned=1),
        disk=DiskSummary(usage=0.91, max_usage=0.8, paused=paused, gc_backoff=("img3",)),
    )

    assert state.missing == {
        "img2": Missing(MissingState.PENDING, paused),
        "img3": Missing(MissingState.PENDING, "removed 3 times within 1h; re-pull in 60s"),
    }
    status = NodeStatus(node="n", version="v", reported_at=T0, started_at=T0, summary=state)
    decoded = decode_status(encode_status(status))
    assert decoded.summary.pins == state.pins
    assert decoded.summary.disk == state.disk


def test_an_entry_stays_small_with_many_fleets_all_present() -> None:
    images = {
        f"default/fleet-{i:03}": [f"registry.example.com/game-{i}:v1.2.3"] for i in range(200)
    }
    state = summarize(
        desired=images,
        present={i for imgs in images.values() for i in imgs},
        fleet_seqs={fleet: 100_000 + i for i, fleet in enumerate(images)},
    )
    status = NodeStatus(node="ip-10-0-0-1", version="1.0", reported_at=T0, started_at=T0)
    data = encode_status(msgspec.structs.replace(status, summary=state))
    # Per Fleet its name and sequence, nothing per image: about 30 bytes a Fleet.
    assert b"registry.example.com" not in data
    assert len(data) < 200 * 32 + 400


# --- Readiness against the log's newest event (what `wait` decides) ----------------------------

FLEET = "default/a"
TARGET = FleetTarget(seq=20, images=("img1", "img-new"))


def _node(
    desired: dict[str, list[str]] | None = None,
    present: frozenset[str] = frozenset(),
    **rest: object,
) -> NodeStatus:
    return NodeStatus(
        node="n",
        version="v",
        reported_at=T0,
        started_at=T0,
        summary=summarize(
            desired=desired or {},
            present=present,
            fleet_seqs=rest.pop("fleet_seqs", {}),  # type: ignore[arg-type]
            **rest,  # type: ignore[arg-type]
        ),
    )


def test_a_node_on_the_previous_version_is_behind_even_with_all_its_images() -> None:
    # The entry written just before the node folded v2: v1's images, all present.
    node = _node(desired={FLEET: ["img1"]}, present=frozenset({"img1"}), fleet_seqs={FLEET: 12})
    readiness = node_readiness(node, FLEET, TARGET)
    assert readiness.verdict is Readiness.BEHIND and readiness.seq == 12
    assert not readiness.counts_as_done


def test_a_node_on_another_incarnation_of_the_stream_is_behind_whatever_its_sequences() -> None:
    # The stream was lost and created again: the node still reports the old stream's higher
    # sequence for the Fleet, with the old version's images all present.
    old_stream, new_stream = T0, T0 + timedelta(hours=1)
    target = msgspec.structs.replace(TARGET, stream_created=new_stream)
    stale = _node(
        desired={FLEET: ["img1"]},
        present=frozenset({"img1"}),
        fleet_seqs={FLEET: 500},
        log_created=old_stream,
    )
    readiness = node_readiness(stale, FLEET, target)
    assert readiness.verdict is Readiness.BEHIND and readiness.seq is None
    caught_up = _node(
        desired={FLEET: list(TARGET.images)},
        present=frozenset(TARGET.images),
        fleet_seqs={FLEET: 20},
        log_created=new_stream,
    )
    assert node_readiness(caught_up, FLEET, target).verdict is Readiness.DONE
    # A node or a target that does not say which stream is judged by sequence, as before.
    assert node_readiness(stale, FLEET, TARGET).verdict is Readiness.DONE


def test_a_node_that_never_folded_the_fleet_is_behind() -> None:
    readiness = node_readiness(_node(), FLEET, TARGET)
    assert readiness.verdict is Readiness.BEHIND and readiness.seq is None


def test_at_the_target_every_image_must_be_present() -> None:
    images = ["img1", "img-new"]
    pulling = _node(
        desired={FLEET: images},
        present=frozenset({"img1"}),
        pulling=frozenset({"img-new"}),
        fleet_seqs={FLEET: 20},
    )
    readiness = node_readiness(pulling, FLEET, TARGET)
    assert readiness.verdict is Readiness.MISSING and readiness.progress is not None
    assert readiness.progress.missing == {"img-new": Missing(MissingState.PULLING)}
    done = _node(desired={FLEET: images}, present=frozenset(images), fleet_seqs={FLEET: 20})
    assert node_readiness(done, FLEET, TARGET).verdict is Readiness.DONE


def test_past_the_target_the_nodes_own_state_for_the_fleet_counts() -> None:
    # v3 (seq 25) dropped img-new: the node no longer wants it.
    node = _node(desired={FLEET: ["img1"]}, present=frozenset({"img1"}), fleet_seqs={FLEET: 25})
    readiness = node_readiness(node, FLEET, TARGET)
    assert readiness.verdict is Readiness.DONE and readiness.seq == 25


def test_exclusion_counts_only_as_of_the_target() -> None:
    now = _node(excluded=frozenset({FLEET}), fleet_seqs={FLEET: 20})
    assert node_readiness(now, FLEET, TARGET).verdict is Readiness.NOT_TARGETED
    before = _node(excluded=frozenset({FLEET}), fleet_seqs={FLEET: 19})
    assert node_readiness(before, FLEET, TARGET).verdict is Readiness.BEHIND


OLD_ENTRY = (
    b'{"node":"n","version":"0.1.0","reported_at":"2025-01-01T00:00:00Z",'
    b'"started_at":"2025-01-01T00:00:00Z","state":{"desired":{"default/a":["img1"]},'
    b'"present":["img1"],"fleet_seqs":{"default/a":7}},"schema":2}'
)


def test_entries_of_an_older_schema_fail_clearly_and_keep_their_header() -> None:
    with pytest.raises(
        OutdatedEntry,
        match=re.escape(
            "status schema 2 written by image-syncer 0.1.0; this image-syncer reads schema 3: "
            "upgrade the syncer on node n"
        ),
    ) as caught:
        decode_status(OLD_ENTRY)
    assert caught.value.status.reported_at == T0 and caught.value.status.summary == NodeState()
    schema1 = OLD_ENTRY.replace(b',"schema":2', b"")
    with pytest.raises(OutdatedEntry, match="status schema 1 "):
        decode_status(schema1)
    with pytest.raises(StatusError, match="not a node status entry"):
        decode_status(b'{"node": 1}')
    new = _node(desired={FLEET: ["img1"]}, fleet_seqs={FLEET: 7})
    assert decode_status(encode_status(new)) == new


class _Schema2State(msgspec.Struct, frozen=True):
    """What a schema-2 reader decodes ``$.state`` with (trimmed to what matters here)."""

    desired: dict[str, list[str]] = {}


class _Schema2Status(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    state: _Schema2State = _Schema2State()


def test_an_older_reader_fails_on_a_new_entry_instead_of_reading_an_empty_node() -> None:
    data = encode_status(_node(desired={FLEET: ["img1"]}, fleet_seqs={FLEET: 7}))
    with pytest.raises(msgspec.ValidationError, match=r"got `str` - at `\$\.state`"):
        msgspec.json.decode(data, type=_Schema2Status)
    assert b'"state":"status schema 3: upgrade image-syncer to read this entry"' in data


async def test_bucket_keeps_one_revision_and_entries_expire_per_key(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    kv = await ensure_status_bucket(js, settings)
    await ensure_status_bucket(js, settings)  # idempotent
    info = await js.stream_info(f"KV_{settings.bucket}")
    assert info.config.max_msgs_per_subject == 1
    assert info.config.allow_msg_ttl
    assert not info.config.max_age  # replay requests must not age out

    status = NodeStatus(node="node-a", version="v", reported_at=T0, started_at=T0)
    revision = await put_status(js, settings, status)
    assert await get_status(kv, "node-a") == status
    stored = await js.get_msg(f"KV_{settings.bucket}", seq=revision)
    assert stored.headers is not None and stored.headers.get("Nats-TTL") == "3600"
    assert await get_status(kv, "node-b") is None


async def test_an_expired_entry_leaves_the_view(js: JetStreamContext, prefix: str) -> None:
    settings = StatusSettings(prefix=prefix, node_ttl=1.0)
    kv = await ensure_status_bucket(js, settings)
    # Seen as it is written, not read afterwards: a loaded machine may take the whole second.
    written = await js._nc.subscribe(f"$KV.{settings.bucket}.{node_key('gone')}")
    await put_status(
        js, settings, NodeStatus(node="gone", version="v", reported_at=T0, started_at=T0)
    )
    headers = (await written.next_msg(timeout=30)).headers or {}
    assert headers.get("Nats-TTL") == "1"

    async def expired() -> bool:
        return "gone" not in (await list_statuses(kv))[0] and await get_status(kv, "gone") is None

    await eventually(expired, "the per-key TTL to remove the entry")


async def test_watch_names_undecodable_entries(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    kv = await ensure_status_bucket(js, settings)
    await kv.put("node.broken", b'{"node": 1}')
    async with StatusWatch(kv) as watch:
        assert watch.view == {}
        assert "broken" in watch.invalid
        status = NodeStatus(node="node-a", version="v", reported_at=T0, started_at=T0)
        await put_status(js, settings, status)
        assert await watch.next(timeout=10)
        assert watch.view == {"node-a": status}


async def test_watch_times_out_on_an_idle_bucket_and_reads_a_bucket_made_again(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    """The watch polls: nothing written means False at the timeout; a bucket deleted and made
    again (its sequences start over) is read again in whole, the old nodes gone."""
    kv = await ensure_status_bucket(js, settings)
    old = NodeStatus(node="node-old", version="v", reported_at=T0, started_at=T0)
    await put_status(js, settings, old)
    async with StatusWatch(kv, interval=0.05) as watch:
        assert watch.view == {"node-old": old}
        assert not await watch.next(timeout=0.3)
        await js.delete_stream(f"KV_{settings.bucket}")
        assert await watch.next(timeout=10)
        assert watch.view == {}
        await ensure_status_bucket(js, settings)
        new = NodeStatus(node="node-new", version="v", reported_at=T0, started_at=T0)
        await put_status(js, settings, new)
        assert await watch.next(timeout=10)
        assert watch.view == {"node-new": new}
        # Gone and made again between two polls: told apart by the bucket's creation time.
        await js.delete_stream(f"KV_{settings.bucket}")
        await ensure_status_bucket(js, settings)
        newer = NodeStatus(node="node-newer", version="v", reported_at=T0, started_at=T0)
        await put_status(js, settings, newer)
        assert await watch.next(timeout=10)
        assert watch.view == {"node-newer": newer}


# --- Reporter -------------------------------------------------------------------------------


async def test_reporter_writes_on_change_and_throttles(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    clocks = Clocks()
    state = [NodeState(fleets={"default/a": 1})]
    rep = reporter(js, settings, state, clocks)
    kv = await ensure_status_bucket(js, settings)

    assert await rep.tick()  # the first state is always written
    first = await get_status(kv, "node-a")
    assert first is not None and first.summary == state[0] and first.version == "1.2.3"
    assert first.reported_at == T0

    clocks.now = 1.0
    assert not await rep.tick()  # nothing changed, heartbeat not due

    state[0] = NodeState(fleets={"default/a": 2})
    clocks.now = 4.9
    assert not await rep.tick()  # changed, but within the interval
    assert (await get_status(kv, "node-a")).summary.fleets == {"default/a": 1}  # type: ignore[union-attr]

    clocks.now = 5.0
    assert await rep.tick()
    second = await get_status(kv, "node-a")
    assert second is not None and second.summary.fleets == {"default/a": 2}
    assert second.started_at == T0 and second.reported_at == T0 + timedelta(seconds=5)
    assert rep.writes == 2 and rep.errors == 0


async def test_reporter_heartbeats_an_unchanged_state_cheaply(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    clocks = Clocks()
    state = [NodeState(fleets={f"default/f{i}": i for i in range(100)})]
    rep = reporter(js, settings, state, clocks)
    kv = await ensure_status_bucket(js, settings)
    assert await rep.tick()
    clocks.now = 29.0
    assert not await rep.tick()
    clocks.now = 30.0
    assert await rep.tick()
    assert rep.writes == 1 and rep.beats == 1
    status = await get_status(kv, "node-a")
    assert status is not None and status.reported_at == T0  # the entry itself is untouched
    beat = await kv.get("beat.node-a")
    assert beat.value is not None and len(beat.value) < 60
    async with StatusWatch(kv) as watch:  # readers see the heartbeat as the node's liveness
        assert watch.view["node-a"].reported_at == T0 + timedelta(seconds=30)
        assert watch.view["node-a"].summary == state[0]
        # The full entry is rewritten long before its TTL, even unchanged.
        clocks.now = rep.refresh
        assert await rep.tick() and rep.writes == 2
        assert await watch.next(timeout=10)
        assert watch.view["node-a"].reported_at == T0 + timedelta(seconds=rep.refresh)
    assert rep.refresh == settings.node_ttl / 4


async def test_a_heartbeat_before_the_entry_and_a_deleted_entry(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    kv = await ensure_status_bucket(js, settings)
    later = T0 + timedelta(seconds=10)
    await put_heartbeat(js, settings, "node-a", Heartbeat(at=later))
    async with StatusWatch(kv) as watch:
        assert watch.view == {}
        await put_status(
            js, settings, NodeStatus(node="node-a", version="v", reported_at=T0, started_at=T0)
        )
        assert await watch.next(timeout=10)
        assert watch.view["node-a"].reported_at == later
        await kv.delete("node.node-a")
        assert await watch.next(timeout=10)
        assert watch.view == {}


async def test_reporter_run_writes_promptly_when_poked(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    state = [NodeState()]
    # A real clock, an interval far shorter than the heartbeat: the poke, not a heartbeat,
    # must carry the change.
    rep = StatusReporter(js, settings, "node-a", lambda: state[0], interval=0.05, heartbeat=3600.0)
    kv = await ensure_status_bucket(js, settings)
    stopping = asyncio.Event()
    task = asyncio.create_task(rep.run(stopping))
    try:

        async def shows(fleets: dict[str, int]) -> bool:
            status = await get_status(kv, "node-a")
            return status is not None and status.summary.fleets == fleets

        await eventually(lambda: shows({}), "the first write")
        state[0] = NodeState(fleets={"default/a": 1})
        rep.poke()
        await eventually(lambda: shows({"default/a": 1}), "the poked write")
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


async def test_reporter_survives_a_nats_outage_and_logs_once_per_transition(
    own_nats_server: NatsServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await connect(NatsSettings(servers=(own_nats_server.url,)), name="tests")
    try:
        js = nc.jetstream()
        settings = StatusSettings(prefix=prefix)
        clocks = Clocks()
        state = [NodeState()]
        seen: list[BaseException] = []
        rep = reporter(js, settings, state, clocks, write_timeout=0.5, on_error=seen.append)
        assert await rep.tick()

        own_nats_server.stop()
        caplog.set_level(logging.INFO, logger="syncer.reporting.reporter")
        for step in (1, 2, 3):
            clocks.now = 30.0 * step
            assert not await rep.tick()  # no exception, just a failed write
        assert rep.errors == 3 and len(seen) == 3
        failures = [r for r in caplog.records if r.getMessage() == "node status write failed"]
        assert len(failures) == 1

        own_nats_server.start()

        async def written() -> bool:
            clocks.now += 30.0
            return await rep.tick()

        await eventually(written, "a write after the server came back", timeout=30)
        recovered = [r for r in caplog.records if r.getMessage() == "node status write recovered"]
        assert len(recovered) == 1
    finally:
        await nc.close()


async def test_reporter_survives_a_failing_snapshot(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    def broken() -> NodeState:
        raise RuntimeError("bug")

    rep = StatusReporter(js, settings, "node-a", broken)
    assert not await rep.tick()


# --- Replay requests ------------------------------------------------------------------------


async def test_a_replay_request_waits_for_the_next_start(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    assert await pending_replay(js, "node-a", settings=settings) is None  # no bucket yet
    request = await request_replay(js, settings, "node-a", requested_by="test")
    pending = await pending_replay(js, "node-a", settings=settings)
    assert pending is not None and pending.request == request
    assert await pending_replay(js, "node-b", settings=settings) is None

    newer = await request_replay(js, settings, "node-a")
    # The first request's revision is gone: completing it must not drop the newer request.
    assert not await complete_replay(js, "node-a", pending, settings=settings)
    still = await pending_replay(js, "node-a", settings=settings)
    assert still is not None and still.request == newer
    assert await complete_replay(js, "node-a", still, settings=settings)
    assert await pending_replay(js, "node-a", settings=settings) is None


async def test_a_running_syncer_sees_replay_requests(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    early = await request_replay(js, settings, "node-a")
    seen: list[PendingReplay] = []

    async def replay(pending: PendingReplay) -> None:
        seen.append(pending)

    stopping = asyncio.Event()
    task = asyncio.create_task(
        watch_replay_requests(js, "node-a", replay, stopping=stopping, settings=settings)
    )
    try:

        async def delivered(n: int) -> bool:
            return len(seen) >= n

        await eventually(lambda: delivered(1), "the pending request")
        assert seen[0].request == early
        await eventually(
            lambda: _is_none(pending_replay(js, "node-a", settings=settings)),
            "the honoured request to be completed",
        )

        await request_replay(js, settings, "node-b")  # another node's request is not ours
        later = await request_replay(js, settings, "node-a")
        await eventually(lambda: delivered(2), "the request made while running")
        assert [p.request for p in seen] == [early, later]
    finally:
        stopping.set()
        async with asyncio.timeout(DEADLINE):
            await task
    assert await pending_replay(js, "node-b", settings=settings) is not None


async def test_a_failed_replay_keeps_the_request(
    js: JetStreamContext, settings: StatusSettings
) -> None:
    request = await request_replay(js, settings, "node-a")
    attempts: list[str] = []

    async def replay(pending: PendingReplay) -> None:
        attempts.append(pending.request.id)
        raise RuntimeError("log unreadable")

    stopping = asyncio.Event()
    task = asyncio.create_task(
        watch_replay_requests(js, "node-a", replay, stopping=stopping, settings=settings)
    )
    try:

        async def tried() -> bool:
            return bool(attempts)

        await eventually(tried, "the replay attempt")
    finally:
        stopping.set()
        async with asyncio.timeout(DEADLINE):
            await task
    pending = await pending_replay(js, "node-a", settings=settings)
    assert pending is not None and pending.request == request


async def _is_none(awaitable) -> bool:  # type: ignore[no-untyped-def]
    return await awaitable is None
