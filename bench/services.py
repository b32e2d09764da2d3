"""The real processes a benchmark runs against, each in a temporary directory of its own."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.registry import Registry
from wire.eventlog import LogSettings, ensure_streams
from wire.natsconn import NatsSettings, connect

__all__ = [
    "PREFIX",
    "containerd",
    "fleet_stream",
    "log_settings",
    "nats_client",
    "nats_server",
    "nats_settings",
    "registry",
]

# The benchmarks own their servers, so one prefix is enough.
PREFIX = "bench"


def log_settings() -> LogSettings:
    return LogSettings(prefix=PREFIX)


@contextlib.contextmanager
def _tmp(kind: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as d:
        yield Path(d)


@contextlib.contextmanager
def nats_server() -> Iterator[NatsServer]:
    with _tmp("nats") as d, NatsServer(d) as server:
        yield server


@contextlib.contextmanager
def containerd() -> Iterator[Containerd]:
    with _tmp("containerd") as d, Containerd(d) as runtime:
        yield runtime


@contextlib.contextmanager
def registry() -> Iterator[Registry]:
    with _tmp("registry") as d, Registry(d) as reg:
        yield reg


def nats_settings(server: NatsServer) -> NatsSettings:
    return NatsSettings(servers=(server.url,))


@contextlib.asynccontextmanager
async def nats_client(server: NatsServer, name: str = "bench") -> AsyncIterator[Client]:
    nc = await connect(nats_settings(server), name=name)
    try:
        yield nc
    finally:
        await nc.close()


async def fleet_stream(nc: Client) -> JetStreamContext:
    js = nc.jetstream()
    await ensure_streams(js, log_settings())
    return js
