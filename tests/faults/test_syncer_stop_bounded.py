"""A stop ends well inside the kubelet's grace period, whatever is in flight.

The kubelet sends SIGTERM, then SIGKILL after the pod's ``terminationGracePeriodSeconds``; a
syncer killed mid-stop leaves its last status unwritten and its events unacked. Each test runs
the real ``image-syncer syncer`` process against real nats-server, containerd and registries,
puts something in flight that used to hold the stop up (a pull from a registry that never
answers, NATS gone, pins waiting for NATS), sends SIGTERM and asks for the contract: exit 0
within 25 s, with the last status written when NATS is there to take it, and one warning that
names what was abandoned. The deadline is the contract, not a measurement.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from support.faults_harness import Images, SyncerProcess, eventually, node_name
from support.fleetdicts import fleet
from support.linkcut import Link
from support.silentregistry import SilentRegistry

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.registry import Registry
from syncer.folding.references import normalize
from wire.eventlog import LogSettings, publish_event
from wire.nodestatus import MissingState, NodeState, StatusSettings, get_status, open_status_bucket

pytestmark = [pytest.mark.nats, pytest.mark.cri]

# The contract the issue sets; the DaemonSet's grace period leaves room beyond it.
STOP_CONTRACT = 25.0
# Status writes are throttled to one per interval: with this one, only the first write at start
# and the last one at stop can happen during a test (the last is the one under test).
QUIET_STATUS = {"STATUS_INTERVAL": "10m"}


def norm(image: str) -> str:
    return str(normalize(image))


async def node_state(js: JetStreamContext, prefix: str, node: str) -> NodeState | None:
    kv = await open_status_bucket(js, StatusSettings(prefix=prefix))
    status = await get_status(kv, node) if kv is not None else None
    return status.summary if status is not None else None


async def stopped_cleanly(syncer: SyncerProcess) -> str:
    """SIGTERM, then the exit within the contract; returns the syncer's log."""
    process = syncer.process
    assert process is not None and process.poll() is None, syncer.log()
    os.killpg(process.pid, signal.SIGTERM)
    await eventually(
        lambda: process.poll() is not None, "the syncer exits after SIGTERM", STOP_CONTRACT
    )
    text = syncer.log()
    assert process.returncode == 0, text
    assert "Traceback" not in text, text
    return text


def abandoned(log: str) -> list[str]:
    return [line for line in log.splitlines() if "stop abandoned work" in line]


@pytest.fixture
async def silent() -> AsyncIterator[SilentRegistry]:
    async with SilentRegistry() as registry:
        yield registry


@pytest.fixture
async def link(nats_server: NatsServer) -> AsyncIterator[Link]:
    relay = await Link.to(nats_server.url).start()
    yield relay
    await relay.close()


async def test_a_hung_pull_is_abandoned_and_the_last_status_written(
    own_containerd: Containerd,
    nats_server: NatsServer,
    js: JetStreamContext,
    log_settings: LogSettings,
    prefix: str,
    push: Callable[..., str],
    silent: SilentRegistry,
    tmp_path: Path,
) -> None:
    good, hung = push(), silent.image()
    node = node_name()
    syncer = SyncerProcess(
        node,
        own_containerd,
        nats_server.url,
        prefix,
        tmp_path / "syncer.log",
        extra_env={**QUIET_STATUS, "PULL_TIMEOUT": "10m", "REMOVE_UNUSED": "false"},
    ).start()
    try:
        await eventually(lambda: node_state(js, prefix, node), "the first status write")
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", good, hung))
        await eventually(lambda: good in own_containerd.image_refs(), "the good image arrives")
        await asyncio.wait_for(silent.resolving.wait(), 60)  # the other pull is under way

        text = await stopped_cleanly(syncer)

        # The last status is the node at stop, though the throttle forbade a write so soon.
        state = await node_state(js, prefix, node)
        assert state is not None and "default/game" in state.fleets, text
        assert norm(good) not in state.missing, state
        assert norm(hung) in state.missing, state
        (warning,) = abandoned(text)
        assert norm(hung) in warning
    finally:
        syncer.kill()


