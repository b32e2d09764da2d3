"""Faults on NATS: a server restarted (and killed) mid-stream, a 3-node cluster losing a node.

Events flow through the whole pipeline while the fault happens; each test ends with the log
holding exactly the cluster's Fleets and every node exactly their images.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js import JetStreamContext
from support.fakekube import FakeKube
from support.faults_harness import (
    Churn,
    Images,
    InProcessBroadcaster,
    InProcessSyncer,
    broadcaster_settings,
    eventually,
    node_name,
    syncer_settings,
    wait_all_converged,
)
from support.natscluster import NatsCluster
from support.syncer_harness import override

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from syncer.settings import durable_name
from wire.contract import Kind
from wire.eventlog import LogSettings, stream_name
from wire.natsconn import NatsSettings, connect

pytestmark = [pytest.mark.nats, pytest.mark.cri]


async def _churn_while(churn: Churn, fault: asyncio.Future[Any], pace: float = 0.05) -> None:
    """Keep changing Fleets until the fault (running in a thread) is over."""
    while not fault.done():
        churn.step()
        await asyncio.sleep(pace)  # pacing the changes, not waiting for anything
    fault.result()


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_nats_restarted_mid_stream(
    kube: FakeKube,
    own_nats_server: NatsServer,
    containerd: Containerd,
    prefix: str,
    push: Callable[..., str],
    kill: bool,
) -> None:
    nats = NatsSettings(servers=(own_nats_server.url,))
    log = LogSettings(prefix=prefix)
    images = Images(push, 5)
    churn = Churn(kube, images, seed=11)
    nc = await connect(nats, name="tests")
    js = nc.jetstream()
    broadcaster = await InProcessBroadcaster(broadcaster_settings(kube, nats, log)).start()
    syncer = await InProcessSyncer(
        syncer_settings(node_name(), containerd, nats, prefix), containerd
    ).start()
    nodes = [(syncer.node, containerd)]
    try:
        churn.steps(6)
        await wait_all_converged(js, prefix, kube, nodes, images)
        for _ in range(2):
            restart = asyncio.ensure_future(asyncio.to_thread(own_nats_server.restart, kill=kill))
            await _churn_while(churn, restart)
            churn.steps(3)
        await eventually(lambda: nc.is_connected, "the test client reconnected")
        await wait_all_converged(js, prefix, kube, nodes, images)
    finally:
        await syncer.stop()
        await broadcaster.stop()
        await nc.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as running:
        yield running


async def _leader_of(js: JetStreamContext, stream: str, consumer: str | None = None) -> str:
    if consumer is None:
        info = await js.stream_info(stream)
    else:
        info = await js.consumer_info(stream, consumer)
    assert info.cluster is not None and info.cluster.leader
    return info.cluster.leader


async def test_r3_cluster_loses_the_node_holding_the_syncers_consumer(
    kube: FakeKube,
    cluster: NatsCluster,
    containerd: Containerd,
    prefix: str,
    push: Callable[..., str],
) -> None:
    servers = NatsSettings(servers=cluster.urls)
    log = LogSettings(prefix=prefix, replicas=3)
    images = Images(push, 5)
    churn = Churn(kube, images, seed=5)
    nc = await connect(servers, name="tests")
    js = nc.jetstream(timeout=10)
    broadcaster = await InProcessBroadcaster(broadcaster_settings(kube, servers, log)).start()
    # The node status and pulled-image buckets are replicated like the log, as in production.
    settings = override(
        syncer_settings(node_name(), containerd, servers, prefix), status_replicas=3
    )
    syncer = await InProcessSyncer(settings, containerd).start()
    nodes = [(syncer.node, containerd)]
    stream = stream_name(prefix, Kind.FLEET)
    try:
        info = await js.stream_info(stream)
        assert info.cluster is not None
        assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2
        churn.steps(6)
        await wait_all_converged(js, prefix, kube, nodes, images)
        # The syncer's durable is R1 in memory: it lives on one server. Lose that one.
        victim = cluster.by_name(await _leader_of(js, stream, durable_name(syncer.node)))
        stop = asyncio.ensure_future(asyncio.to_thread(victim.stop, kill=True))
        await _churn_while(churn, stop)
        churn.steps(6)

        async def stream_has_a_leader() -> bool:
            try:
                return await _leader_of(js, stream) != victim.server_name
            except (nats.errors.Error, TimeoutError, AssertionError):
                return False

        await eventually(stream_has_a_leader, "a stream leader among the survivors")
        await wait_all_converged(js, prefix, kube, nodes, images, timeout=60)

        # The consumer was re-created on a surviving server. Eventually: the node can converge
        # through a refold of the whole log before its new durable has settled (a delete sent
        # while the cluster had no leader may still remove it, and the syncer makes it again).
        async def durable_on_a_survivor() -> bool:
            try:
                leader = await _leader_of(js, stream, durable_name(syncer.node))
            except (nats.errors.Error, TimeoutError, AssertionError):
                return False
            return leader != victim.server_name

        await eventually(durable_on_a_survivor, "the durable re-created on a surviving server")
        # And the node comes back without disturbing anything.
        await asyncio.to_thread(victim.start)
        churn.steps(4)
        await wait_all_converged(js, prefix, kube, nodes, images)
    finally:
        await syncer.stop()
        await broadcaster.stop()
        await nc.close()
