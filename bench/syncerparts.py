"""The syncer's own objects, wired as ``syncer.runner`` wires them, for in-process benchmarks.

Benchmarks measure the real replay and live paths (``FleetConsumer``), so they build the same
graph the runner builds: desired state, puller, inventory, reconciler, consumer, with any CRI
client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from nats.js import JetStreamContext

from bench.fakeruntime import MemoryRuntime
from bench.services import PREFIX
from ops.retry import Backoff
from ops.serving import Health
from syncer.consumer import FleetConsumer
from syncer.cri import CriClient
from syncer.desired import DesiredState
from syncer.inventory import Inventory
from syncer.puller import Puller
from syncer.reconcile import Reconciler
from syncer.runtimehealth import RuntimeHealth
from syncer.settings import SyncerSettings
from wire.natsconn import NatsSettings

__all__ = ["Node", "node"]

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
    **overrides: Any,
) -> Node:
    settings = SyncerSettings(
        node_name=name, subject_prefix=PREFIX, metrics_addr="", nats=nats, **overrides
    )
    # A MemoryRuntime has every CriClient method the syncer calls, without being one.
    client = cast(CriClient, cri) if cri is not None else CriClient(NO_RUNTIME)
    health = Health()
    desired = DesiredState()
    puller = Puller(
        client,
        max_parallel=settings.max_parallel_pulls,
        pull_timeout=settings.pull_timeout,
        backoff=Backoff(settings.backoff_min, settings.backoff_max),
    )
    inventory = Inventory(desired, puller)
    runtime = RuntimeHealth(client, health)
    puller.subscribe(runtime.on_pull_result)
    reconciler = Reconciler(client, desired, inventory, runtime, health)
    consumer = FleetConsumer(js, settings, desired, inventory, health)
    return Node(settings, desired, puller, inventory, reconciler, consumer, health)
