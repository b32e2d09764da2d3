"""The syncer's durable is created even when NATS does not answer at that moment.

Found by the chaos soak: a syncer (re)started while its node was cut off from NATS, or while a
server was restarting, replayed the log, then timed out creating its durable and exited. The
durable's creation is now retried with a backoff; here the JetStream request times out twice
(injected at the client boundary, everything else real) and the node still converges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats.errors
import pytest
from nats.js import JetStreamContext
from support.fakekube import FakeKube
from support.faults_harness import (
    Images,
    InProcessBroadcaster,
    InProcessSyncer,
    broadcaster_settings,
    game_fleet,
    node_name,
    syncer_settings,
    wait_all_converged,
)

from image_syncer.sandbox.containerd import Containerd
from syncer.reading.durable import Durable
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings

pytestmark = [pytest.mark.nats, pytest.mark.cri]


async def test_a_durable_creation_timing_out_is_retried(
    kube: FakeKube,
    containerd: Containerd,
    nats_settings: NatsSettings,
    log_settings: LogSettings,
    js: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    create = Durable.start
    timeouts = 2

    async def times_out_twice(self: Durable, after_seq: int) -> None:
        nonlocal timeouts
        if timeouts:
            timeouts -= 1
            raise nats.errors.TimeoutError
        await create(self, after_seq)

    monkeypatch.setattr(Durable, "start", times_out_twice)
    images = Images(push, 2)
    kube.create("fleets", game_fleet("first", images.pool[0]))
    broadcaster = await InProcessBroadcaster(
        broadcaster_settings(kube, nats_settings, log_settings)
    ).start()
    node = node_name()
    syncer = await InProcessSyncer(
        syncer_settings(node, containerd, nats_settings, prefix), containerd
    ).start()
    try:
        # Delivered by the durable, so only converges once it exists.
        kube.create("fleets", game_fleet("second", images.pool[1]))
        await wait_all_converged(js, prefix, kube, [(node, containerd)], images)
        assert timeouts == 0
        assert syncer.task is not None and not syncer.task.done()
        assert "consumer not created, retrying" in caplog.text
    finally:
        await syncer.stop()
        await broadcaster.stop()
