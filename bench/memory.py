"""Memory: RSS of an idle syncer process holding 1,000 Fleets, against a bare Python with its libs.

A real ``python -m image_syncer syncer`` subprocess replays 1,000 Fleets (each its own image)
from a real nats-server and reconciles against a CRI ImageService served over a real unix-socket
gRPC server that already holds every image, so nothing is pulled. Once /readyz answers it is left
idle for a few reconcile periods and its VmRSS sampled. The baseline is a bare Python that only
imports nats and grpc (target: the syncer <= 60 MB; Octops image-syncer's DaemonSet asks 100Mi).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.criserver import serve_cri
from bench.eventfeed import added_events, fleets, publish_bulk
from bench.report import arguments, emit, median, repeats, size
from bench.services import PREFIX, fleet_stream, nats_client, nats_server
from image_syncer.sandbox.processes import free_port, stop_process

NAME = "memory"
TARGET_MB = 60.0
BARE = "import nats, grpc, sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            status: int = response.status
            return status == 200
    except OSError:
        return False


async def sample(pid: int, seconds: float) -> list[float]:
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.25)
    return samples


async def syncer_rss(nats_url: str, socket: Path, idle: float) -> list[float]:
    port = free_port()
    command = [
        sys.executable, "-m", "image_syncer", "syncer",
        "--node-name", "memory-bench",
        "--cri-endpoint", f"unix://{socket}",
        "--nats-url", nats_url,
        "--subject-prefix", PREFIX,
        "--metrics-addr", f"127.0.0.1:{port}",
        "--sync-period", "1s",
    ]  # fmt: skip
    # Popen only forks; the waiting below is asynchronous.
    process = subprocess.Popen(  # noqa: ASYNC220
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_ready, f"http://127.0.0.1:{port}/readyz"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"syncer not ready (exit {process.poll()})")
            await asyncio.sleep(0.1)
        return await sample(process.pid, idle)
    finally:
        stop_process(process)


async def bare_rss(idle: float) -> list[float]:
    process = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-c", BARE], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        await asyncio.to_thread(process.stdout.readline)  # type: ignore[union-attr]
        return await sample(process.pid, idle)
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        process.wait(timeout=10)


async def measure(argv: Sequence[str] | None) -> dict[str, Any]:
    args = arguments(__doc__ or NAME, argv, fleets=1_000)
    count, runs = size(args, "fleets", 50), repeats(args, 3)
    idle = 1.0 if args.quick else 4.0
    objs = fleets(count)
    images = [f"registry.example/game-{i}:v1" for i in range(count)]
    ours, bare = [], []
    with nats_server() as server, tempfile.TemporaryDirectory(prefix="bench-cri-") as d:
        async with nats_client(server) as nc:
            await fleet_stream(nc)
            await publish_bulk(nc, added_events(PREFIX, objs))
        async with serve_cri(Path(d) / "cri.sock", images) as runtime:
            for _ in range(runs):
                ours.append(median(await syncer_rss(server.url, Path(d) / "cri.sock", idle)))
                bare.append(median(await bare_rss(idle)))
            pulled = len(runtime.pulled)
    figure, baseline = median(ours), median(bare)
    return emit(
        NAME,
        figure=figure,
        unit="MB RSS",
        baseline=baseline,
        ratio=figure / baseline,
        target=f"<= {TARGET_MB:g} MB",
        met=figure <= TARGET_MB,
        fleets=count,
        pulls_during_run=pulled,
        idle_s=idle,
        repeat=runs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
