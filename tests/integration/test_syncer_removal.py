"""``--remove-unused`` against a Fleet that wants its image again while, or just after, it goes.

The syncer runs in-process against real nats-server, containerd and docker-registry, with a
sync period of an hour: a cleanup pass runs only when a replay request kicks one, so each pass is
one the test asked for. The exact interleavings are made by holding one CRI call at a gate
(ListContainers, asked in the middle of a pass; RemoveImage, the removal itself) while the test
publishes the Fleet again and waits for the node to fold it. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.js import JetStreamContext
from support.faults_harness import eventually
from support.syncer_harness import (
    RunningSyncer,
    fleet,
    info_logs_fixture,
    logged,
    norm,
    override,
    settings_fixture,
)

from image_syncer.sandbox.containerd import Containerd
from syncer.runtime.cri import CriClient
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings, publish_event
from wire.nodestatus import StatusSettings, get_status, open_status_bucket, request_replay

pytestmark = [pytest.mark.nats, pytest.mark.cri]

settings = settings_fixture
info_logs = info_logs_fixture


class Gate:
    """Holds the calls that reach it while closed, each until the test lets it through."""

    def __init__(self) -> None:
        self.arrived = 0
        self.held = 0
        self._closed = False
        self._permits = asyncio.Semaphore(0)

    def close(self) -> None:
        self._closed = True

    def open(self) -> None:
        self._closed = False
        for _ in range(self.held):
            self._permits.release()

    async def through(self) -> None:
        self.arrived += 1
        if not self._closed:
            return
        self.held += 1
        try:
            await self._permits.acquire()
        finally:
            self.held -= 1


def gate_method(monkeypatch: pytest.MonkeyPatch, name: str, gate: Gate) -> None:
    """Every CriClient's ``name`` passes ``gate`` first (patched before the syncer binds it)."""
    original: Callable[..., Awaitable[Any]] = getattr(CriClient, name)

    async def gated(self: CriClient, *args: Any) -> Any:
        await gate.through()
        return await original(self, *args)

    monkeypatch.setattr(CriClient, name, gated)


@pytest.fixture
def removing(settings: SyncerSettings) -> SyncerSettings:
    return override(settings, sync_period=3600.0, remove_unused=True, remove_grace=0.0)


async def _kick_a_pass(js: JetStreamContext, settings: SyncerSettings) -> None:
    # A replay request rebuilds the fold and kicks one reconcile (and so one cleanup pass).
    await request_replay(js, StatusSettings(prefix=settings.subject_prefix), settings.node_name)


async def _pulled_then_deleted(
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
    image: str,
) -> None:
    await publish_event(js, log_settings, "fleet.events.added", fleet("game", image))
    await eventually(lambda: image in containerd.image_refs(), "pulled by the syncer")
    await publish_event(js, log_settings, "fleet.events.deleted", fleet("game", image, rv="2"))
    await eventually(lambda: logged(caplog, "fleet deleted", fleet="default/game"), "folded")


async def test_an_image_removed_as_unused_is_pulled_again_for_a_fleet_that_wants_it_back(
    removing: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = push()
    running = await RunningSyncer(removing).start()
    try:
        await _pulled_then_deleted(js, log_settings, containerd, caplog, image)
        await _kick_a_pass(js, removing)
        await eventually(
            lambda: logged(caplog, "unused image removed", image=norm(image)), "removed"
        )
        assert image not in containerd.image_refs()

        # Back before the next ListImages (an hour away): the node must not think it still has it.
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", image, rv="3"))

        await eventually(lambda: image in containerd.image_refs(), "pulled again", timeout=30)
        assert not logged(caplog, "image already present", fleet="default/game")
    finally:
        assert await running.stop() == 0


async def test_a_fleet_folded_during_a_cleanup_pass_keeps_its_image(
    removing: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = push()
    list_containers = Gate()
    gate_method(monkeypatch, "images_in_use", list_containers)
    running = await RunningSyncer(removing).start()
    try:
        await _pulled_then_deleted(js, log_settings, containerd, caplog, image)
        # A pass that took the desired set without the Fleet stops at ListContainers...
        list_containers.close()
        before = list_containers.arrived
        await _kick_a_pass(js, removing)
        await eventually(lambda: list_containers.held == 1, "the pass at ListContainers")
        # ...while the Fleet comes back and the node folds it, its image still present.
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", image, rv="3"))
        await eventually(lambda: _node_wants(js, removing, "default/game"), "folded again")
        list_containers.open()
        # The held pass has ended once the next one asks ListContainers.
        await _kick_a_pass(js, removing)
        await eventually(lambda: list_containers.arrived >= before + 2, "the pass finished")

        assert not logged(caplog, "unused image removed", image=norm(image))
        assert image in containerd.image_refs()
    finally:
        list_containers.open()
        assert await running.stop() == 0


async def test_a_fleet_folded_while_its_image_is_being_removed_gets_it_pulled_again(
    removing: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = push()
    remove = Gate()
    gate_method(monkeypatch, "remove_image", remove)
    running = await RunningSyncer(removing).start()
    try:
        await _pulled_then_deleted(js, log_settings, containerd, caplog, image)
        remove.close()
        await _kick_a_pass(js, removing)
        await eventually(lambda: remove.held == 1, "RemoveImage under way")
        # The Fleet comes back while the runtime is removing its image.
        await publish_event(js, log_settings, "fleet.events.added", fleet("game", image, rv="3"))
        await eventually(lambda: _node_wants(js, removing, "default/game"), "folded again")
        remove.open()

        # Whichever way the race went, the node ends up holding the image, well before the
        # next ListImages would have noticed.
        await eventually(lambda: logged(caplog, "unused image removed"), "removal done")
        await eventually(lambda: image in containerd.image_refs(), "pulled again", timeout=30)
    finally:
        remove.open()
        assert await running.stop() == 0


async def _node_wants(js: JetStreamContext, settings: SyncerSettings, fleet_key: str) -> bool:
    """The node folded the Fleet (its status says it wants it), whatever it did about images."""
    kv = await open_status_bucket(js, StatusSettings(prefix=settings.subject_prefix))
    status = await get_status(kv, settings.node_name) if kv is not None else None
    return status is not None and fleet_key in status.summary.fleets
