"""Seeding through a pull-through cache: upstream blob fetches and time until every node is ready.

Real parts: nats-server, ``--nodes`` containerds whose ``hosts.toml`` sends pulls through a
Distribution registry in proxy mode in front of the upstream registry (``MirroredRegistry``),
and two real syncers per node (``syncer.runner.run`` in-process): one set with ``--mirror``
(seeding on), one without, each on its own subject prefix, so a Fleet published for one set is
pulled by that set only. Each run pushes a fresh image of ``--layer-kib`` for each set, the two
sets alternating, and publishes it; "ready" is when every node's runtime lists it.

Upstream blob GETs are read from the upstream registry's own access log. The raw baseline is one
CRI pull of a fresh image through the cache: what a single fetch costs the upstream per blob
(Distribution 2.8 fetches a blob it lacks twice, once to stream and once to store it).
figure = upstream GETs per blob with seeding; baseline = the same without; target: seeded =
the single-pull cost (one seed), whatever the node count.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench.report import arguments, emit, median, production_logging, repeats, size
from bench.services import nats_client, nats_server, nats_settings
from image_syncer.fleets import build_fleet
from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.images import build_image, push_image
from image_syncer.sandbox.mirror import MirroredRegistry
from image_syncer.sandbox.nats_server import NatsServer
from ops.serving import Health
from syncer.folding.references import normalize
from syncer.runner import run
from syncer.runtime.cri import CriClient
from syncer.settings import (
    KeepingSettings,
    PullSettings,
    RuntimeSettings,
    SeedingSettings,
    SyncerSettings,
)
from wire.eventlog import LogSettings, ensure_streams, publish_event

NAME = "seeding"
MODES = {"seeded": "benchseeded", "unseeded": "benchplain"}


def push_fresh(mirrored: MirroredRegistry, name: str, layer: int) -> tuple[str, str, int]:
    """A fresh image in the upstream: (reference, repository, number of blobs)."""
    repository = f"bench/{name}"
    image = build_image(layer_bytes=layer)
    push_image(mirrored.upstream.address, repository, "v1", image=image)
    blobs = {hashlib.sha256(b).hexdigest() for b in (image.layer, image.config)}
    return f"{mirrored.upstream.address}/{repository}:v1", repository, len(blobs)


def gets_per_blob(mirrored: MirroredRegistry, repository: str, blobs: int) -> float:
    return sum(mirrored.upstream_blob_gets(repository).values()) / blobs


@contextlib.asynccontextmanager
async def syncers(
    server: NatsServer, runtimes: list[Containerd], mirrored: MirroredRegistry
) -> AsyncIterator[None]:
    """Per node one syncer with seeding (prefix benchseeded) and one without (benchplain)."""
    stopping = asyncio.Event()
    tasks, healths = [], []
    for mode, prefix in MODES.items():
        for i, runtime in enumerate(runtimes):
            settings = SyncerSettings(
                node_name=f"{mode}-{i}",
                runtime=RuntimeSettings(endpoint=runtime.endpoint),
                subject_prefix=prefix,
                metrics_addr="",
                pulls=PullSettings(period=3600.0),
                keeping=KeepingSettings(pin_images=False),
                seeding=SeedingSettings(
                    mirror=(mirrored.upstream.address,) if mode == "seeded" else ()
                ),
                nats=nats_settings(server),
            )
            health = Health()
            health.set("replay", False, "not started")
            healths.append(health)
            tasks.append(asyncio.create_task(run(settings, stopping, health)))
    try:
        await until(lambda: all(h.ready()[0] for h in healths), "syncers ready")
        yield
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)


async def until(check: Any, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not await _truthy(check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _truthy(value: Any) -> bool:
    return bool(await value) if asyncio.iscoroutine(value) else bool(value)


async def all_hold(clients: list[CriClient], ref: str) -> bool:
    wanted = str(normalize(ref))
    for cri in clients:
        tags = {str(normalize(t)) for image in await cri.list_images() for t in image.repo_tags}
        if wanted not in tags:
            return False
    return True


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, layer_kib=8192, nodes=3)
    layer = size(args, "layer_kib", 256) * 1024
    nodes = size(args, "nodes", 3)
    runs = repeats(args, 3)
    production_logging()
    gets: dict[str, list[float]] = {mode: [] for mode in MODES}
    ready: dict[str, list[float]] = {mode: [] for mode in MODES}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(nats_server())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-seeding-")))
        mirrored = stack.enter_context(MirroredRegistry(work / "mirror"))
        runtimes = [stack.enter_context(mirrored.node(work / f"node{i}")) for i in range(nodes)]
        clients = [CriClient(r.endpoint) for r in runtimes]
        try:
            ref, repository, blobs = push_fresh(mirrored, "single", layer)
            await clients[0].pull_image(ref, timeout=300)
            single = gets_per_blob(mirrored, repository, blobs)
            async with nats_client(server) as nc:
                js = nc.jetstream()
                for prefix in MODES.values():
                    await ensure_streams(js, LogSettings(prefix=prefix))
                async with syncers(server, runtimes, mirrored):
                    for i in range(runs):
                        for mode, prefix in MODES.items():
                            ref, repository, blobs = push_fresh(mirrored, f"{mode}-{i}", layer)
                            fleet = build_fleet(f"{mode}-{i}", [ref])
                            started = time.perf_counter()
                            await publish_event(
                                js, LogSettings(prefix=prefix), "fleet.events.added", fleet
                            )
                            await until(lambda ref=ref: all_hold(clients, ref), f"{ref} on all")
                            ready[mode].append(time.perf_counter() - started)
                            gets[mode].append(gets_per_blob(mirrored, repository, blobs))
        finally:
            for cri in clients:
                await cri.close()
    seeded, unseeded = median(gets["seeded"]), median(gets["unseeded"])
    time_ratio = median(ready["seeded"]) / median(ready["unseeded"])
    return emit(
        NAME,
        figure=seeded,
        unit="upstream GETs per blob, median",
        baseline=unseeded,
        ratio=seeded / unseeded,
        target="seeded upstream GETs per blob = one pull's (one seed), whatever the node count",
        met=max(gets["seeded"]) <= single,
        single_pull_gets_per_blob=single,
        seeded_gets_per_blob=gets["seeded"],
        unseeded_gets_per_blob=gets["unseeded"],
        ready_s_seeded=round(median(ready["seeded"]), 3),
        ready_s_unseeded=round(median(ready["unseeded"]), 3),
        ready_time_ratio=round(time_ratio, 3),
        nodes=nodes,
        layer_kib=layer // 1024,
        repeat=runs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
