"""Seeding with real parts: three containerd nodes behind a Distribution pull-through cache.

Every node's containerd has ``config_path`` pointing at a ``hosts.toml`` that sends pulls of the
upstream registry's images through the cache (the recipe of the docs). How often the upstream
serves each blob is read from the upstream's own access log. One pull of an image through the
cache, made before the syncers run, says what a single fetch costs the upstream (Distribution
2.8 fetches a blob it does not hold twice: once to stream it, once to store it): with seeding,
three nodes cost exactly that per seed, whatever the node count.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import nats.js.errors
import pytest
from nats.js import JetStreamContext
from support.fakenodeapi import OpenApiServer
from support.fleetdicts import fleet
from support.syncer_harness import (
    RunningSyncer,
    eventually,
    info_logs_fixture,
    logged,
    override,
    settings_with,
)

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.images import build_image, push_image
from image_syncer.sandbox.mirror import MirroredRegistry
from syncer.folding.references import normalize
from syncer.pulling.leases import Lease, alive_key, take
from syncer.pulling.pullbudget import budget_bucket, image_hash, open_budget_bucket
from syncer.pulling.seeding import SeedSettings
from syncer.runtime.cri import CriClient
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings, publish_event
from wire.natsconn import NatsSettings
from wire.nodestatus import MissingState, bucket_name, get_status

pytestmark = pytest.mark.nats

__all__ = ["info_logs_fixture"]

LAYER_BYTES = 2 * 1024 * 1024
ZONE = "topology.kubernetes.io/zone"


def node_settings(
    runtime: Containerd, nats_settings: NatsSettings, prefix: str, **more: object
) -> SyncerSettings:
    settings = settings_with(
        node_name=f"node-{uuid.uuid4().hex[:6]}.example",
        cri_endpoint=runtime.endpoint,
        sync_period=1.0,
        pull_timeout=60.0,
        pull_backoff_min=0.2,
        pull_backoff_max=1.0,
        subject_prefix=prefix,
        metrics_addr="",
        status_interval=0.2,
        nats=nats_settings,
    )
    return override(settings, **more)


# Starts syncers with these settings, in-process; they are stopped after the test.
RunNodes = Callable[[list[SyncerSettings]], Awaitable[list[RunningSyncer]]]


@pytest.fixture
async def run_nodes() -> AsyncIterator[RunNodes]:
    running: list[RunningSyncer] = []

    async def start(all_settings: list[SyncerSettings]) -> list[RunningSyncer]:
        started = await asyncio.gather(*(RunningSyncer(s).start() for s in all_settings))
        running.extend(started)
        return list(started)

    yield start
    for syncer in running:
        if syncer.task is not None and not syncer.task.done():
            assert await syncer.stop() == 0


def push_upstream(mirrored: MirroredRegistry) -> tuple[str, str, set[str]]:
    """A fresh image in the upstream: (reference, repository, its blob digests)."""
    repository = f"game/seeded-{uuid.uuid4().hex[:10]}"
    image = build_image(layer_bytes=LAYER_BYTES)
    push_image(mirrored.upstream.address, repository, "v1", image=image)
    blobs = {digest(image.layer), digest(image.config)}
    return f"{mirrored.upstream.address}/{repository}:v1", repository, blobs


def digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


async def single_fetch_cost(mirrored: MirroredRegistry, runtime: Containerd) -> int:
    """What one pull of a new image through the cache costs the upstream, per blob."""
    ref, repository, blobs = push_upstream(mirrored)
    cri = CriClient(runtime.endpoint, call_timeout=30)
    try:
        await cri.pull_image(ref, None, timeout=60)
    finally:
        await cri.close()
    counts = mirrored.upstream_blob_gets(repository)
    assert set(counts) == blobs and len(set(counts.values())) == 1, counts
    return next(iter(counts.values()))


def holds(runtime: Containerd, ref: str) -> bool:
    return ref in runtime.image_refs()


async def test_with_a_mirror_the_upstream_serves_each_blob_once_per_seed_for_any_node_count(
    mirrored: MirroredRegistry,
    mirror_nodes: list[Containerd],
    nats_settings: NatsSettings,
    prefix: str,
    js: JetStreamContext,
    log_settings: LogSettings,
    run_nodes: RunNodes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    per_fetch = await single_fetch_cost(mirrored, mirror_nodes[0])
    ref, repository, blobs = push_upstream(mirrored)
    mirror = (mirrored.upstream.address,)
    await run_nodes([node_settings(n, nats_settings, prefix, mirror=mirror) for n in mirror_nodes])
    await publish_event(js, log_settings, "fleet.events.added", fleet("game", ref))
    for runtime in mirror_nodes:
        await eventually(partial(holds, runtime, ref), "every node to hold it")
    counts = mirrored.upstream_blob_gets(repository)
    # One seed: each blob left the upstream as often as for one single pull, not three times.
    assert counts == {blob: per_fetch for blob in blobs}, (counts, per_fetch)
    assert len(logged(caplog, "seed complete")) == 1


async def hold_seed(js: JetStreamContext, prefix: str, family: str) -> asyncio.Task[None]:
    """Another node holds the family's seed lease (syncer.pulling.leases), renewing it as a seed would,
    until the returned task is cancelled."""
    await open_budget_bucket(js, prefix, 1)
    ttl = SeedSettings.lease
    bucket = budget_bucket(prefix)
    revision = await take(js, bucket, family, "node-elsewhere", limit=1, ttl=ttl, max_hold=600)
    assert revision is not None
    subject = f"$KV.{bucket}.{alive_key(family, 'node-elsewhere')}"
    lease = Lease(js, subject, "node-elsewhere", revision, ttl, lambda e: None)
    return asyncio.create_task(lease.keep())


async def test_nodes_wait_for_the_seed_and_say_so(
    mirrored: MirroredRegistry,
    mirror_nodes: list[Containerd],
    nats_settings: NatsSettings,
    prefix: str,
    js: JetStreamContext,
    log_settings: LogSettings,
    run_nodes: RunNodes,
) -> None:
    ref, repository, _ = push_upstream(mirrored)
    image = normalize(ref)
    settings = node_settings(mirror_nodes[0], nats_settings, prefix, mirror=("*",))
    await run_nodes([settings])
    # Another node is seeding this image (it holds the lease; the test plays it).
    holder = await hold_seed(js, prefix, f"seed.{image_hash(image)}._")
    await publish_event(js, log_settings, "fleet.events.added", fleet("game", ref))

    async def waiting_seed() -> bool:
        try:
            statuses = await js.key_value(bucket_name(prefix))
        except nats.js.errors.BucketNotFoundError:
            return False  # the node makes it with its first status write (no auth in tests)
        entry = await get_status(statuses, settings.node_name)
        missing = entry.summary.missing.get(str(image)) if entry is not None else None
        return missing is not None and missing.state is MissingState.WAITING_SEED

    await eventually(waiting_seed, "the node's status to say it waits for a seed")
    assert not holds(mirror_nodes[0], ref)
    assert mirrored.upstream_blob_gets(repository) == {}
    # The seed reports the image complete: the node pulls it.
    report = b'{"image":"%s","node":"node-elsewhere"}' % str(image).encode()
    await js.publish(
        f"$KV.{budget_bucket(prefix)}.seeded.{image_hash(image)}.node-elsewhere",
        report,
        msg_ttl=600,
    )
    await eventually(lambda: holds(mirror_nodes[0], ref), "the node to pull after the report")
    holder.cancel()


async def test_without_a_mirror_pulls_are_as_before(
    mirror_nodes: list[Containerd],
    mirrored: MirroredRegistry,
    nats_settings: NatsSettings,
    prefix: str,
    js: JetStreamContext,
    log_settings: LogSettings,
    run_nodes: RunNodes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref, _, _ = push_upstream(mirrored)
    await run_nodes([node_settings(n, nats_settings, prefix) for n in mirror_nodes])
    await publish_event(js, log_settings, "fleet.events.added", fleet("game", ref))
    for runtime in mirror_nodes:
        await eventually(partial(holds, runtime, ref), "every node to hold it")
    # No --mirror: nobody waited for a seed, nor touched the budget's bucket.
    assert not logged(caplog, "waiting for a seed") and not logged(caplog, "seeding image")
    with pytest.raises(nats.js.errors.BucketNotFoundError):
        await js.key_value(budget_bucket(prefix))


async def test_seeds_are_counted_per_value_of_the_seed_per_label(
    containerd: Containerd,
    nats_settings: NatsSettings,
    prefix: str,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    run_nodes: RunNodes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = node_settings(
        containerd, nats_settings, prefix, mirror=("*",), seed_per=ZONE, node_refresh=0.5
    )
    node = {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": settings.node_name, "labels": {ZONE: "zone-a"}},
        "spec": {},
    }
    ref = push()
    image = normalize(ref)
    # The cluster-wide group's seed is busy elsewhere; this node's zone has none yet.
    holder = await hold_seed(js, prefix, f"seed.{image_hash(image)}._")
    with OpenApiServer(node, token="unused") as api:
        await run_nodes([override(settings, kube_api_url=api.url)])
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", ref))
        await eventually(lambda: ref in containerd.image_refs(), "the zone's seed to pull")
    (seeding,) = logged(caplog, "seeding image")
    holder.cancel()
    assert seeding.lease == f"seed.{image_hash(image)}.zone-a"  # type: ignore[attr-defined]
