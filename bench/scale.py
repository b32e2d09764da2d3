"""Scale: what thousands of idle syncers cost NATS, how fast one update reaches them, status reads.

For each topology (one nats-server; three routed servers with the Fleet stream at R3) and each
node count, worker processes simulate the nodes. Each node runs what an idle syncer runs and
what talks to NATS (``bench.syncerparts``): the replay, its own durable and long poll, the fold,
the puller, the periodic reconcile, the status reporter (entry and heartbeat), and the pushed
node-images and replay-request consumers; its runtime is in memory and pulls instantly. So its
idle cost is a real syncer's (``bench.idle`` measures one real process the same way). Nodes
share a NATS connection per ``--per-connection`` nodes (15,000 TCP connections from one
machine measure the client, not NATS); every node still has its own consumers and requests.

Measured per run:
- idle: nats-server CPU (from /proc), client messages in per second (``/varz in_msgs``: every
  pull request, API request and KV write counts) and JetStream API requests per second (``/jsz``
  api.total), over ``--idle`` seconds with every node idle; per node and in total;
- fan-out: one Fleet update published, the time until each node's runtime was asked to pull the
  new image (p50/p99 over nodes, wall clock across processes), and beside it the same for as many
  bare consumers (a durable and a held pull request each, nothing else) in the same run: the
  ratio between the two is the syncer's path, not the simulator's CPU, which both share;
- server memory (``/varz mem``, summed over the cluster).

Status (once, on the single server, under a prefix of its own): ``--status-nodes`` entries
written as syncers write them (``--status-fleets`` Fleets each, all present but one image on one
node in ten), then ``image-syncer status``, ``status --json`` and ``wait --fleet`` run as an
operator runs them; their wall time and the bytes of an entry are reported.

The JSON line's figure is what one idle node sends the server per second at the largest size on
one server (target <= 0.1, issue 26). The baseline is the same figure for a bare 1 s fetch loop
per durable measured in the same run (what the syncer did before long polls); ratio
figure/baseline. 15,000 nodes (GKE's cluster limit): ``--sizes 15000 --processes 8`` on a
machine with the cores and memory for it; the worker start-up waits up to 0.2 s per node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.fakeruntime import MemoryRuntime
from bench.idle import Counter
from bench.report import emit, percentile, production_logging
from bench.services import PREFIX, log_settings
from bench.syncerparts import idle_loops, node
from image_syncer.fleets import build_fleet
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from wire.contract import AGONES_SDK_SOURCE, Kind, NodeImages
from wire.eventlog import (
    LogSettings,
    ensure_node_images_stream,
    ensure_streams,
    publish_event,
    publish_node_images,
    stream_name,
)
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import (
    NodeStatus,
    StatusSettings,
    encode_status,
    ensure_status_bucket,
    put_status,
    summarize,
)

NAME = "scale"
FLEET = "scale"
TARGET_API_PER_NODE = 0.1
# How long a bare consumer's pull request is held (the syncer's --fetch-expiry default).
RAW_EXPIRY = 30.0


def image(version: int) -> str:
    return f"registry.example/scale:v{version}"


# --- the servers ------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(cluster: bool) -> Iterator[list[NatsServer]]:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        if not cluster:
            server = NatsServer(Path(d) / "n0")
            with server:
                yield [server]
            return
        ports = [free_port() for _ in range(3)]
        routes = [f"nats-route://127.0.0.1:{p}" for p in ports]
        group = [
            NatsServer(
                Path(d) / f"n{i}",
                cluster_port=ports[i],
                routes=[r for j, r in enumerate(routes) if j != i],
                server_name=f"n{i}",
            )
            for i in range(3)
        ]
        try:
            for server in group:
                server.start(wait=False)
            for server in group:
                server.wait_ready(timeout=60)
            yield group
        finally:
            for server in group:
                server.stop()


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(group: list[NatsServer]) -> dict[str, float]:
    """Counters summed over the servers: CPU seconds, messages in, JS API requests, memory."""
    totals = {"cpu": 0.0, "in_msgs": 0.0, "api": 0.0, "mem": 0.0}
    for server in group:
        varz = _get(f"{server.monitor_url}/varz")
        jsz = _get(f"{server.monitor_url}/jsz")
        assert server.process is not None
        totals["cpu"] += _cpu_seconds(server.process.pid)
        totals["in_msgs"] += varz["in_msgs"]
        totals["mem"] += varz["mem"]
        totals["api"] += jsz.get("api", {}).get("total", 0)
    totals["at"] = time.monotonic()
    return totals


# --- a worker process: many simulated nodes ---------------------------------------------------


async def worker(urls: list[str], first: int, count: int, per_connection: int, mode: str) -> None:
    """Run nodes ``first..first+count``; print ``ready``, then ``arrived <ref> <t>`` per pull.

    ``mode``: ``syncer`` (what an idle syncer runs: the long poll, the reconcile, the status
    reporter, the node-images and replay-request followers), ``raw`` (the idle baseline: a bare
    1 s fetch loop per durable) or ``rawfan`` (the fan-out baseline: one held pull request per
    durable, nothing else, ``arrived raw <t>`` per delivery).
    """
    production_logging()
    settings = NatsSettings(servers=tuple(urls))
    stopping = asyncio.Event()
    clients = []
    tasks = []

    def pulled(ref: str, _: float) -> None:
        print(f"arrived {ref} {time.time()}", flush=True)

    async def start(index: int, js: Any) -> None:
        if mode == "rawfan":
            tasks.append(asyncio.create_task(_raw_delivery(js, f"raw-{index}", stopping)))
            return
        runtime = MemoryRuntime([image(0)], on_pull=pulled)
        parts = node(js, settings, f"scale-{index}", runtime)
        await parts.consumer.replay()
        await parts.reconciler.refresh()
        await parts.consumer.start_durable()
        if mode == "raw":
            tasks.append(asyncio.create_task(_raw_fetch_loop(parts, stopping)))
            return
        tasks.extend(asyncio.create_task(c) for c in await idle_loops(parts, js, stopping))

    for base in range(first, first + count, per_connection):
        # Retried like the real syncer: on a loaded machine a first connect can time out.
        nc = await connect(settings, name=f"scale-{base}", retry_forever=True)
        clients.append(nc)
        js = nc.jetstream(timeout=30)
        group = range(base, min(base + per_connection, first + count))
        await asyncio.gather(*(start(i, js) for i in group))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stopping.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for nc in clients:
        with contextlib.suppress(Exception):
            await nc.close()


async def _raw_fetch_loop(parts: Any, stopping: asyncio.Event) -> None:
    """The baseline: what the syncer did before long polls, a bare 1 s fetch in a loop."""
    durable = parts.consumer.durable
    while not stopping.is_set():
        try:
            for msg in await durable.fetch(64, 1.0):
                await msg.ack()
        except Exception:
            continue


async def _raw_delivery(js: Any, name: str, stopping: asyncio.Event) -> None:
    """The fan-out baseline: a durable of its own and a held pull request, no decode, no fold."""
    stream = stream_name(PREFIX, Kind.FLEET)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=name,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=name, stream=stream)
    while not stopping.is_set():
        try:
            msgs = await sub.fetch(1, timeout=RAW_EXPIRY)
        except Exception:
            continue
        if not msgs:
            continue  # the request expired: nats-py may say so with an empty batch
        print(f"arrived raw {time.time()}", flush=True)
        for msg in msgs:
            await msg.ack()


# --- one run: start nodes, idle, fan out --------------------------------------------------------


class Workers:
    def __init__(self, urls: list[str], nodes: int, processes: int, per_conn: int, mode: str):
        self.arrivals: list[tuple[str, float]] = []
        share = -(-nodes // processes)
        self.procs = []
        for p in range(processes):
            first, count = p * share, min(share, nodes - p * share)
            if count <= 0:
                continue
            command = [
                sys.executable, "-m", "bench.scale", "worker", ",".join(urls),
                str(first), str(count), str(per_conn), mode,
            ]  # fmt: skip
            self.procs.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    async def ready(self, timeout: float) -> None:
        async def one(proc: subprocess.Popen[str]) -> None:
            assert proc.stdout is not None
            while True:
                line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
                if line.strip() == "ready":
                    return
                # Pulls at start (the update a run before published) are not this run's news.
                if not line.startswith("arrived "):
                    raise RuntimeError(f"worker failed (exit {proc.poll()}): {line!r}")

        await asyncio.gather(*(one(p) for p in self.procs))
        for proc in self.procs:
            asyncio.get_running_loop().run_in_executor(None, self._collect, proc)

    def _collect(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "arrived":
                self.arrivals.append((parts[1], float(parts[2])))

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


async def run_size(
    group: list[NatsServer], nodes: int, args: argparse.Namespace, mode: str, version: int
) -> dict[str, Any]:
    urls = [s.url for s in group]
    workers = Workers(urls, nodes, args.processes, args.per_connection, mode)
    started = time.monotonic()
    try:
        await workers.ready(timeout=max(120.0, nodes * 0.2))
        startup = time.monotonic() - started
        await asyncio.sleep(min(5.0, args.idle / 4))  # settle: the start-up's own traffic
        # What the idle nodes send, by kind (a subscriber sends nothing itself).
        observer = await connect(NatsSettings(servers=(urls[0],)), name="scale observer")
        counter = Counter()
        await observer.subscribe(">", cb=counter.record)
        await observer.flush()
        before = sample(group)
        await asyncio.sleep(args.idle)
        after = sample(group)
        await observer.close()
        window = after["at"] - before["at"]
        result: dict[str, Any] = {
            "nodes": nodes,
            "start_s": round(startup, 1),
            "idle_api_per_s": round((after["api"] - before["api"]) / window, 2),
            "idle_api_per_s_per_node": round((after["api"] - before["api"]) / window / nodes, 4),
            "idle_msgs_in_per_s": round((after["in_msgs"] - before["in_msgs"]) / window, 1),
            "idle_msgs_in_per_s_per_node": round(
                (after["in_msgs"] - before["in_msgs"]) / window / nodes, 4
            ),
            "idle_server_cpu_pct": round(100 * (after["cpu"] - before["cpu"]) / window, 1),
            "server_mem_mb": round(after["mem"] / 2**20, 1),
            "idle_by_kind": dict(sorted(counter.kinds.items())),
        }
        if mode != "raw":
            result.update(await fan_out(urls, workers, nodes, version, mode == "rawfan"))
        return result
    finally:
        workers.stop()


async def fan_out(
    urls: list[str], workers: Workers, nodes: int, version: int, raw: bool
) -> dict[str, Any]:
    nc = await connect(NatsSettings(servers=tuple(urls)), name="scale publisher")
    try:
        obj = build_fleet(FLEET, [image(version)], resource_version=str(version + 1))
        published = time.time()
        await publish_event(nc.jetstream(), log_settings(), "fleet.events.updated", obj)
        wanted = "raw" if raw else image(version)
        deadline = time.monotonic() + 120
        while sum(1 for ref, _ in workers.arrivals if ref.endswith(wanted)) < nodes:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        times = [at - published for ref, at in workers.arrivals if ref.endswith(wanted)]
    finally:
        await nc.close()
    if not times:
        return {"fanout_converged": 0}
    return {
        "fanout_converged": len(times),
        "fanout_p50_ms": round(percentile(times, 50) * 1000, 1),
        "fanout_p99_ms": round(percentile(times, 99) * 1000, 1),
        "fanout_max_ms": round(max(times) * 1000, 1),
    }


async def prepare_log(group: list[NatsServer], cluster: bool) -> None:
    nc = await connect(NatsSettings(servers=tuple(s.url for s in group)), name="scale setup")
    try:
        js = nc.jetstream(timeout=30)
        settings = LogSettings(prefix=PREFIX, replicas=3 if cluster else 1)
        deadline = time.monotonic() + 120
        while True:  # a fresh cluster answers timeouts until it has elected a meta leader
            try:
                await ensure_streams(js, settings)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
        await publish_event(js, settings, "fleet.events.added", build_fleet(FLEET, [image(0)]))
        # What a real install holds besides the log: the node images a broadcaster published
        # (each node follows them), and the status bucket (each node writes and watches it).
        await ensure_node_images_stream(js, settings)
        await publish_node_images(js, settings, NodeImages(AGONES_SDK_SOURCE, [image(0)]))
        await ensure_status_bucket(js, StatusSettings(prefix=PREFIX, replicas=settings.replicas))
    finally:
        await nc.close()


async def publish_base(group: list[NatsServer], resource_version: int) -> None:
    nc = await connect(NatsSettings(servers=tuple(s.url for s in group)), name="scale base")
    try:
        obj = build_fleet(FLEET, [image(0)], resource_version=str(resource_version))
        await publish_event(nc.jetstream(timeout=30), log_settings(), "fleet.events.updated", obj)
    finally:
        await nc.close()


async def reset_durables(group: list[NatsServer]) -> None:
    """Drop every node's durable between sizes, as vanished nodes' consumers would expire."""
    nc = await connect(NatsSettings(servers=tuple(s.url for s in group)), name="scale reset")
    try:
        js = nc.jetstream(timeout=30)
        stream = stream_name(PREFIX, Kind.FLEET)
        names = [c.name async for c in _consumers(js, stream)]
        for i in range(0, len(names), 100):
            await asyncio.gather(
                *(js.delete_consumer(stream, n) for n in names[i : i + 100]),
                return_exceptions=True,
            )
    finally:
        await nc.close()


async def _consumers(js: Any, stream: str) -> Any:
    for info in await js.consumers_info(stream):
        yield info


# --- status and wait over thousands of entries ---------------------------------------------------


async def status_reads(server: NatsServer, nodes: int, fleets: int) -> dict[str, Any]:
    # A prefix of its own: the simulated nodes of the runs before left live entries (and a log)
    # under PREFIX, which `wait` would wait for until they turn stale.
    prefix = f"{PREFIX}status"
    settings = StatusSettings(prefix=prefix)
    names = [f"default/fleet-{i:03}" for i in range(fleets)]
    images = {f: [f"registry.example/{f.split('/')[1]}:v1"] for f in names}
    nc = await connect(NatsSettings(servers=(server.url,)), name="scale status")
    try:
        js = nc.jetstream(timeout=30)
        await ensure_status_bucket(js, settings)
        log = LogSettings(prefix=prefix)
        await ensure_streams(js, log)
        seqs = {}
        for fleet in names:
            obj = build_fleet(fleet.split("/")[1], images[fleet])
            ack = await publish_event(js, log, "fleet.events.added", obj)
            seqs[fleet] = ack.seq
        now = datetime.now(UTC)
        sizes = []
        for start in range(0, nodes, 200):
            batch = []
            for i in range(start, min(start + 200, nodes)):
                present = {img for imgs in images.values() for img in imgs}
                if i % 10 == 0:
                    present.discard(images[names[-1]][0])
                status = NodeStatus(
                    node=f"ip-10-0-{i // 250}-{i % 250}.ec2.internal",
                    version="0.1.0",
                    reported_at=now,
                    started_at=now,
                    summary=summarize(
                        desired=images,
                        present=present,
                        fleet_seqs=seqs,
                        failed={images[names[-1]][0]: "429 Too Many Requests"}
                        if i % 10 == 0
                        else None,
                        last_reconcile=now,
                    ),
                )
                sizes.append(len(encode_status(status)))
                batch.append(put_status(js, settings, status, timeout=30))
            await asyncio.gather(*batch)
    finally:
        await nc.close()
    cli = [sys.executable, "-m", "image_syncer"]
    common = ["--nats-url", server.url, "--subject-prefix", prefix]
    timings: dict[str, float | str] = {}
    for label, args in (
        ("status_s", ["status"]),
        ("status_json_s", ["status", "--json"]),
        ("wait_s", ["wait", "--fleet", names[0], "--timeout", "60s"]),
    ):
        began = time.monotonic()
        done = subprocess.run(  # noqa: ASYNC221 - timed on purpose, nothing else runs
            [*cli, *args, *common],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "160"},
            check=False,
        )
        timings[label] = round(time.monotonic() - began, 2)
        if done.returncode != 0:
            timings[label.replace("_s", "_error")] = done.stderr.strip()[-200:]
    return {
        "status_nodes": nodes,
        "status_fleets": fleets,
        "status_entry_bytes": round(sum(sizes) / len(sizes)),
        **timings,
    }


# --- the benchmark ------------------------------------------------------------------------------


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="1000,5000", help="node counts, comma-separated")
    parser.add_argument("--topologies", default="single,cluster")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--processes", type=int, default=4, help="worker processes")
    parser.add_argument("--per-connection", type=int, default=50, help="nodes per connection")
    parser.add_argument("--baseline-nodes", type=int, default=1000)
    parser.add_argument("--status-nodes", type=int, default=5000)
    parser.add_argument("--status-fleets", type=int, default=200)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.topologies, args.idle, args.processes = "20", "single", 3.0, 2
        args.baseline_nodes, args.status_nodes, args.status_fleets = 10, 20, 10
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {}
    baseline: dict[str, Any] = {}
    status: dict[str, Any] = {}
    for topology in args.topologies.split(","):
        cluster = topology == "cluster"
        runs[topology] = []
        with servers(cluster) as group:
            await prepare_log(group, cluster)
            if not cluster and args.baseline_nodes:
                baseline = await run_size(group, args.baseline_nodes, args, "raw", 0)
                await reset_durables(group)
            for version, nodes in enumerate(sizes, start=1):
                # The same number of bare consumers first: what NATS itself takes to deliver
                # one message to that many, on this machine, in this run.
                raw = await run_size(group, nodes, args, "rawfan", 1000 + version)
                await reset_durables(group)
                # Back to the image the nodes hold: the bare run's update is nobody's to pull
                # (pulled in the idle window, it would replace heartbeats with status writes).
                await publish_base(group, 2000 + version)
                run = await run_size(group, nodes, args, "syncer", version)
                run["fanout_p99_ratio_to_raw"] = _ratio(run, raw, "fanout_p99_ms")
                run["fanout_p50_ratio_to_raw"] = _ratio(run, raw, "fanout_p50_ms")
                run["raw_delivery"] = {k: v for k, v in raw.items() if k.startswith("fanout")}
                runs[topology].append(run)
                print(json.dumps({topology: run}), file=sys.stderr, flush=True)
                await reset_durables(group)
            if not cluster and args.status_nodes:
                status = await status_reads(group[0], args.status_nodes, args.status_fleets)
                print(json.dumps({"status": status}), file=sys.stderr, flush=True)
            if not cluster and baseline:
                print(json.dumps({"raw_fetch_loop": baseline}), file=sys.stderr, flush=True)
    first = runs.get("single") or next(iter(runs.values()))
    figure = first[-1]["idle_msgs_in_per_s_per_node"]
    base = baseline.get("idle_msgs_in_per_s_per_node") or 0.0
    return emit(
        NAME,
        figure=figure,
        unit="requests/s per idle node (client msgs in)",
        baseline=base,
        ratio=figure / base if base else 0.0,
        target=f"<= {TARGET_API_PER_NODE} requests/s per idle node",
        met=figure <= TARGET_API_PER_NODE,
        runs=runs,
        raw_fetch_loop=baseline,
        status=status,
        idle_s=args.idle,
    )


def _ratio(run: dict[str, Any], raw: dict[str, Any], key: str) -> float | None:
    if not run.get(key) or not raw.get(key):
        return None
    return round(float(run[key]) / float(raw[key]), 2)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        urls, first, count, per_conn, mode = argv[1:6]
        asyncio.run(worker(urls.split(","), int(first), int(count), int(per_conn), mode))
        return 0
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
