"""``./dev chaos``: the soak itself: build, churn under faults, settle, check, print the figures.

The run: make the network (chaos.netns), move this process into its hub, start every component
(chaos.cluster), push the image pool, check the system converges once without faults (a broken
setup fails here, not as a "violation"), then for ``--minutes`` change Fleets at a seeded pace
while the seeded fault schedule plays (chaos.faults). When the last fault is healed the workload
stops and every node is polled until it has converged (chaos.invariant), with a deadline
(``--settle``). The figures are one JSON line on stdout; a violation also prints the seed, the
schedule and the diff, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from chaos.cluster import Cluster
from chaos.faults import KINDS, Fault, Injector, schedule
from chaos.invariant import log_violations, node_violations, violations
from chaos.netns import Network, NetworkError, enter, remove_leftovers
from chaos.workload import Workload
from image_syncer.sandbox.fakekube import FakeKube
from wire.natsconn import NatsSettings, connect

__all__ = ["main"]

PREFIX = "chaos"
_COUNTER = re.compile(r"^(image_syncer_syncer_[a-z_]+_total)(\{[^}]*\})? ([0-9.e+]+)$", re.M)


def say(line: str) -> None:
    print(f"chaos {time.strftime('%H:%M:%S')} {line}", flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return round(ordered[int(rank) - 1], 1)


class Sampler:
    """Scrapes every syncer's counters; a restarted syncer starts from zero, so values are kept
    per incarnation and summed."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.seen: dict[tuple[str, int], dict[str, float]] = {}

    def scrape(self) -> None:
        for node in self.cluster.nodes:
            key = (node.name, node.syncer.starts)
            try:
                with urllib.request.urlopen(node.syncer.metrics_url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            values: dict[str, float] = {}
            for name, labels, value in _COUNTER.findall(text):
                series = name + (labels or "")
                values[series] = float(value)
            self.seen[key] = values

    def total(self, series: str) -> int:
        return int(sum(values.get(series, 0.0) for values in self.seen.values()))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.scrape)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)


async def _converge(
    js: Any,
    cluster: Cluster,
    kube: FakeKube,
    pool: set[str],
    deadline: float,
    since: float,
) -> dict[str, float]:
    """Poll until the log and every node converge (or the deadline); node -> seconds taken."""
    loop = asyncio.get_running_loop()
    taken: dict[str, float] = {}
    log_ok = False
    while loop.time() < deadline and len(taken) < len(cluster.nodes):
        # A component still recovering makes a check raise: poll on.
        with contextlib.suppress(Exception):
            log_ok = log_ok or not await log_violations(js, PREFIX, kube)
            if log_ok:
                for node in cluster.nodes:
                    if node.name not in taken and not await node_violations(
                        js, PREFIX, node, kube, pool
                    ):
                        taken[node.name] = round(loop.time() - since, 1)
        await asyncio.sleep(0.5)
    return taken


async def soak(args: argparse.Namespace, seed: int, network: Network, directory: Path) -> int:
    loop = asyncio.get_running_loop()
    seconds = args.minutes * 60.0
    kube = FakeKube(directory / "kube").start()
    cluster = Cluster(
        network, directory, nodes=args.nodes, prefix=PREFIX, kubeconfig=kube.kubeconfig
    )
    nc = None
    try:
        say(f"seed {seed}: starting 3 NATS servers, {args.nodes} nodes, 2 broadcasters")
        await asyncio.to_thread(cluster.start)
        public = [await asyncio.to_thread(cluster.registry.push) for _ in range(10)]
        private = [await asyncio.to_thread(cluster.private.push) for _ in range(2)]
        pool = set(public) | set(private)
        nc = await connect(NatsSettings(servers=tuple(cluster.nats_urls.split(","))), name="chaos")
        js = nc.jetstream(timeout=10)
        workload = Workload(kube, public, private, seed=seed)
        pace = random.Random(seed + 1)

        # Without faults first: a setup that cannot converge is not a finding.
        for _ in range(6):
            workload.step()
        start = loop.time()
        warm = await _converge(js, cluster, kube, pool, start + args.settle, start)
        if len(warm) < len(cluster.nodes):
            found = await violations(js, PREFIX, cluster, kube, pool)
            say("setup did not converge before any fault:\n  " + "\n  ".join(found))
            return 2
        say(f"converged without faults in {max(warm.values())}s; faults for {args.minutes} min")

        nodes = [node.name for node in cluster.nodes]
        faults = schedule(seed, seconds, nodes, frozenset(args.without))
        (directory / "schedule.jsonl").write_text("".join(f.describe() + "\n" for f in faults))
        injector = Injector(cluster, kube, say)
        sampler = Sampler(cluster)
        stop_sampling = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop_sampling))
        started = loop.time()
        playing = asyncio.create_task(injector.play(faults, started))
        while loop.time() < started + seconds:
            await asyncio.to_thread(workload.step)
            await asyncio.sleep(pace.uniform(0.2, 1.0))  # the users' pace, not a wait
        await playing
        faults_over = max(injector.last_heal, loop.time())
        say(f"faults over ({len(faults)} injected, {workload.total} Fleet changes); settling")
        taken = await _converge(js, cluster, kube, pool, faults_over + args.settle, faults_over)
        found = await violations(js, PREFIX, cluster, kube, pool)
        stop_sampling.set()
        await sampling
        await asyncio.to_thread(sampler.scrape)
        figures = _figures(args, seed, faults, injector, workload, taken, found, sampler, cluster)
        print(json.dumps(figures, sort_keys=True), flush=True)
        if found:
            _report(args, seed, faults, found, directory)
            return 1
        return 0
    finally:
        if nc is not None:
            await nc.close()
        await asyncio.to_thread(cluster.stop)
        kube.stop()


