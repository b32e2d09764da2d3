"""What the startup-taint gate's integration tests share: a gated syncer's settings and Node on
the fake API server, the Node's taints, and the gate's state as the node's status reports it.
"""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext

from support import polling
from support.fakekube import FakeKube
from support.syncer_harness import override
from syncer.settings import SyncerSettings
from wire.nodestatus import GateStatus, NodeStatus, StatusSettings, get_status, open_status_bucket

__all__ = [
    "GATE",
    "GATE_TAINT",
    "OTHER",
    "gate_of",
    "gated",
    "node_status",
    "taints",
    "until_gate",
]


GATE = "image-syncer.octops.io/images-not-ready"
GATE_TAINT = {"key": GATE, "effect": "NoSchedule"}
OTHER = {"key": "dedicated", "value": "gameservers", "effect": "NoSchedule"}


def gated(settings: SyncerSettings, kube: FakeKube, **changes: Any) -> SyncerSettings:
    kube.create(
        "nodes",
        {
            "metadata": {"name": settings.node_name, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"taints": [OTHER, GATE_TAINT]},
        },
    )
    return override(
        settings, startup_taint=GATE, kube_api_url=kube.url, node_refresh=0.5, **changes
    )


def taints(kube: FakeKube, node: str) -> list[dict[str, Any]]:
    stored = kube.get("nodes", "", node)
    assert stored is not None
    return list(stored["spec"].get("taints") or [])


async def node_status(js: JetStreamContext, settings: SyncerSettings) -> NodeStatus | None:
    kv = await open_status_bucket(js, StatusSettings(prefix=settings.subject_prefix))
    return None if kv is None else await get_status(kv, settings.node_name)


async def gate_of(js: JetStreamContext, settings: SyncerSettings) -> GateStatus | None:
    status = await node_status(js, settings)
    return None if status is None else status.summary.gate


async def until_gate(
    js: JetStreamContext, settings: SyncerSettings, state: str, what: str
) -> GateStatus:
    found: list[GateStatus] = []

    async def check() -> bool:
        gate = await gate_of(js, settings)
        if gate is not None and gate.state == state:
            found.append(gate)
            return True
        return False

    await polling.eventually(check, what)
    return found[-1]
