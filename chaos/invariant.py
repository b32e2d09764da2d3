"""The end state every soak must reach once faults stop: exact convergence, checked from outside.

Each check reads the truth from its own source, never from the system's opinion of itself:
the API server's Fleets (the fake API server's store), the event log (read from NATS), each
node's images (``ctr``, containerd's own CLI), each node's status entry, and each durable's
consumer info. :func:`violations` returns what differs, as lines a human can act on; none means
converged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from chaos.cluster import Cluster, Node
from chaos.workload import admitted_images
from image_syncer.sandbox.fakekube import FakeKube
from wire.contract import Kind, decode_event
from wire.eventlog import read_log, stream_name
from wire.nodestatus import StatusSettings, get_status, open_status_bucket
from wire.permissions import durable_name

__all__ = ["log_violations", "node_violations", "violations"]


async def log_state(js: JetStreamContext, prefix: str) -> dict[str, str]:
    """The log's fold: ``namespace/name`` -> resourceVersion of each live Fleet."""
    state: dict[str, str | None] = {}
    async for message in read_log(js, stream_name(prefix, Kind.FLEET)):
        event = decode_event(message.data)
        meta = event.obj.metadata
        key = f"{meta.namespace}/{meta.name}"
        state[key] = None if event.action == "deleted" else meta.resource_version
    return {key: rv for key, rv in state.items() if rv is not None}


def cluster_state(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"]
        for o in objects
    }


def _diff(what: str, want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            lines.append(f"{what} {key}: want {want.get(key)!r}, got {got.get(key)!r}")
    return lines


async def log_violations(js: JetStreamContext, prefix: str, kube: FakeKube) -> list[str]:
    """The log equals the API server's Fleets (each at its resourceVersion)."""
    return _diff("log", cluster_state(kube.objects()), await log_state(js, prefix))


async def node_violations(
    js: JetStreamContext, prefix: str, node: Node, kube: FakeKube, pool: set[str]
) -> list[str]:
    """The node holds exactly the admitted Fleets' images, says so, and its durable is drained."""
    admitted = admitted_images(kube.objects())
    wanted = set().union(*admitted.values()) if admitted else set()
    found: list[str] = []
    held = await asyncio.to_thread(node.containerd.image_refs)
    on_node = held & pool
    found += [f"{node.name}: missing image {i}" for i in sorted(wanted - on_node)]
    found += [f"{node.name}: image not removed {i}" for i in sorted(on_node - wanted)]
    kv = await open_status_bucket(js, StatusSettings(prefix=prefix))
    status = await get_status(kv, node.name) if kv is not None else None
    if status is None:
        found.append(f"{node.name}: no status entry")
    else:
        summary = status.summary
        found += _diff(
            f"{node.name} status fleet",
            {f: True for f in admitted},
            {f: True for f in summary.fleets},
        )
        found += [f"{node.name}: status reports gap {f}: {g}" for f, g in summary.gaps.items()]
        found += [
            f"{node.name}: status reports missing {i}: {m}" for i, m in summary.missing.items()
        ]
    try:
        info = await js.consumer_info(stream_name(prefix, Kind.FLEET), durable_name(node.name))
    except nats.js.errors.NotFoundError:
        return [*found, f"{node.name}: durable {durable_name(node.name)} does not exist"]
    if info.num_pending or info.num_ack_pending:
        found.append(
            f"{node.name}: durable stuck: {info.num_pending} pending, "
            f"{info.num_ack_pending} awaiting ack"
        )
    return found


async def violations(
    js: JetStreamContext, prefix: str, cluster: Cluster, kube: FakeKube, pool: set[str]
) -> list[str]:
    """Everything that is not as it must be at the end; empty when the cluster converged."""
    found = [f"process crashed: {what}" for what in cluster.crashed()]
    try:
        found += await log_violations(js, prefix, kube)
        for node in cluster.nodes:
            found += await node_violations(js, prefix, node, kube, pool)
    except (nats.errors.Error, TimeoutError, RuntimeError) as e:
        found.append(f"could not check: {e!r}")
    return found