async def test_a_second_signal_exits_at_once_and_cleanly(
    own_containerd: Containerd,
    nats_server: NatsServer,
    js: JetStreamContext,
    log_settings: LogSettings,
    prefix: str,
    silent: SilentRegistry,
    tmp_path: Path,
) -> None:
    node = node_name()
    syncer = SyncerProcess(
        node,
        own_containerd,
        nats_server.url,
        prefix,
        tmp_path / "syncer.log",
        extra_env={"PULL_TIMEOUT": "10m", "STOP_TIMEOUT": "10m"},
    ).start()
    try:
        await eventually(lambda: node_state(js, prefix, node), "the first status write")
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", silent.image()))
        await asyncio.wait_for(silent.resolving.wait(), 60)
        process = syncer.process
        assert process is not None
        os.killpg(process.pid, signal.SIGTERM)
        await eventually(lambda: "draining" in syncer.log(), "the stop begins")

        os.killpg(process.pid, signal.SIGTERM)  # the operator insists

        await eventually(
            lambda: process.poll() is not None,
            "the syncer exits at the second signal",
            STOP_CONTRACT,
        )
        text = syncer.log()
        assert process.returncode == 0, text
        assert "Traceback" not in text and "CancelledError" not in text, text
        assert "second signal, stopping now" in text
    finally:
        syncer.kill()


async def test_nats_down_at_stop_is_not_waited_for(
    own_containerd: Containerd,
    link: Link,
    js: JetStreamContext,
    log_settings: LogSettings,
    prefix: str,
    push: Callable[..., str],
    tmp_path: Path,
) -> None:
    image = push()
    node = node_name()
    syncer = SyncerProcess(
        node, own_containerd, link.url, prefix, tmp_path / "syncer.log", extra_env=QUIET_STATUS
    ).start()
    try:
        await eventually(lambda: node_state(js, prefix, node), "the first status write")
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", image))
        await eventually(lambda: image in own_containerd.image_refs(), "the image arrives")
        await link.cut()

        text = await stopped_cleanly(syncer)

        (warning,) = abandoned(text)
        assert "status" in warning
    finally:
        syncer.kill()


async def test_pins_waiting_for_nats_do_not_hold_the_stop(
    own_containerd: Containerd,
    own_registry: Registry,
    link: Link,
    js: JetStreamContext,
    log_settings: LogSettings,
    prefix: str,
    push: Callable[..., str],
    tmp_path: Path,
) -> None:
    images = Images(push, 8, into=own_registry)
    node = node_name()
    syncer = SyncerProcess(
        node,
        own_containerd,
        link.url,
        prefix,
        tmp_path / "syncer.log",
        extra_env={"REMOVE_UNUSED": "false"},
    ).start()
    assert own_registry.process is not None
    registry_group = own_registry.process.pid
    try:
        await eventually(lambda: node_state(js, prefix, node), "the first status write")
        # The registry frozen: the pulls wait for it while NATS is still there.
        os.killpg(registry_group, signal.SIGSTOP)
        try:
            await publish_event(js, log_settings, "fleet.events.added", fleet("game", *images.pool))

            async def pulling() -> bool:
                state = await node_state(js, prefix, node)
                return state is not None and MissingState.PULLING in {
                    m.state for m in state.missing.values()
                }

            await eventually(pulling, "the node reports its pulls in flight")
            await link.cut()
        finally:
            os.killpg(registry_group, signal.SIGCONT)
        # Every pull ends while NATS is gone: each one's pin waits to record it in NATS.
        await eventually(
            lambda: images.on(own_containerd) == images.pool_set, "every image pulled", 120
        )

        text = await stopped_cleanly(syncer)

        (warning,) = abandoned(text)
        assert "pins" in warning
    finally:
        syncer.kill()
