"""The syncer's own objects, wired as ``syncer.runner`` wires them, for in-process benchmarks.

Benchmarks measure the real replay and live paths (``FleetConsumer``), so they build the same
graph the runner builds: desired state, puller, inventory, reconciler, consumer, with any CRI
client. :func:`idle_loops` adds what else a syncer runs while idle and what talks to NATS: the
status reporter, the node-images follower, the replay-request watch and the periodic reconcile
(whose time rides on the heartbeat), wired as ``syncer.runner`` and ``syncer.node.gatekeeper`` wire
them, so a simulated node costs NATS what a real one does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from nats.js import JetStreamContext

from bench.fakeruntime import MemoryRuntime
from bench.services import PREFIX
from ops.retry import Backoff
from ops.serving import Health
from syncer.folding.desired import DesiredState
from syncer.node.nodeimages import NodeImageSet
from syncer.pulling.inventory import Inventory
from syncer.pulling.puller import Puller
from syncer.pulling.reconcile import Reconciler
from syncer.pulling.runtimehealth import RuntimeHealth
from syncer.reading.consumer import FleetConsumer
from syncer.reporting.nodestate import node_state
from syncer.reporting.replayrequests import ReplayRequests
from syncer.reporting.reporter import StatusReporter
from syncer.runtime.cri import CriClient
from syncer.settings import SyncerSettings
from wire.natsconn import NatsSettings
from wire.nodestatus import StatusSettings

__all__ = ["Node", "idle_loops", "node"]

# Replay never touches the runtime; a client to a socket that does not exist proves it.
NO_RUNTIME = "unix:///nonexistent/bench-cri.sock"


@dataclass
class Node:
    settings: SyncerSettings
    desired: DesiredState
    puller: Puller
    inventory: Inventory
    reconciler: Reconciler
    consumer: FleetConsumer
    health: Health


def node(
    js: JetStreamContext,
    nats: NatsSettings,
    name: str = "bench",
    cri: CriClient | MemoryRuntime | None = None,
) -> Node:
    settings = SyncerSettings(node_name=name, subject_prefix=PREFIX, metrics_addr="", nats=nats)
    # A MemoryRuntime has every CriClient method the syncer calls, without being one.
    client = cast(CriClient, cri) if cri is not None else CriClient(NO_RUNTIME)
    health = Health()
    desired = DesiredState()
    puller = Puller(
        client,
        max_parallel=settings.pulls.max_parallel,
        pull_timeout=settings.pulls.timeout,
        backoff=Backoff(settings.pulls.backoff_min, settings.pulls.backoff_max),
    )
    inventory = Inventory(desired, puller)
    runtime = RuntimeHealth(client, health)
    puller.subscribe(runtime.on_pull_result)
    reconciler = Reconciler(client, desired, inventory, runtime, health)
    consumer = FleetConsumer(
        js,
        settings.consumer,
        desired,
        inventory,
        health,
        node=settings.node_name,
        prefix=settings.subject_prefix,
    )
    return Node(settings, desired, puller, inventory, reconciler, consumer, health)


async def idle_loops(
    parts: Node, js: JetStreamContext, stopping: asyncio.Event
) -> list[Coroutine[Any, Any, None]]:
    """After the replay and the durable's start: the loops an idle syncer runs, ready to run
    (the node images and a pending replay request are read first, as the runner does)."""
    settings = parts.settings
    status = StatusSettings(prefix=settings.subject_prefix, node_ttl=settings.status.ttl)
    images = NodeImageSet(settings.pulls.extra_images)
    pushed = images.follower(js, settings.subject_prefix, settings.durable)
    await images.load(pushed)
    parts.desired.set_node_images(images.sources)
    requests = ReplayRequests(js, settings.node_name, status, rebuild=parts.consumer.rebuild)
    await requests.find_pending()
    reporter = StatusReporter(
        js,
        status,
        settings.node_name,
        lambda: node_state(
            parts.desired,
            parts.inventory,
            last_reconcile=parts.reconciler.last_reconcile,
            replayed_request=requests.honoured,
            log_created=parts.consumer.stream_created,
        ),
        interval=settings.status.interval,
        heartbeat=max(settings.status.heartbeat, settings.status.interval),
    )
    return [
        parts.consumer.run(stopping),
        parts.reconciler.run(settings.pulls.period, stopping),
        reporter.run(stopping),
        images.follow(pushed, stopping),
        requests.watch(stopping),
    ]
