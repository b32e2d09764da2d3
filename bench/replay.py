"""Replay: rebuild a node's desired state from the log, against a raw read of the same stream.

Two figures. First, the syncer's real replay (``FleetConsumer.replay``: ordered consumer,
decode, fold) over ``--fleets`` added Fleets, against nats-py reading the same stream through an
ordered consumer without decoding anything (target <= 1.5x). Then ``--history`` updates are
published over those Fleets and the replay is timed again: the stream keeps one message per
subject, so replay should cost about what it cost before (target <= 1.2x the first replay).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.eventfeed import added_events, fleets, publish_bulk, update_events
from bench.report import Clock, arguments, emit, median, production_logging, repeats, size
from bench.services import (
    PREFIX,
    fleet_stream,
    log_settings,
    nats_client,
    nats_server,
    nats_settings,
)
from bench.syncerparts import node
from wire.contract import Kind, subject_filter
from wire.eventlog import compact_object, last_message, stream_name
from wire.natsconn import NatsSettings

NAME = "replay"
STREAM = stream_name(PREFIX, Kind.FLEET)


async def syncer_replay(js: JetStreamContext, nats: NatsSettings) -> tuple[float, int]:
    parts = node(js, nats)
    with Clock() as clock:
        await parts.consumer.replay()
    return clock.seconds, len(parts.desired)


async def raw_read(js: JetStreamContext) -> tuple[float, int]:
    """Every message of the stream through an ordered consumer, payloads untouched."""
    with Clock() as clock:
        info = await js.stream_info(STREAM)
        sub = await js.subscribe(
            subject_filter(PREFIX, Kind.FLEET),
            stream=STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, max_ack_pending=-1),
        )
        for _ in range(info.state.messages):
            await sub.next_msg(timeout=10)
        await sub.unsubscribe()
    return clock.seconds, info.state.messages


async def alternate(
    js: JetStreamContext, nats: NatsSettings, runs: int, fleets_expected: int
) -> tuple[float, float]:
    ours, raw = [], []
    for _ in range(runs):
        seconds, folded = await syncer_replay(js, nats)
        if folded != fleets_expected:
            raise RuntimeError(f"replay folded {folded} Fleets, expected {fleets_expected}")
        ours.append(seconds)
        raw.append((await raw_read(js))[0])
    return median(ours), median(raw)


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, fleets=10_000, history=1_000_000)
    count, history = size(args, "fleets", 200), size(args, "history", 2_000)
    runs = repeats(args)
    production_logging()
    with nats_server() as server:
        async with nats_client(server) as nc:
            js = await fleet_stream(nc)
            objs = fleets(count)
            await publish_bulk(nc, added_events(PREFIX, objs))
            replay_s, raw_s = await alternate(js, nats_settings(server), runs, count)
            with Clock() as publishing:
                await publish_bulk(nc, update_events(PREFIX, objs, history))
                # What publish_event does after each update: purge the Fleet's messages older
                # than its newest (once per Fleet is enough; the bulk publisher skips it).
                for obj in objs:
                    meta = obj["metadata"]
                    where = (Kind.FLEET, meta["namespace"], meta["name"])
                    newest = await last_message(js, log_settings(), *where)
                    assert newest is not None
                    await compact_object(js, log_settings(), *where, newest.seq)
            stored = (await js.stream_info(STREAM)).state.messages
            history_s, history_raw_s = await alternate(js, nats_settings(server), runs, count)
    ratio, history_ratio = replay_s / raw_s, history_s / replay_s
    return emit(
        NAME,
        figure=replay_s * 1000,
        unit="ms",
        baseline=raw_s * 1000,
        ratio=ratio,
        target="replay <= 1.5x raw read; with history <= 1.2x the plain replay",
        met=ratio <= 1.5 and history_ratio <= 1.2,
        replay_met=ratio <= 1.5,
        fleets=count,
        history_events=history,
        history_publish_s=publishing.seconds,
        history_stored_messages=stored,
        history_replay_ms=history_s * 1000,
        history_raw_ms=history_raw_s * 1000,
        history_ratio=history_ratio,
        history_met=history_ratio <= 1.2,
        repeat=runs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
