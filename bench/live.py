"""Live throughput: events/s through the syncer's live consumer path, images already present.

The syncer's path is ``FleetConsumer.run``: fetch from its durable, decode, fold, see the images
are present (no runtime call), log, ack. The baseline is nats-py alone doing fetch + ack on a
durable of the same stream with the same batch and ack settings (target >= 0.7x its rate).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.eventfeed import added_events, fleets, publish_bulk
from bench.fakeruntime import MemoryRuntime
from bench.report import Clock, arguments, emit, median, production_logging, repeats, size
from bench.services import PREFIX, fleet_stream, nats_client, nats_server, nats_settings
from bench.syncerparts import node
from syncer import metrics
from wire.contract import Kind, subject_filter
from wire.eventlog import stream_name
from wire.natsconn import NatsSettings

NAME = "live"
STREAM = stream_name(PREFIX, Kind.FLEET)
BATCH = 64  # what FleetConsumer.run fetches at a time


def _acked() -> float:
    acked: float = metrics.EVENTS.labels("fleet.events.added", "acked")._value.get()
    return acked


async def syncer_rate(
    js: JetStreamContext, nats: NatsSettings, run: int, images: list[str]
) -> float:
    parts = node(js, nats, name=f"live-{run}", cri=MemoryRuntime(images))
    await parts.reconciler.refresh()
    total = len(images)
    await parts.consumer.start_durable()
    stopping = asyncio.Event()
    before = _acked()
    with Clock() as clock:
        task = asyncio.create_task(parts.consumer.run(stopping))
        deadline = time.monotonic() + 120
        while _acked() - before < total:
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"syncer acked {_acked() - before} of {total}")
            await asyncio.sleep(0.002)
    stopping.set()
    await task
    await parts.consumer.drain()
    await js.delete_consumer(STREAM, parts.settings.durable)
    return total / clock.seconds


async def raw_rate(js: JetStreamContext, run: int, total: int) -> float:
    durable = f"raw-{run}"
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=256,
            filter_subject=subject_filter(PREFIX, Kind.FLEET),
            mem_storage=True,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=durable, stream=STREAM)
    done = 0
    with Clock() as clock:
        while done < total:
            for msg in await sub.fetch(batch=BATCH, timeout=5):
                await msg.ack()
                done += 1
    await sub.unsubscribe()
    await js.delete_consumer(STREAM, durable)
    return total / clock.seconds


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, events=20_000)
    total, runs = size(args, "events", 300), repeats(args, 3)
    production_logging()
    objs = fleets(total)
    images = [f"registry.example/game-{i}:v1" for i in range(total)]
    ours, raw = [], []
    with nats_server() as server:
        async with nats_client(server) as nc:
            js = await fleet_stream(nc)
            await publish_bulk(nc, added_events(PREFIX, objs))
            for run in range(runs):
                ours.append(await syncer_rate(js, nats_settings(server), run, images))
                raw.append(await raw_rate(js, run, total))
    figure, baseline = median(ours), median(raw)
    return emit(
        NAME,
        figure=figure,
        unit="events/s",
        baseline=baseline,
        ratio=figure / baseline,
        target=">= 0.7x raw fetch+ack",
        met=figure / baseline >= 0.7,
        events=total,
        batch=BATCH,
        repeat=runs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
