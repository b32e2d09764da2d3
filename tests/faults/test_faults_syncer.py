"""Faults on the node: the syncer SIGKILLed mid-pull, containerd restarted, the registry down.

The broadcaster runs in-process against the fake API server; the syncer is a real
``image-syncer syncer`` process (SIGKILL) or in-process. Each ends with the log holding exactly
the cluster's Fleets and the node holding exactly their images.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from support.fakekube import FakeKube
from support.fakekube.harness import wait_converged
from support.faults_harness import (
    Churn,
    Images,
    InProcessBroadcaster,
    InProcessSyncer,
    SyncerProcess,
    broadcaster_settings,
    eventually,
    game_fleet,
    node_name,
    syncer_settings,
    wait_all_converged,
)

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.registry import Registry
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings
from wire.nodestatus import MissingState, StatusSettings, get_status, open_status_bucket

pytestmark = [pytest.mark.nats, pytest.mark.cri]


@pytest.fixture
async def broadcaster(
    kube: FakeKube, nats_settings: NatsSettings, log_settings: LogSettings, js: JetStreamContext
) -> AsyncIterator[InProcessBroadcaster]:
    running = await InProcessBroadcaster(
        broadcaster_settings(kube, nats_settings, log_settings)
    ).start()
    yield running
    await running.stop()


async def _pulling(js: JetStreamContext, prefix: str, node: str) -> bool:
    kv = await open_status_bucket(js, StatusSettings(prefix=prefix))
    status = await get_status(kv, node) if kv is not None else None
    return bool(
        status and MissingState.PULLING in {m.state for m in status.summary.missing.values()}
    )


def _proc(pid: int) -> tuple[bytes, str]:
    """A process's command line and memory map."""
    return Path(f"/proc/{pid}/cmdline").read_bytes(), Path(f"/proc/{pid}/maps").read_text()


async def test_syncer_sigkilled_mid_pull_converges_after_restart(
    kube: FakeKube,
    broadcaster: InProcessBroadcaster,
    own_containerd: Containerd,
    own_registry: Registry,
    nats_server: NatsServer,
    js: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
    tmp_path: Path,
) -> None:
    images = Images(push, 3, into=own_registry)
    node = node_name()
    nodes = [(node, own_containerd)]
    syncer = SyncerProcess(node, own_containerd, nats_server.url, prefix, tmp_path / "syncer.log")
    syncer.start()
    try:
        kube.create("fleets", game_fleet("first", images.pool[0]))
        await wait_all_converged(js, prefix, kube, nodes, images)
        # `image-syncer syncer` became the lean syncer process (same pid: signals reach it),
        # without the CLI's libraries nor aiohttp.
        assert syncer.process is not None
        cmdline, maps = _proc(syncer.process.pid)
        # With setproctitle installed (CI has it) the command line is the title instead.
        argv = cmdline.split(b"\0")
        assert b"image_syncer.syncerproc" in argv or argv[0].startswith(b"image-syncer syncer ")
        assert "pydantic_core" not in maps and "/aiohttp/" not in maps
        # Freeze the registry: the next pull hangs half-way, and the syncer dies during it.
        assert own_registry.process is not None
        os.killpg(own_registry.process.pid, signal.SIGSTOP)
        try:
            kube.create("fleets", game_fleet("second", images.pool[1], images.pool[2]))
            await eventually(
                lambda: _pulling(js, prefix, node), "the node to report the pull in flight"
            )
            syncer.kill()
            assert syncer.process is not None and syncer.process.returncode == -signal.SIGKILL
        finally:
            os.killpg(own_registry.process.pid, signal.SIGCONT)
        assert not {images.pool[1], images.pool[2]} & images.on(own_containerd)
        kube.delete("fleets", "default", "first")
        syncer.start()
        await wait_all_converged(js, prefix, kube, nodes, images)
        assert syncer.stop() == 0, syncer.log()
    finally:
        syncer.kill()


async def test_containerd_restarted_under_a_running_syncer(
    kube: FakeKube,
    broadcaster: InProcessBroadcaster,
    own_containerd: Containerd,
    nats_settings: NatsSettings,
    js: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
) -> None:
    images = Images(push, 5)
    churn = Churn(kube, images, seed=21)
    syncer = await InProcessSyncer(
        syncer_settings(node_name(), own_containerd, nats_settings, prefix), own_containerd
    ).start()
    nodes = [(syncer.node, own_containerd)]
    try:
        churn.steps(5)
        await wait_all_converged(js, prefix, kube, nodes, images)
        for kill in (False, True):
            own_containerd.stop(kill=kill)
            churn.steps(4)  # events arrive while the runtime is down
            await asyncio.to_thread(own_containerd.restart)
            await wait_all_converged(js, prefix, kube, nodes, images)
    finally:
        await syncer.stop()


async def test_registry_down_for_a_while(
    kube: FakeKube,
    broadcaster: InProcessBroadcaster,
    own_containerd: Containerd,
    own_registry: Registry,
    nats_settings: NatsSettings,
    js: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
) -> None:
    images = Images(push, 5, into=own_registry)
    churn = Churn(kube, images, seed=4)
    syncer = await InProcessSyncer(
        syncer_settings(node_name(), own_containerd, nats_settings, prefix), own_containerd
    ).start()
    nodes = [(syncer.node, own_containerd)]
    try:
        churn.steps(3)
        await wait_all_converged(js, prefix, kube, nodes, images)
        own_registry.stop()
        churn.steps(8)
        # The log follows the cluster meanwhile; the node cannot, yet.
        await wait_converged(js, prefix, kube.objects())
        own_registry.start()
        await wait_all_converged(js, prefix, kube, nodes, images)
    finally:
        await syncer.stop()
