"""Broadcaster: a Fleet change in the API server -> its event acked by JetStream.

The real broadcaster (``broadcaster.runner.run``: list+watch through the kubernetes client, queue,
publish with retry until acked) runs against the protocol-faithful fake API server from
``image_syncer/sandbox/fakekube`` and a real nats-server. Latency per event is from the API write
to the broadcaster's ``event published`` log line, written once JetStream acked. The baseline is
nats-py alone publishing the same envelopes to the same stream, one awaited ack at a time, as the
broadcaster does. The issue sets no target; the ratio is reported.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from operator import contains
from pathlib import Path
from typing import Any

from bench.report import arguments, emit, median, percentile, production_logging, repeats, size
from bench.services import PREFIX, log_settings, nats_client, nats_server, nats_settings
from broadcaster.runner import run
from broadcaster.settings import Settings
from image_syncer.fleets import fleet_object
from image_syncer.sandbox.fakekube import FakeKube
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from ops.serving import Health
from wire.contract import Kind, encode_event, event_headers, subject_for
from wire.eventlog import LogSettings, ensure_streams, stream_name

NAME = "broadcaster"


def _fleet(name: str, image: str) -> dict[str, Any]:
    # As created through the API: the server gives it its uid and resourceVersion.
    return fleet_object(name, [{"name": "game", "image": image}])


class Published(logging.Handler):
    """When the broadcaster logged ``event published`` for each object (namespace/name)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "event published":
            self.at.setdefault(record.__dict__.get("object", ""), time.perf_counter())


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def broadcaster_latencies(kube: FakeKube, settings: Settings, events: int) -> list[float]:
    published = Published()
    logging.getLogger("broadcaster.publishing").addHandler(published)
    stopping, health = asyncio.Event(), Health()
    health.set("initial-list", False, "not started")
    task = asyncio.create_task(run(settings, stopping, health=health))
    latencies = []
    try:
        await wait_for(lambda: health.ready()[0] or task.done(), "broadcaster ready")
        for i in range(events):
            name = f"bench-{i}"
            started = time.perf_counter()
            await asyncio.to_thread(kube.create, "fleets", _fleet(name, f"game:{i}"))
            key = f"default/{name}"
            await wait_for(functools.partial(contains, published.at, key), f"publish of {name}")
            latencies.append(published.at[f"default/{name}"] - started)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)
        logging.getLogger("broadcaster.publishing").removeHandler(published)
    return latencies


async def raw_latencies(server: NatsServer, kube: FakeKube, events: int) -> list[float]:
    latencies = []
    async with nats_client(server) as nc:
        js = nc.jetstream()
        for obj in kube.objects()[:events]:
            meta = obj["metadata"]
            subject = subject_for(PREFIX + "raw", "fleet.events.added", "default", meta["name"])
            payload = encode_event("fleet.events.added", obj)
            headers = event_headers("fleet.events.added", obj)
            started = time.perf_counter()
            await js.publish(
                subject, payload, stream=stream_name(PREFIX + "raw", Kind.FLEET), headers=headers
            )
            latencies.append(time.perf_counter() - started)
    return latencies


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, events=300)
    events = size(args, "events", 10)
    production_logging()
    with (
        nats_server() as server,
        tempfile.TemporaryDirectory(prefix="bench-kube-") as d,
        FakeKube(Path(d) / "kube") as kube,
    ):
        settings = Settings(
            nats=nats_settings(server),
            log=log_settings(),
            kubeconfig=str(kube.kubeconfig),
            metrics_addr=f"127.0.0.1:{free_port()}",
        )
        ours = await broadcaster_latencies(kube, settings, events)
        async with nats_client(server) as nc:
            await ensure_streams(nc.jetstream(), LogSettings(prefix=PREFIX + "raw"))
        raw = await raw_latencies(server, kube, events)
    figure, baseline = median(ours) * 1000, median(raw) * 1000
    return emit(
        NAME,
        figure=figure,
        unit="ms median",
        baseline=baseline,
        ratio=figure / baseline,
        target="none set by the issue (reported)",
        met=True,
        events=events,
        p99_ms=percentile(ours, 99) * 1000,
        raw_p99_ms=percentile(raw, 99) * 1000,
        overhead_ms=figure - baseline,
        repeat=repeats(args, 1),
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
