"""Faults on the Kubernetes side: watches dropped and expired under churn, the broadcaster killed.

Both end with the log holding exactly the cluster's Fleets and the node holding exactly their
images (``faults_harness.wait_all_converged``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from support.fakekube import FakeKube
from support.fakekube.harness import log_messages, wait_converged
from support.faults_harness import (
    Churn,
    Images,
    InProcessBroadcaster,
    InProcessSyncer,
    broadcaster_settings,
    eventually,
    game_fleet,
    node_name,
    syncer_settings,
    wait_all_converged,
)

from broadcaster import metrics
from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, stop_process
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings

pytestmark = [pytest.mark.nats, pytest.mark.cri]


@pytest.fixture
async def node(
    containerd: Containerd, nats_settings: NatsSettings, prefix: str, js: JetStreamContext
) -> AsyncIterator[InProcessSyncer]:
    syncer = await InProcessSyncer(
        syncer_settings(node_name(), containerd, nats_settings, prefix), containerd
    ).start()
    yield syncer
    await syncer.stop()


def _watch_requests(kube: FakeKube) -> int:
    return sum(1 for kind, _ in list(kube.requests) if kind == "WATCH")


def restarts(reason: str) -> float:
    result: float = metrics.WATCH_RESTARTS.labels(kind="fleet", reason=reason)._value.get()
    return result


async def test_dropped_and_expired_watches_under_churn_lose_nothing(
    kube: FakeKube,
    node: InProcessSyncer,
    js: JetStreamContext,
    nats_settings: NatsSettings,
    log_settings: LogSettings,
    prefix: str,
    push: Callable[..., str],
) -> None:
    images = Images(push, 5)
    churn = Churn(kube, images, seed=3)
    churn.steps(5)
    expired = restarts("expired")
    broadcaster = await InProcessBroadcaster(
        broadcaster_settings(kube, nats_settings, log_settings)
    ).start()
    try:
        for round_ in range(6):
            watches = _watch_requests(kube)
            # Changes the open watch never delivers: held, then the watch dropped, and on every
            # other round the history compacted so the resume gets 410 Gone and must relist.
            with kube.hold_watches():
                churn.steps(4)
                kube.drop_watches()
                if round_ % 2:
                    kube.compact()
            churn.steps(3)
            await eventually(partial(_more_watches, kube, watches), "the watch resumed")
        await wait_all_converged(js, prefix, kube, [(node.node, node.containerd)], images)
        assert restarts("expired") > expired, "a 410 Gone was met and survived"
    finally:
        await broadcaster.stop()


async def test_in_process_crash_between_a_delete_and_its_publish(
    kube: FakeKube,
    node: InProcessSyncer,
    js: JetStreamContext,
    nats_settings: NatsSettings,
    log_settings: LogSettings,
    prefix: str,
    push: Callable[..., str],
) -> None:
    images = Images(push, 2)
    kube.create("fleets", game_fleet("doomed", images.pool[0]))
    kube.create("fleets", game_fleet("stays", images.pool[1]))
    settings = broadcaster_settings(kube, nats_settings, log_settings)
    broadcaster = await InProcessBroadcaster(settings).start()
    await wait_all_converged(js, prefix, kube, [(node.node, node.containerd)], images)
    kube.wait_for_watches(1)
    with kube.hold_watches():
        kube.delete("fleets", "default", "doomed")
        # The watch has not delivered the delete: the crash comes before its publish.
        await broadcaster.crash()
    assert not [m for m in await log_messages(js, prefix) if ".deleted." in m.subject]
    broadcaster = await InProcessBroadcaster(settings).start()
    try:
        await wait_all_converged(js, prefix, kube, [(node.node, node.containerd)], images)
        subjects = [m.subject for m in await log_messages(js, prefix)]
        assert f"{prefix}.fleet.events.deleted.default.doomed" in subjects
    finally:
        await broadcaster.stop()


async def test_sigkill_between_a_delete_and_its_publish(
    kube: FakeKube,
    nats_server: NatsServer,
    js: JetStreamContext,
    prefix: str,
    tmp_path: Path,
) -> None:
    kube.create("fleets", game_fleet("doomed", "registry.example/game:1"))
    kube.create("fleets", game_fleet("stays", "registry.example/game:2"))
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.kubeconfig),
        "NATS_URL": nats_server.url,
        "SUBJECT_PREFIX": prefix,
        "MAX_BACKOFF": "500ms",
    }
    log_file = tmp_path / "broadcaster.log"

    def start() -> subprocess.Popen[bytes]:
        with log_file.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "image_syncer", "broadcaster"],
                env={**env, "METRICS_ADDR": f"127.0.0.1:{free_port()}"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    process = start()
    try:
        await wait_converged(js, prefix, kube.objects())
        await asyncio.to_thread(kube.wait_for_watches, 1)
        with kube.hold_watches():
            kube.delete("fleets", "default", "doomed")
            stop_process(process, kill=True)
        assert process.returncode == -9
        assert not [m for m in await log_messages(js, prefix) if ".deleted." in m.subject]
        process = start()
        await wait_converged(js, prefix, kube.objects())
        subjects = [m.subject for m in await log_messages(js, prefix)]
        assert f"{prefix}.fleet.events.deleted.default.doomed" in subjects
        await eventually(lambda: "caught up" in log_file.read_text(), "the catch-up log line")
    finally:
        stop_process(process, kill=True)


def _more_watches(kube: FakeKube, than: int) -> bool:
    return _watch_requests(kube) > than
