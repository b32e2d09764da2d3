"""The fault schedule: drawn up front from the seed, then played against the running cluster.

A schedule is a list of :class:`Fault` (when, what, on whom, for how long, with which
parameters), a pure function of the seed and the run's shape, so a failing run is replayed by
passing its seed again. At most one fault hits a given target at a time, and at most one NATS
server is down or cut off at a time: losing a quorum is a different promise (the log then stops
accepting writes; see docs/guarantees.md), not what this soak measures.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.cluster import Cluster
from image_syncer.sandbox.fakekube import FakeKube

__all__ = ["KINDS", "Fault", "Injector", "schedule"]

# kind -> weight. Instant faults (watch_*) have no duration.
KINDS: dict[str, int] = {
    "node_partition": 4,
    "nats_partition": 2,
    "slow_link": 3,
    "nats_kill": 2,
    "syncer_kill": 3,
    "broadcaster_kill": 2,
    "containerd_kill": 2,
    "registry_down": 2,
    "watch_expired": 2,
    "watch_dropped": 1,
}
_NATS_KINDS = {"nats_partition", "nats_kill"}
_INSTANT = {"watch_expired", "watch_dropped"}


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    target: str
    duration: float
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _target(rng: random.Random, kind: str, nodes: list[str]) -> str:
    if kind in ("node_partition", "syncer_kill", "containerd_kill"):
        return rng.choice(nodes)
    if kind in _NATS_KINDS:
        return rng.choice(["n0", "n1", "n2"])
    if kind == "slow_link":
        return rng.choice([*nodes, "n0", "n1", "n2"])
    if kind == "broadcaster_kill":
        return rng.choice(["broadcaster-0", "broadcaster-1"])
    if kind == "registry_down":
        return rng.choice(["public", "private"])
    return "kube"


def schedule(
    seed: int, seconds: float, nodes: list[str], without: frozenset[str] = frozenset()
) -> list[Fault]:
    """The faults of a run of ``seconds`` on ``nodes``; the same arguments give the same list.
    Kinds in ``without`` are drawn but not injected, so the others keep their places."""
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    busy: dict[str, float] = {}  # target (or "nats") -> when its current fault ends
    faults: list[Fault] = []
    at = rng.uniform(3.0, 6.0)
    end = seconds - 5.0
    while at < end:
        kind = rng.choices(kinds, weights)[0]
        target = _target(rng, kind, nodes)
        lane = (
            "nats"
            if kind in _NATS_KINDS
            or (kind == "slow_link" and target[0] == "n" and not target.startswith("node"))
            else target
        )
        duration = 0.0 if kind in _INSTANT else round(min(rng.uniform(3.0, 20.0), end - at), 1)
        params: dict[str, Any] = {}
        if kind == "slow_link":
            params = {
                "rate_kbit": rng.choice([64, 128, 256, 512]),
                "loss_percent": rng.choice([1, 5, 10, 30]),
            }
        free = busy.get(lane, 0.0) <= at and busy.get(target, 0.0) <= at
        if free and kind not in without:
            faults.append(Fault(round(at, 1), kind, target, duration, params))
            busy[lane] = busy[target] = at + duration + 1.0
        at += rng.uniform(1.5, 6.0)
    return faults


class Injector:
    """Plays a schedule; every fault ends healed (or restarted) by the time it returns."""

    def __init__(self, cluster: Cluster, kube: FakeKube, log: Callable[[str], None]) -> None:
        self.cluster, self.kube, self.log = cluster, kube, log
        self.injected: dict[str, int] = {}
        self.last_heal = 0.0

    async def play(self, faults: list[Fault], started: float) -> None:
        await asyncio.gather(*(self._one(fault, started) for fault in faults))

    async def _one(self, fault: Fault, started: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, started + fault.at - loop.time()))
        self.log(f"fault   {fault.describe()}")
        heal = await asyncio.to_thread(self._inject, fault)
        self.injected[fault.kind] = self.injected.get(fault.kind, 0) + 1
        if heal is not None:
            await asyncio.sleep(fault.duration)
            await asyncio.to_thread(heal)
            self.log(f"healed  {fault.kind} {fault.target}")
        self.last_heal = max(self.last_heal, loop.time())

    def _inject(self, fault: Fault) -> Callable[[], object] | None:
        cluster = self.cluster
        nodes = {node.name: node for node in cluster.nodes}
        servers = {server.server_name: server for server in cluster.nats}
        nats_addresses = {cluster.nats_host(s).address for s in cluster.nats}
        kind, target = fault.kind, fault.target
        if kind == "node_partition":
            host = nodes[target].host
            host.cut(nats_addresses)
            return host.heal
        if kind == "nats_partition":
            host = cluster.nats_host(servers[target])
            host.cut(nats_addresses - {host.address})
            return host.heal
        if kind == "slow_link":
            host = nodes[target].host if target in nodes else cluster.nats_host(servers[target])
            host.shape(**fault.params)
            return host.unshape
        if kind == "nats_kill":
            server = servers[target]
            server.stop(kill=True)
            return functools.partial(server.start, wait=False)
        if kind == "syncer_kill":
            syncer = nodes[target].syncer
            syncer.stop(kill=True)
            return syncer.start
        if kind == "containerd_kill":
            containerd = nodes[target].containerd
            containerd.stop(kill=True)
            return functools.partial(containerd.start, timeout=120)
        if kind == "broadcaster_kill":
            broadcaster = next(b for b in cluster.broadcasters if b.identity == target)
            broadcaster.stop(kill=True)
            return broadcaster.start
        if kind == "registry_down":
            registry = cluster.registry if target == "public" else cluster.private
            registry.stop(kill=True)
            return registry.start
        if kind == "watch_expired":
            self.kube.compact()
            self.kube.drop_watches()
            return None
        if kind == "watch_dropped":
            self.kube.drop_watches()
            return None
        raise ValueError(f"unknown fault kind {kind}")
