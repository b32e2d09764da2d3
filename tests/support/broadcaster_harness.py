"""What the broadcaster's in-process tests share: its settings against the test's fake API server
and NATS, running it until a block ends, reading its counters. Import the fixture
(``settings_fixture``) into a test module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from broadcaster.runner import run
from broadcaster.settings import Settings
from image_syncer.sandbox.processes import free_port
from ops.serving import Health
from support.fakekube import FakeKube
from support.polling import eventually as wait_until
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings

__all__ = ["broadcasting", "counter", "settings_fixture"]


@pytest.fixture(name="settings")
def settings_fixture(
    kube: FakeKube, nats_settings: NatsSettings, log_settings: LogSettings
) -> Settings:
    return Settings(
        nats=nats_settings,
        log=log_settings,
        kubeconfig=str(kube.kubeconfig),
        metrics_addr=f"127.0.0.1:{free_port()}",
        watch_timeout=30.0,
        backoff_initial=0.05,
        backoff_max=0.5,
        drain_timeout=5.0,
    )


@asynccontextmanager
async def broadcasting(settings: Settings) -> AsyncIterator[Health]:
    """Run the broadcaster until the block ends; yield once it is ready; it must exit 0."""
    stopping, health = asyncio.Event(), Health()
    # The task has not run yet; until it reports for itself it is not ready.
    health.set("initial-list", False, "not started")
    task = asyncio.create_task(run(settings, stopping, health=health))
    try:

        def ready() -> bool:
            if task.done():
                task.result()
                raise AssertionError("broadcaster returned before it was ready")
            return health.ready()[0]

        await wait_until(ready, lambda: f"broadcaster not ready: {health.ready()[1]}")
        yield health
    finally:
        stopping.set()
        assert await asyncio.wait_for(task, 30) == 0


def counter(metric: Any, **labels: str) -> float:
    """The value of a prometheus_client counter (of one label set), read in-process."""
    result: float = metric.labels(**labels)._value.get() if labels else metric._value.get()
    return result
