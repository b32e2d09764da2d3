"""A syncer that loads its pulled-image ledger from a copy of it that is behind.

The chaos soak (seed 7, RELIABILITY.md) left three images on a node for good: their pulls were
recorded (acknowledged by the stream leader), the syncer was SIGKILLed, and the restarted syncer
loaded its records with direct gets, which any replica answers. The one that answered had just
rejoined after a partition and held the ledger as it was 25 s earlier: five records of ten. The
images of the five it missed were never removed: no record of this syncer owned them any more.

A replica that knows it is behind stops answering direct gets (a cut-off follower once its
election timer fires, a mirror that lost its source), so cutting links does not reproduce that
one. Here the copy that answers the restarted syncer is a mirror of the ledger's stream that
answers its direct gets (``mirror_direct``, as a read replica would) and takes only the old
pull's record (a subject filter): it is never behind by its own measure, yet misses a record,
as the soak's replica did. The ledger itself lives on two servers of a real 3-server cluster,
the copy on the third, and until the test says so it alone answers direct gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import Placement, StreamConfig, StreamSource
from support.natscluster import NatsCluster
from support.polling import eventually

from syncer.keeping.cleaner import Cleaner
from syncer.keeping.ledger import DEFAULT_TTL, NodeLedger, ensure_ledger_bucket, record_key
from syncer.runtime.cri import RuntimeImage
from wire.directread import read_keys
from wire.kvbuckets import ttl_bucket_config
from wire.natsconn import NatsSettings, connect

pytestmark = [pytest.mark.nats]

NODE = "node-a"
BUCKET = "PULLED_BEHIND"
OLD = "registry.example.com/games/arena:1.0"
NEW = "registry.example.com/games/arena:2.0"
# How a NATS request fails while the cluster is still electing its leaders.
_NATS_DOWN = (TimeoutError, nats.errors.Error)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """n0 and n1 tagged ``side:main``, n2 ``side:copy``; clients stay on the server they were
    given (no_advertise: none learns the others' URLs)."""
    running = NatsCluster(
        tmp_path / "cluster",
        cluster_config="no_advertise: true",
        extra_config=lambda i: f'server_tags: ["side:{"copy" if i == 2 else "main"}"]',
    )
    await asyncio.to_thread(running.start)
    try:
        yield running
    finally:
        running.stop()


class Runtime:
    """The node's images (one name each) and what the cleanup removed."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.removed: list[str] = []

    def list_images(self) -> list[RuntimeImage]:
        return [
            RuntimeImage(id=f"sha256:{n}", repo_tags=(n,), repo_digests=(), size=1)
            for n in self.names
        ]

    async def remove_image(self, ref: str) -> None:
        self.names.discard(ref)
        self.removed.append(ref)


async def _client(url: str) -> Client:
    return await connect(NatsSettings(servers=(url,)), name="behind-test")


async def _copy_has(js: JetStreamContext, copy: StreamConfig) -> bool:
    info = await js.stream_info(copy.name or "")
    return info.state.messages == 1


async def _holds(nc: Client, ref: str) -> bool:
    records = await read_keys(nc.jetstream(), BUCKET, f"{NODE}.*")
    return any(ref.encode() in m.data for m in records.values())


async def test_a_ledger_loaded_from_a_copy_missing_a_record_is_not_taken(
    cluster: NatsCluster,
) -> None:
    main_side = await _client(cluster.servers[0].url)
    copy_side = await _client(cluster.servers[2].url)
    runtime = Runtime(OLD, NEW)
    try:
        js = main_side.jetstream()
        ledger_stream = replace(
            ttl_bucket_config(BUCKET, "pulled images", 2), placement=Placement(tags=["side:main"])
        )

        async def created() -> bool:  # once the cluster has elected its JetStream leader
            await js.add_stream(ledger_stream)
            return True

        await eventually(created, "the ledger created", tolerate=_NATS_DOWN)
        before_kill = await Cleaner.open(js, NODE, runtime.remove_image, grace=0, bucket=BUCKET)
        await before_kill.record_pulled(OLD)
        await before_kill.record_pulled(NEW)

        # From now on the copy alone answers direct gets: the ledger's own replicas do not.
        copy = StreamConfig(
            name="PULLED_BEHIND_COPY",
            mirror=StreamSource(
                name=ledger_stream.name or "",
                filter_subject=f"$KV.{BUCKET}.{record_key(NODE, OLD)}",
            ),
            mirror_direct=True,
            allow_msg_ttl=True,
            placement=Placement(tags=["side:copy"]),
        )
        await js.add_stream(copy)
        await eventually(lambda: _copy_has(js, copy), "the copy following the ledger")
        await js.update_stream(replace(ledger_stream, allow_direct=False))
        await eventually(lambda: _holds(copy_side, OLD), "the copy answering", tolerate=_NATS_DOWN)
        assert not await _holds(copy_side, NEW)  # what the copy answers: one record of two

        # The restarted syncer, connected where the copy answers.
        kv = await ensure_ledger_bucket(copy_side.jetstream(), BUCKET, 2, description="pulled")
        ledger = await NodeLedger.bind(copy_side.jetstream(), kv, BUCKET, DEFAULT_TTL)
        restarted = Cleaner(kv, NODE, runtime.remove_image, ledger=ledger, grace=0)
        reads = await copy_side.subscribe(f"$JS.API.DIRECT.GET.{ledger_stream.name}")
        loading = asyncio.create_task(restarted.load())

        async def asked_again_or_done() -> bool:
            return loading.done() or reads.pending_msgs >= 2

        await eventually(asked_again_or_done, "the load reading the copy twice, or done")
        # The copy's answer misses what the leader holds: the load does not take it.
        assert not loading.done(), f"loaded from the copy: {sorted(restarted.pulled)}"

        # The ledger's own replicas answer again.
        await js.update_stream(ledger_stream)
        await js.delete_stream(copy.name or "")
        await eventually(loading.done, "the load done once the ledger itself answers")
        loading.result()
        assert restarted.pulled == {OLD, NEW}
        # Both Fleets are gone: every image this syncer pulled is removed, NEW included.
        await restarted.observe([], runtime.list_images())
        assert sorted(runtime.removed) == [OLD, NEW]
    finally:
        await main_side.close()
        await copy_side.close()
