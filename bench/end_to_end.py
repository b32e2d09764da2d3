"""End to end on containerd: an event published -> its image present on the node.

Real nats-server, containerd (CRI) and docker-registry from the sandbox, and the real syncer
(``syncer.runner.run``) in-process. For each run a fresh image of ``--layer-kib`` is pushed;
latency is from just before ``publish_event`` to the syncer's ``fleet synced`` line, logged once
CRI PullImage returned. The baseline is ``CriClient.pull_image`` of another fresh image of the
same size, straight to containerd. Overhead = median(end to end) - median(direct pull);
target <= 20 ms.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from operator import contains
from typing import Any

from bench.report import arguments, emit, median, production_logging, repeats, size
from bench.services import (
    containerd,
    fleet_stream,
    log_settings,
    nats_client,
    nats_server,
    nats_settings,
    registry,
)
from image_syncer.fleets import build_fleet
from image_syncer.sandbox.images import push_image
from ops.serving import Health
from syncer.folding.references import normalize
from syncer.runner import run
from syncer.runtime.cri import CriClient
from syncer.settings import PullSettings, RuntimeSettings, SyncerSettings
from wire.eventlog import publish_event

NAME = "end-to-end"
TARGET_MS = 20.0


class Synced(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "fleet synced":
            self.at.setdefault(str(record.__dict__.get("image")), time.perf_counter())


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.0005)


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, layer_kib=1024)
    layer = size(args, "layer_kib", 16) * 1024
    runs = repeats(args, 9)
    production_logging()
    synced = Synced()
    logging.getLogger("syncer.pulling.inventory").addHandler(synced)
    ours, direct = [], []
    with nats_server() as server, registry() as reg, containerd() as runtime:
        refs = [f"{reg.address}/bench/e2e-{i}:v1" for i in range(2 * runs)]
        for ref in refs:
            push_image(reg.address, ref.split("/", 1)[1].split(":")[0], "v1", layer_bytes=layer)
        async with nats_client(server) as nc:
            js = await fleet_stream(nc)
            settings = SyncerSettings(
                node_name="e2e",
                runtime=RuntimeSettings(endpoint=runtime.endpoint),
                subject_prefix=log_settings().prefix,
                metrics_addr="",
                pulls=PullSettings(period=3600.0),
                nats=nats_settings(server),
            )
            stopping, health = asyncio.Event(), Health()
            health.set("replay", False, "not started")
            task = asyncio.create_task(run(settings, stopping, health))
            cri = CriClient(runtime.endpoint)
            try:
                await wait_for(lambda: health.ready()[0] or task.done(), "syncer ready")
                for i in range(runs):
                    started = time.perf_counter()
                    await cri.pull_image(refs[2 * i], timeout=60)
                    direct.append(time.perf_counter() - started)
                    ref = refs[2 * i + 1]
                    key = str(normalize(ref))
                    started = time.perf_counter()
                    await publish_event(
                        js, log_settings(), "fleet.events.added", build_fleet(f"e2e-{i}", [ref])
                    )
                    await wait_for(functools.partial(contains, synced.at, key), f"{ref} present")
                    ours.append(synced.at[key] - started)
                present = {str(normalize(r)) for r in refs} <= {
                    t for image in await cri.list_images() for t in image.repo_tags
                }
            finally:
                stopping.set()
                await asyncio.wait_for(task, 60)
                await cri.close()
    figure, baseline = median(ours) * 1000, median(direct) * 1000
    overhead = figure - baseline
    return emit(
        NAME,
        figure=figure,
        unit="ms median",
        baseline=baseline,
        ratio=figure / baseline,
        target=f"overhead <= {TARGET_MS:g} ms median",
        met=overhead <= TARGET_MS,
        overhead_ms=overhead,
        layer_kib=layer // 1024,
        all_present=present,
        repeat=runs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
