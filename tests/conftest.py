"""Fixtures shared by every test: a real nats-server per session, isolated prefixes per test.

Tests never skip for a missing component: a missing nats-server, containerd or registry is an
error with an install hint, so CI cannot go green without having run them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from image_syncer.sandbox.nats_server import NatsServer
from wire.eventlog import LogSettings, ensure_streams
from wire.natsconn import NatsSettings, connect


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream server for the session; tests isolate themselves with their own prefix."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def own_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, for tests that stop or restart it."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A subject prefix no other test uses, so each test gets its own streams."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def log_settings(prefix: str) -> LogSettings:
    return LogSettings(prefix=prefix)


@pytest.fixture
def nats_settings(nats_server: NatsServer) -> NatsSettings:
    return NatsSettings(servers=(nats_server.url,))


@pytest.fixture
async def nc(nats_settings: NatsSettings) -> AsyncIterator[Client]:
    client = await connect(nats_settings, name="tests")
    yield client
    await client.close()


@pytest.fixture
async def js(nc: Client, log_settings: LogSettings) -> JetStreamContext:
    """A JetStream context whose streams (for the test's prefix) already exist."""
    context = nc.jetstream()
    await ensure_streams(context, log_settings)
    return context
