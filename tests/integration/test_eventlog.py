"""The event log on a real JetStream: compaction, de-duplication, tombstones, bounded reads."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from support.fleetdicts import fleet as fleet_dict

from wire.contract import Kind, decode_event, images_of
from wire.eventlog import (
    MAX_CONSUMERS,
    LogSettings,
    ensure_streams,
    publish_event,
    read_log,
    stream_name,
)


def fleet(name: str, rv: int, image: str = "nginx", namespace: str = "default") -> dict[str, Any]:
    return fleet_dict(name, image, namespace=namespace, rv=str(rv))


async def log_of(js: JetStreamContext, settings: LogSettings) -> list[tuple[str, str]]:
    stream = stream_name(settings.prefix, Kind.FLEET)
    out = []
    async for message in read_log(js, stream):
        event = decode_event(message.data)
        out.append(
            (message.subject.removeprefix(settings.prefix + "."), images_of(event.obj)[0][1])
        )
    return out


async def test_streams_are_compacted_deduplicated_and_ensure_is_idempotent(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    [info] = await ensure_streams(js, log_settings)
    [again] = await ensure_streams(js, log_settings)
    assert info.config.max_msgs_per_subject == again.config.max_msgs_per_subject == 1
    assert again.config.allow_msg_ttl is True
    assert again.config.duplicate_window == log_settings.duplicate_window
    assert again.config.subjects == [f"{log_settings.prefix}.fleet.events.*.*.*"]


async def test_newest_message_per_fleet_survives(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    await publish_event(js, log_settings, "fleet.events.added", fleet("a", 1, "img:1"))
    for rv in (2, 3, 4):
        await publish_event(js, log_settings, "fleet.events.updated", fleet("a", rv, f"img:{rv}"))
    # The update supersedes the added message: one message per live Fleet.
    assert await log_of(js, log_settings) == [("fleet.events.updated.default.a", "img:4")]


async def test_a_republished_change_is_stored_once(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    first = await publish_event(js, log_settings, "fleet.events.added", fleet("a", 1))
    again = await publish_event(js, log_settings, "fleet.events.added", fleet("a", 1))
    assert not first.duplicate
    assert again.duplicate and again.seq == first.seq


async def test_delete_leaves_only_a_tombstone_with_a_ttl(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    await publish_event(js, log_settings, "fleet.events.added", fleet("a", 1))
    await publish_event(js, log_settings, "fleet.events.updated", fleet("a", 2))
    await publish_event(js, log_settings, "fleet.events.added", fleet("b", 3))
    await publish_event(js, log_settings, "fleet.events.deleted", fleet("a", 4))
    assert [subject for subject, _ in await log_of(js, log_settings)] == [
        "fleet.events.added.default.b",
        "fleet.events.deleted.default.a",
    ]
    stream = stream_name(log_settings.prefix, Kind.FLEET)
    tombstone = await js.get_last_msg(
        stream, f"{log_settings.prefix}.fleet.events.deleted.default.a"
    )
    assert tombstone.headers is not None
    assert tombstone.headers["Nats-TTL"] == str(int(log_settings.tombstone_ttl))


async def test_read_log_ends_at_the_last_message_even_while_writers_append(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    for i in range(50):
        await publish_event(js, log_settings, "fleet.events.added", fleet(f"f{i}", i + 1))
    stream = stream_name(log_settings.prefix, Kind.FLEET)

    async def keep_writing() -> None:
        for i in range(50, 100):
            await publish_event(js, log_settings, "fleet.events.added", fleet(f"f{i}", i + 1))

    writer = asyncio.create_task(keep_writing())
    seqs = [m.seq async for m in read_log(js, stream)]
    await writer
    assert seqs[:50] == list(range(1, 51))
    assert seqs == sorted(seqs)


async def test_read_log_of_an_empty_stream_ends_at_once(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    stream = stream_name(log_settings.prefix, Kind.FLEET)
    assert [m async for m in read_log(js, stream)] == []


async def test_dotted_names_round_trip_through_the_log(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    await publish_event(
        js, log_settings, "fleet.events.added", fleet("game.v2", 1, namespace="eu.west")
    )
    [(subject, _)] = await log_of(js, log_settings)
    assert subject == "fleet.events.added.eu_west.game_v2"


async def test_read_log_with_a_filter_that_matches_nothing_ends(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    await publish_event(js, log_settings, "fleet.events.added", fleet("a", 1))
    stream = stream_name(log_settings.prefix, Kind.FLEET)
    nothing = f"{log_settings.prefix}.fleet.events.*.elsewhere.*"
    assert [m async for m in read_log(js, stream, subject=nothing)] == []
    only_a = f"{log_settings.prefix}.fleet.events.*.default.a"
    assert [m.seq async for m in read_log(js, stream, subject=only_a)] == [1]


async def test_the_fleet_stream_takes_a_durable_per_node_past_the_servers_default_of_1000(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    # nats-server 2.15 limits a stream to 1,000 consumers unless the stream sets its own limit.
    stream = stream_name(log_settings.prefix, Kind.FLEET)
    assert (await js.stream_info(stream)).config.max_consumers == MAX_CONSUMERS

    async def durable(i: int) -> None:
        config = ConsumerConfig(
            durable_name=f"syncer-node-{i}", mem_storage=True, num_replicas=1, inactive_threshold=60
        )
        await js.add_consumer(stream, config)

    for start in range(0, 1001, 100):
        await asyncio.gather(*(durable(i) for i in range(start, min(start + 100, 1001))))
    assert (await js.stream_info(stream)).state.consumer_count == 1001