def _figures(
    args: argparse.Namespace,
    seed: int,
    faults: list[Fault],
    injector: Injector,
    workload: Workload,
    taken: dict[str, float],
    found: list[str],
    sampler: Sampler,
    cluster: Cluster,
) -> dict[str, Any]:
    pulls = sampler.total('image_syncer_syncer_pulls_total{result="success"}')
    needed = len(workload.ever_wanted) * len(cluster.nodes)
    times = list(taken.values())
    return {
        "chaos": "soak",
        "seed": seed,
        "minutes": args.minutes,
        "nodes": len(cluster.nodes),
        "faults": dict(sorted(injector.injected.items())),
        "faults_total": sum(injector.injected.values()),
        "faults_scheduled": len(faults),
        "fleet_events": workload.total,
        "fleet_events_by_kind": dict(sorted(workload.changes.items())),
        "violations": len(found),
        "converge_after_last_fault_s": {
            "p50": percentile(times, 50) if times else None,
            "p99": percentile(times, 99) if times else None,
            "converged_nodes": len(times),
        },
        "messages_redelivered": sampler.total("image_syncer_syncer_messages_redelivered_total"),
        "pulls_succeeded": pulls,
        # Pulls beyond one per (node, image an admitted Fleet ever wanted): re-pulls after a
        # --remove-unused removal count too, so this is an upper bound on wasted pulls.
        "pulls_repeated": max(0, pulls - needed),
        "restarts": {
            "syncer": sum(n.syncer.starts - 1 for n in cluster.nodes),
            "broadcaster": sum(b.starts - 1 for b in cluster.broadcasters),
        },
    }


def _report(
    args: argparse.Namespace, seed: int, faults: list[Fault], found: list[str], directory: Path
) -> None:
    print(f"\nINVARIANT VIOLATED (seed {seed}); the fault schedule:", file=sys.stderr)
    for fault in faults:
        print(f"  {fault.describe()}", file=sys.stderr)
    print("what differs:", file=sys.stderr)
    for line in found:
        print(f"  {line}", file=sys.stderr)
    print(
        f"replay: ./dev chaos --minutes {args.minutes} --seed {seed}   (logs kept in {directory})",
        file=sys.stderr,
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chaos", description="Faults at random, then exact convergence (needs root)."
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the fault phase")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--settle", type=float, default=300.0, help="seconds allowed to converge after faults"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where state and logs go")
    parser.add_argument("--keep", action="store_true", help="keep --dir even after a pass")
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=sorted(KINDS),
        help="leave out a fault kind (repeatable)",
    )
    return parser.parse_args(argv)


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if os.geteuid() != 0:
        print("chaos: needs root (network namespaces, iptables); run as root", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1, 2**31)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="chaos-"))
    directory.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminated)
    status = 2
    network = Network()
    try:
        for name in remove_leftovers():
            say(f"removed namespace {name} of a soak that died")
        network.create()
        # Before any thread exists: the whole process (and its children) then lives in the hub.
        enter(network.hub.namespace)
        status = asyncio.run(soak(args, seed, network, directory))
    except NetworkError as e:
        print(f"chaos: cannot build the network: {e}", file=sys.stderr)
    finally:
        network.remove()
        if status == 0 and not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return status
