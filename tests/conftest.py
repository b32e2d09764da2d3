"""Fixtures shared by every test: a real nats-server per session, isolated prefixes per test.

Tests never skip for a missing component: a missing nats-server, containerd or registry is an
error with an install hint, so CI cannot go green without having run them.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from nats.aio.client import Client
from nats.js import JetStreamContext
from support.fakekube import FakeKube

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.images import push_image
from image_syncer.sandbox.mirror import MirroredRegistry
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.registry import Registry
from syncer.runtime.containerd_images import ContainerdImages
from syncer.runtime.cri import CriClient
from wire.eventlog import LogSettings, ensure_streams
from wire.natsconn import NatsSettings, connect

# No per-example deadline: it is a timing threshold, and a loaded 2-core machine trips it.
hypothesis_settings.register_profile("suite", deadline=None)
hypothesis_settings.load_profile("suite")


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
def kube(tmp_path: Path) -> Iterator[FakeKube]:
    """A fake Kubernetes API server of the test's own (see tests/support/fakekube), with a kubeconfig."""
    with FakeKube(tmp_path / "kube") as server:
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


# --- containerd and registry ---
# Real containerd (CRI plugin) and docker-registry processes. The session-wide ones are shared:
# tests stay apart by pushing uniquely named images (see `push`). Tests that stop or restart a
# component take an `own_*` one instead.

REGISTRY_CREDENTIALS = ("syncer-test", "pa55-w0rd-never-logged")


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """One containerd for the session, its CRI socket at ``containerd.endpoint``."""
    with Containerd(tmp_path_factory.mktemp("containerd")) as runtime:
        yield runtime


@pytest.fixture
async def cri(containerd: Containerd) -> AsyncIterator[CriClient]:
    """A CRI client of the session's containerd."""
    client = CriClient(containerd.endpoint)
    yield client
    await client.close()


@pytest.fixture
async def images(containerd: Containerd) -> AsyncIterator[ContainerdImages]:
    """A client of the session's containerd's own images service (labels, pins)."""
    client = ContainerdImages(containerd.endpoint)
    yield client
    await client.close()


@pytest.fixture
def own_containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A containerd of the test's own, for tests that stop or restart it."""
    with Containerd(tmp_path / "containerd") as runtime:
        yield runtime


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One open registry for the session on 127.0.0.1:<port> (``registry.address``)."""
    with Registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry of the test's own, for tests that stop or restart it (the port survives)."""
    with Registry(tmp_path / "registry") as server:
        yield server


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry demanding basic auth; ``auth_registry.credentials`` is (user, password)."""
    with Registry(
        tmp_path_factory.mktemp("auth-registry"), htpasswd=REGISTRY_CREDENTIALS
    ) as server:
        yield server


PushImage = Callable[..., str]


@pytest.fixture
def push(registry: Registry) -> PushImage:
    """push(name=None, tag="v1", *, into=registry, layer_bytes=None) -> "127.0.0.1:PORT/name:tag".

    Every call pushes fresh content; without a name the repository is unique too, so no other test
    can already hold the image. ``into`` pushes to another Registry (own_registry, auth_registry).
    """

    def _push(
        name: str | None = None,
        tag: str = "v1",
        *,
        into: Registry | None = None,
        layer_bytes: int | None = None,
    ) -> str:
        target = into or registry
        repository = name or f"test/img-{uuid.uuid4().hex[:12]}"
        push_image(
            target.address, repository, tag, layer_bytes=layer_bytes, auth=target.credentials
        )
        return f"{target.address}/{repository}:{tag}"

    return _push


@pytest.fixture(scope="session")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirroredRegistry]:
    """An upstream registry (access log on) behind a Distribution pull-through cache, and the
    containerd ``hosts.toml`` directory that sends pulls of its images through the cache."""
    with MirroredRegistry(tmp_path_factory.mktemp("mirrored")) as setup:
        yield setup


@pytest.fixture
def mirror_nodes(tmp_path: Path, mirrored: MirroredRegistry) -> Iterator[list[Containerd]]:
    """Three containerds ("nodes") whose registry config_path points at ``mirrored``'s hosts."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(mirrored.node(tmp_path / f"node{i}")) for i in range(3)]
