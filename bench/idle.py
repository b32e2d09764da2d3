"""Idle cost: client messages per second one idle syncer process sends, on the server's own count.

A real ``python -m image_syncer syncer`` subprocess, with its default periods, is the only
client of a private nats-server: the install's streams and status bucket exist, a broadcaster
has published the node images (the Agones SDK sidecar), ``--fleets`` Fleets are in the log and
their images are all on the node (a CRI ImageService served from memory over a real unix-socket
gRPC server). Once /readyz answers and the first writes are done, the server's ``/varz
in_msgs`` is read at the start and the end of ``--idle`` seconds. A subscription on ``>`` (it
sends nothing) counts the messages by kind for the breakdown.

The baseline is the floor of any design that follows a durable by pull and says it is alive:
a bare nats-py client on a second private server holding one pull request per expiry (30 s, the
syncer's default) and putting one heartbeat per status heartbeat (30 s), measured over the same
seconds. Target: <= 0.1 msg/s (issue 26); ratio near 1 means the syncer adds nothing to it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from bench.criserver import serve_cri
from bench.eventfeed import added_events, fleets, publish_bulk
from bench.report import arguments, emit, size
from bench.services import PREFIX, log_settings, nats_client, nats_server
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, stop_process
from wire.contract import AGONES_SDK_SOURCE, NodeImages
from wire.eventlog import ensure_node_images_stream, ensure_streams, publish_node_images
from wire.nodestatus import Heartbeat, StatusSettings, ensure_status_bucket, put_heartbeat

NAME = "idle"
TARGET = 0.1
SDK = "registry.example/agones-sdk:1.45.0"
# The syncer's defaults the floor mirrors (--fetch-expiry, --status-heartbeat).
EXPIRY = 30.0
HEARTBEAT = 30.0


def in_msgs(server: NatsServer) -> int:
    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5) as response:
        count: int = json.load(response)["in_msgs"]
        return count


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            status: int = response.status
            return status == 200
    except OSError:
        return False


def kind(subject: str) -> str:
    """A message's kind for the breakdown: the API verb, or the KV key's kind."""
    if subject.startswith("$JS.API."):
        return ".".join(subject.split(".")[2:4])
    if subject.startswith("$KV."):
        return "KV " + subject.split(".")[2]
    return subject.split(".")[0]


class Counter:
    def __init__(self) -> None:
        self.kinds: collections.Counter[str] = collections.Counter()

    async def record(self, msg: Msg) -> None:
        # Replies, deliveries and advisories are the server's own messages, not clients'.
        if not msg.subject.startswith(("_INBOX.", "$JS.EVENT.")):
            self.kinds[kind(msg.subject)] += 1


async def install(nc: Client, count: int) -> list[str]:
    """What exists before a node runs: streams, bucket, node images, ``count`` Fleets."""
    js = nc.jetstream()
    await ensure_streams(js, log_settings())
    await ensure_node_images_stream(js, log_settings())
    await publish_node_images(js, log_settings(), NodeImages(AGONES_SDK_SOURCE, [SDK]))
    await ensure_status_bucket(js, StatusSettings(prefix=PREFIX))
    objs = fleets(count)
    await publish_bulk(nc, added_events(PREFIX, objs))
    return [f"registry.example/game-{i}:v1" for i in range(count)]


@contextlib.asynccontextmanager
async def syncer(nats_url: str, socket: Path, quick: bool) -> AsyncIterator[None]:
    port = free_port()
    command = [
        sys.executable, "-m", "image_syncer", "syncer",
        "--node-name", "idle-bench",
        "--cri-endpoint", f"unix://{socket}",
        "--nats-url", nats_url,
        "--subject-prefix", PREFIX,
        "--metrics-addr", f"127.0.0.1:{port}",
    ]  # fmt: skip
    if quick:  # the same loops, turning faster: proves the benchmark runs
        command += ["--fetch-expiry", "4s", "--fetch-heartbeat", "1s"]
        command += ["--status-heartbeat", "4s", "--sync-period", "1s"]
    process = subprocess.Popen(  # noqa: ASYNC220 - only forks; the waiting below is async
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_ready, f"http://127.0.0.1:{port}/readyz"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"syncer not ready (exit {process.poll()})")
            await asyncio.sleep(0.2)
        yield
    finally:
        stop_process(process)


async def floor(server: NatsServer, seconds: float, expiry: float, heartbeat: float) -> float:
    """Client messages per second of the bare floor: a held pull and a heartbeat put."""
    async with nats_client(server, "floor") as nc:
        js = nc.jetstream()
        await ensure_streams(js, log_settings())
        stream = f"{PREFIX.upper()}_FLEETS"
        await js.add_consumer(
            stream, ConsumerConfig(durable_name="floor", ack_policy=AckPolicy.EXPLICIT)
        )
        sub = await js.pull_subscribe_bind(durable="floor", stream=stream)
        status = StatusSettings(prefix=PREFIX)
        await ensure_status_bucket(js, status)
        await nc.flush()
        before = await asyncio.to_thread(in_msgs, server)
        started = time.monotonic()

        async def poll() -> None:
            while True:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await sub.fetch(1, timeout=expiry)

        async def beat() -> None:
            while True:
                await put_heartbeat(js, status, "floor", Heartbeat(at=datetime.now(UTC)))
                await asyncio.sleep(heartbeat)

        tasks = [asyncio.create_task(poll()), asyncio.create_task(beat())]
        await asyncio.sleep(seconds)
        after = await asyncio.to_thread(in_msgs, server)
        elapsed = time.monotonic() - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return (after - before) / elapsed


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, fleets=200, idle=120)
    count, idle = size(args, "fleets", 20), float(size(args, "idle", 16))
    expiry, heartbeat = (4.0, 4.0) if args.quick else (EXPIRY, HEARTBEAT)
    # Long enough after ready for the first status write and the first poll to be behind us.
    settle = 3.0 if args.quick else 10.0
    with (
        nats_server() as server,
        nats_server() as floor_server,
        tempfile.TemporaryDirectory(prefix="bench-idle-") as d,
    ):
        async with nats_client(server, "install") as nc:
            images = await install(nc, count)
        async with serve_cri(Path(d) / "cri.sock", [*images, SDK]) as runtime:
            async with syncer(server.url, Path(d) / "cri.sock", args.quick):
                await asyncio.sleep(settle)
                async with nats_client(server, "observer") as observer:
                    counter = Counter()
                    await observer.subscribe(">", cb=counter.record)
                    await observer.flush()
                    before = await asyncio.to_thread(in_msgs, server)
                    started = time.monotonic()
                    floor_task = asyncio.create_task(floor(floor_server, idle, expiry, heartbeat))
                    await asyncio.sleep(idle)
                    after = await asyncio.to_thread(in_msgs, server)
                    elapsed = time.monotonic() - started
                    baseline = await floor_task
            pulled = len(runtime.pulled)
    figure = (after - before) / elapsed
    return emit(
        NAME,
        figure=figure,
        unit="client msgs/s (server in_msgs), one idle syncer",
        baseline=baseline,
        ratio=figure / baseline if baseline else 0.0,
        target=f"<= {TARGET:g} msg/s",
        met=figure <= TARGET,
        messages=after - before,
        idle_s=round(elapsed, 1),
        by_kind=dict(sorted(counter.kinds.items())),
        fleets=count,
        pulls_during_run=pulled,
        periods="quick (4s expiry, 4s heartbeat)" if args.quick else "defaults",
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
