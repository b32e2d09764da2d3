"""Operating a real ``image-syncer syncer`` process: /healthz, /readyz, /metrics and its log.

The syncer runs as the DaemonSet runs it (the CLI, configured by env twins) against real
nats-server, containerd and docker-registry; the test reads its endpoints over HTTP and its log
file, as a kubelet probe, Prometheus and an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support.fleetdicts import fleet
from support.polling import eventually

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port
from ops.buildinfo import package_version
from ops.serving import Health, serve_http
from wire.eventlog import LogSettings, ensure_streams, publish_event
from wire.natsconn import NatsSettings, connect

pytestmark = [pytest.mark.nats, pytest.mark.cri]

DEADLINE = 60.0


@dataclass
class SyncerProcess:
    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0, "not listening"

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, text = self.get("/metrics")
        assert code == 200, text
        found = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return found

    def sample(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, tuple(sorted(labels.items()))))

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    async def until(self, check, what: str) -> None:  # type: ignore[no-untyped-def]
        def holds() -> object:
            assert self.process.returncode is None, self.log_path.read_text()[-3000:]
            return check()

        await eventually(
            holds, lambda: f"{what}\n{self.log_path.read_text()[-3000:]}", in_thread=True
        )


async def start_syncer(tmp_path: Path, env: dict[str, str]) -> SyncerProcess:
    port = free_port()
    log_path = tmp_path / "syncer.log"
    full_env = {
        **os.environ,
        "NODE_NAME": "ops-node",
        "SYNC_PERIOD": "1s",
        "METRICS_ADDR": f"127.0.0.1:{port}",
        "LOG_FORMAT": "json",
        "LAG_INTERVAL": "1s",
        "STATUS_INTERVAL": "1s",
        **env,
    }
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "image_syncer", "syncer", env=full_env, stdout=log, stderr=log
        )
    return SyncerProcess(process, port, log_path)


@pytest.fixture
async def stop_later() -> AsyncIterator[list[SyncerProcess]]:
    started: list[SyncerProcess] = []
    yield started
    for syncer in started:
        if syncer.process.returncode is None:
            syncer.process.terminate()
            async with asyncio.timeout(DEADLINE):
                await syncer.process.wait()


async def test_ready_only_after_the_replay_metrics_and_fleet_tagged_json_logs(
    nats_settings: NatsSettings,
    nc: Client,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
    tmp_path: Path,
    stop_later: list[SyncerProcess],
) -> None:
    syncer = await start_syncer(
        tmp_path,
        {
            "CONN_TARGET": containerd.endpoint,
            "NATS_URL": nats_settings.servers[0],
            "SUBJECT_PREFIX": log_settings.prefix,
        },
    )
    stop_later.append(syncer)
    # No stream yet: alive, but not ready, and /readyz says why.
    await syncer.until(lambda: "does not exist yet" in syncer.get("/readyz")[1], "readyz reason")
    assert syncer.get("/readyz")[0] == 503
    assert syncer.get("/healthz")[0] == 200
    js = nc.jetstream()
    await ensure_streams(js, log_settings)
    await syncer.until(lambda: syncer.get("/readyz")[0] == 200, "ready once the log replayed")

    image = push()
    await publish_event(js, log_settings, "fleet.events.added", fleet("metered", image))
    await syncer.until(lambda: image in containerd.image_refs(), "pulled")
    await syncer.until(
        lambda: syncer.sample("image_syncer_syncer_images", state="present") == 1.0,
        "images present gauge",
    )
    assert syncer.sample("image_syncer_syncer_images", state="desired") == 1.0
    assert syncer.sample("image_syncer_syncer_images", state="missing") == 0.0
    assert syncer.sample("image_syncer_syncer_pulls_total", result="success") == 1.0
    assert syncer.sample("image_syncer_syncer_fleets", state="admitted") == 1.0
    build = [k for k in syncer.samples() if k[0] == "image_syncer_build_info"]
    assert len(build) == 1 and ("version", package_version()) in build[0][1]
    acked = syncer.sample(
        "image_syncer_syncer_events_total", event_type="fleet.events.added", result="acked"
    )
    assert acked == 1.0
    await syncer.until(
        lambda: syncer.sample("image_syncer_syncer_consumer_pending_messages") == 0.0,
        "consumer lag gauge",
    )
    assert syncer.sample("image_syncer_syncer_replays_total", trigger="start") == 1.0

    lines = syncer.log_lines()
    synced = [line for line in lines if line["msg"] == "fleet synced"]
    assert synced and synced[0]["fleet"] == "default/metered" and synced[0]["image"] == image
    assert all(line["level"] in ("debug", "info", "warning", "error") for line in lines)


async def test_healthz_fails_when_the_runtime_stays_unreachable(
    own_containerd: Containerd,
    nats_settings: NatsSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    tmp_path: Path,
    stop_later: list[SyncerProcess],
) -> None:
    syncer = await start_syncer(
        tmp_path,
        {
            "CONN_TARGET": own_containerd.endpoint,
            "NATS_URL": nats_settings.servers[0],
            "SUBJECT_PREFIX": log_settings.prefix,
            "RUNTIME_UNHEALTHY_AFTER": "3s",
        },
    )
    stop_later.append(syncer)
    await syncer.until(lambda: syncer.get("/readyz")[0] == 200, "ready")
    await asyncio.to_thread(own_containerd.stop)
    await syncer.until(lambda: "runtime" in syncer.get("/readyz")[1], "not ready: runtime")
    assert syncer.get("/readyz")[0] == 503
    await syncer.until(lambda: syncer.get("/healthz")[0] == 503, "healthz fails")
    assert "runtime silent for" in syncer.get("/healthz")[1]
    errors = [
        k
        for k, v in syncer.samples().items()
        if k[0] == "image_syncer_syncer_cri_errors_total" and v > 0
    ]
    assert errors, "CRI errors are counted"
    await asyncio.to_thread(own_containerd.start)
    await syncer.until(lambda: syncer.get("/healthz")[0] == 200, "healthy again")
    await syncer.until(lambda: syncer.get("/readyz")[0] == 200, "ready again")


async def test_nats_outage_is_not_ready_counted_but_alive(
    own_nats_server: NatsServer,
    containerd: Containerd,
    log_settings: LogSettings,
    tmp_path: Path,
    stop_later: list[SyncerProcess],
) -> None:
    nc = await connect(NatsSettings(servers=(own_nats_server.url,)), name="tests")
    try:
        await ensure_streams(nc.jetstream(), log_settings)
    finally:
        await nc.close()
    syncer = await start_syncer(
        tmp_path,
        {
            "CONN_TARGET": containerd.endpoint,
            "NATS_URL": own_nats_server.url,
            "SUBJECT_PREFIX": log_settings.prefix,
        },
    )
    stop_later.append(syncer)
    await syncer.until(lambda: syncer.get("/readyz")[0] == 200, "ready")
    await asyncio.to_thread(own_nats_server.stop)
    await syncer.until(lambda: "nats" in syncer.get("/readyz")[1], "not ready: nats")

    def counted() -> bool:
        samples = syncer.samples()
        return any(
            v > 0 for k, v in samples.items() if k[0] == "image_syncer_syncer_nats_errors_total"
        )

    await syncer.until(counted, "NATS errors counted")
    assert syncer.get("/healthz")[0] == 200, "a NATS outage is not a reason to restart the pod"
    await asyncio.to_thread(own_nats_server.start)
    await syncer.until(lambda: syncer.get("/readyz")[0] == 200, "ready again")


async def test_build_info_is_served_by_the_shared_endpoint() -> None:
    # serve_http is what both the broadcaster and the syncer serve /metrics with.
    registry = CollectorRegistry()
    from ops.buildinfo import BUILD_INFO

    registry.register(BUILD_INFO)
    server = await serve_http("127.0.0.1", 0, Health(), registry)
    port = server.sockets[0].getsockname()[1]
    try:

        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                result: str = r.read().decode()
                return result

        text = await asyncio.to_thread(fetch)
    finally:
        server.close()
    assert re.search(
        r'image_syncer_build_info\{python="[\d.]+",version="'
        + re.escape(package_version())
        + r'"\} 1\.0',
        text,
    ), text
