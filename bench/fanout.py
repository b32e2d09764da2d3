"""Fan-out: N simulated nodes converging after one Fleet update, for N = 50, 100, 200.

Each node is the syncer's real consumer graph (replay, durable consumer, fold, puller) with its
own NATS connection and durable on one nats-server, and an in-memory runtime whose pull is
instant, so the figure is the event log's fan-out, not a registry. Convergence of a node is the
time from the update's publish to its runtime holding the new image. All nodes share this one
Python process (and the two cores with nats-server), so growth with N includes the simulator's
own CPU; real nodes each have their own. The issue sets no target; ours: p99 grows at most
linearly with the number of nodes (ratio = p99 at the largest N / p99 at the smallest N).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client

from bench.fakeruntime import MemoryRuntime
from bench.report import arguments, emit, median, percentile, production_logging, repeats
from bench.services import fleet_stream, log_settings, nats_server, nats_settings
from bench.syncerparts import Node, node
from image_syncer.fleets import build_fleet
from image_syncer.sandbox.nats_server import NatsServer
from wire.contract import Kind
from wire.eventlog import publish_event, stream_name
from wire.natsconn import connect

NAME = "fanout"
FLEET = "fanout"


def image(version: int) -> str:
    return f"registry.example/fanout:v{version}"


class SimulatedNode:
    def __init__(self, index: int, arrivals: dict[str, list[float]]) -> None:
        self.index = index
        self.arrivals = arrivals
        self.runtime = MemoryRuntime([image(0)], on_pull=self._pulled)
        self.nc: Client | None = None
        self.parts: Node | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()

    def _pulled(self, ref: str, at: float) -> None:
        self.arrivals.setdefault(ref, []).append(at)

    async def start(self, server: NatsServer) -> None:
        self.nc = await connect(nats_settings(server), name=f"node-{self.index}")
        parts = node(self.nc.jetstream(), nats_settings(server), f"node-{self.index}", self.runtime)
        await parts.consumer.replay()
        await parts.reconciler.refresh()
        await parts.consumer.start_durable()
        self.parts = parts
        self.task = asyncio.create_task(parts.consumer.run(self.stopping))

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None and self.parts is not None and self.nc is not None:
            await self.task
            await self.parts.consumer.drain()
            await self.nc.jetstream().delete_consumer(
                stream_name(self.parts.settings.subject_prefix, Kind.FLEET),
                self.parts.settings.durable,
            )
        if self.nc is not None:
            await self.nc.close()


async def converge(server: NatsServer, nodes: int, updates: int, first: int) -> list[float]:
    """Seconds from publish to image present, per node per update."""
    arrivals: dict[str, list[float]] = {}
    sims = [SimulatedNode(i, arrivals) for i in range(nodes)]
    await asyncio.gather(*(s.start(server) for s in sims))
    times: list[float] = []
    publisher = await connect(nats_settings(server), name="fanout publisher")
    try:
        js = publisher.jetstream()
        for version in range(first, first + updates):
            obj = build_fleet(FLEET, [image(version)], resource_version=str(version))
            started = time.perf_counter()
            await publish_event(js, log_settings(), "fleet.events.updated", obj)
            deadline = time.monotonic() + 60
            while len(arrivals.get(image(version), ())) < nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(arrivals.get(image(version), ()))}/{nodes} converged")
                await asyncio.sleep(0.002)
            times += [at - started for at in arrivals[image(version)]]
    finally:
        await publisher.close()
        await asyncio.gather(*(s.stop() for s in sims))
    return times


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, max_nodes=200)
    largest = args.max_nodes or (6 if args.quick else 200)
    counts = [max(1, largest // 4), max(1, largest // 2), largest]
    updates = repeats(args, 5)
    production_logging()
    results: dict[int, list[float]] = {}
    with nats_server() as server:
        nc = await connect(nats_settings(server), name="fanout setup")
        js = await fleet_stream(nc)
        await publish_event(
            js, log_settings(), "fleet.events.added", build_fleet(FLEET, [image(0)])
        )
        await nc.close()
        first = 1
        for count in counts:
            results[count] = await converge(server, count, updates, first)
            first += updates
    p50 = {n: percentile(t, 50) * 1000 for n, t in results.items()}
    p99 = {n: percentile(t, 99) * 1000 for n, t in results.items()}
    growth = p99[largest] / p99[counts[0]]
    allowed = largest / counts[0]
    return emit(
        NAME,
        figure=p99[largest],
        unit="ms p99",
        baseline=p99[counts[0]],
        ratio=growth,
        target=f"p99 grows at most linearly (<= {allowed:g}x from {counts[0]} to {largest} nodes)",
        met=growth <= allowed,
        nodes=counts,
        p50_ms={str(n): round(v, 1) for n, v in p50.items()},
        p99_ms={str(n): round(v, 1) for n, v in p99.items()},
        median_ms={str(n): round(median(t) * 1000, 1) for n, t in results.items()},
        updates=updates,
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
