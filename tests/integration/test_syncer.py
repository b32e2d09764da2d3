"""The node syncer against the real thing: nats-server, containerd (CRI) and docker-registry.

Each test runs ``syncer.runner.run`` in-process (or the real CLI for the signal test), publishes
Fleets through the event log, and watches containerd with ``ctr`` as an outside party would.
Waits poll with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.js import JetStreamContext
from support import polling
from support.fleetdicts import fleet
from support.syncer_harness import (
    DEADLINE,
    RunningSyncer,
    eventually,
    logged,
    metric,
    override,
    settings_with,
)

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.registry import Registry
from ops.logs import fields_of
from syncer.runtime.cri import CriClient
from syncer.settings import SyncerSettings
from wire.contract import Kind, subject_for
from wire.eventlog import LogSettings, ensure_streams, publish_event, stream_name
from wire.natsconn import NatsSettings, connect

pytestmark = [pytest.mark.nats, pytest.mark.cri]


@pytest.fixture
def settings(containerd: Containerd, nats_settings: NatsSettings, prefix: str) -> SyncerSettings:
    return settings_with(
        node_name=f"node-{uuid.uuid4().hex[:6]}.example",
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        pull_timeout=30.0,
        pull_backoff_min=0.2,
        pull_backoff_max=1.0,
        subject_prefix=prefix,
        metrics_addr="",
        nats=nats_settings,
    )


@pytest.fixture
async def syncer(settings: SyncerSettings, js: JetStreamContext) -> AsyncIterator[RunningSyncer]:
    running = await RunningSyncer(settings).start()
    yield running
    if running.task is not None and not running.task.done():
        assert await running.stop() == 0


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    # On failure, the syncer's own account with its fields, as an operator would read it.
    for record in caplog.get_records("call"):
        if record.name.startswith("syncer"):
            print(record.levelname, record.getMessage(), fields_of(record))


async def test_added_fleet_is_pulled(
    syncer: RunningSyncer,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = push()
    await publish_event(js, log_settings, "fleet.events.added", fleet("game", image))
    await eventually(lambda: image in containerd.image_refs(), f"{image} pulled")
    await eventually(
        lambda: logged(caplog, "fleet synced", fleet="default/game", image=image), "logged"
    )
    synced = logged(caplog, "fleet synced", fleet="default/game")[0]
    assert fields_of(synced)["ref"].startswith("sha256:")


async def test_already_present_image_is_not_pulled(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = push()
    async with CriClient(containerd.endpoint) as cri:
        await cri.pull_image(image, timeout=30)
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("present", image))
        await eventually(
            lambda: logged(caplog, "image already present", fleet="default/present", image=image),
            "image already present logged",
        )
        assert not logged(caplog, "fleet synced", fleet="default/present")
    finally:
        assert await running.stop() == 0


async def test_image_removed_behind_its_back_comes_back(
    syncer: RunningSyncer,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    image = push()
    await publish_event(js, log_settings, "fleet.events.added", fleet("keep", image))
    await eventually(lambda: image in containerd.image_refs(), "first pull")
    containerd.remove_image(image)
    assert image not in containerd.image_refs()
    await eventually(lambda: image in containerd.image_refs(), "pulled again by the reconcile")


async def test_events_published_while_stopped_converge_on_restart(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second, gone = push(), push(), push()
    running = await RunningSyncer(settings).start()
    await publish_event(js, log_settings, "fleet.events.added", fleet("one", first))
    await eventually(lambda: first in containerd.image_refs(), "pulled while running")
    assert await running.stop() == 0

    await publish_event(js, log_settings, "fleet.events.added", fleet("two", second))
    await publish_event(js, log_settings, "fleet.events.added", fleet("three", gone))
    await publish_event(js, log_settings, "fleet.events.deleted", fleet("three", gone, rv="2"))
    await publish_event(
        js, log_settings, "fleet.events.updated", fleet("one", first, second, rv="2")
    )

    await running.start()
    try:
        await eventually(lambda: second in containerd.image_refs(), "missed event honoured")
        info = await js.consumer_info(
            stream_name(log_settings.prefix, Kind.FLEET), settings.durable
        )
        assert info.config.durable_name == settings.durable
        assert info.config.mem_storage and info.config.num_replicas in (0, 1)
        assert info.config.inactive_threshold == settings.consumer.inactive_threshold
        # A Fleet created and deleted while the syncer was down is never pulled.
        assert gone not in containerd.image_refs()
    finally:
        assert await running.stop() == 0


async def test_two_nodes_each_converge_with_their_own_durable(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    own_containerd: Containerd,
) -> None:
    a = await RunningSyncer(override(settings, node_name="node-a")).start()
    b = await RunningSyncer(
        override(settings, node_name="node-b", cri_endpoint=own_containerd.endpoint)
    ).start()
    try:
        image = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("both", image))
        await eventually(lambda: image in containerd.image_refs(), "node a pulled")
        await eventually(lambda: image in own_containerd.image_refs(), "node b pulled")
        stream = stream_name(log_settings.prefix, Kind.FLEET)
        names = [c.name async for c in _consumers(js, stream)]
        assert {"syncer-node-a", "syncer-node-b"} <= set(names)
    finally:
        assert await a.stop() == 0
        assert await b.stop() == 0


async def _consumers(js: JetStreamContext, stream: str) -> AsyncIterator[Any]:
    for info in await js.consumers_info(stream):
        yield info


async def test_go_broadcaster_message_is_honoured(
    syncer: RunningSyncer,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    image = push()
    # Byte for byte what the Go agones-event-broadcaster marshals: TypeMeta, status, nulls.
    raw = (
        b'{"header":{"headers":{"event_type":"fleet.events.added"}},"message":{"kind":"Fleet",'
        b'"apiVersion":"agones.dev/v1","metadata":{"name":"go-fleet","namespace":"default",'
        b'"uid":"9b0c","resourceVersion":"77","generation":1,"creationTimestamp":"2026-11-01T10:00:00Z"},'
        b'"spec":{"replicas":2,"allocationOverflow":null,"strategy":{"type":"RollingUpdate"},'
        b'"scheduling":"Packed","template":{"metadata":{"creationTimestamp":null},"spec":{'
        b'"container":"gs","ports":[{"name":"default","containerPort":7654}],"health":{},'
        b'"sdkServer":{"logLevel":"Info"},"template":{"metadata":{"creationTimestamp":null},'
        b'"spec":{"containers":[{"name":"gs","image":"' + image.encode() + b'","resources":{}}],'
        b'"initContainers":null,"nodeSelector":null,"tolerations":null}}}}},'
        b'"status":{"replicas":0,"readyReplicas":0,"allocatedReplicas":0,"players":null}}}'
    )
    subject = subject_for(log_settings.prefix, "fleet.events.added", "default", "go-fleet")
    await js.publish(subject, raw)
    await eventually(lambda: image in containerd.image_refs(), "Go-format event pulled")


async def test_registry_down_then_up_converges(
    syncer: RunningSyncer,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    own_registry: Registry,
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = push(into=own_registry)
    own_registry.stop()
    await publish_event(js, log_settings, "fleet.events.added", fleet("late", image))
    await eventually(lambda: logged(caplog, "image pull failed", image=image), "failure logged")
    assert image not in containerd.image_refs()
    own_registry.start()
    await eventually(lambda: image in containerd.image_refs(), "pulled once the registry is back")


async def test_unknown_image_fails_alone(
    syncer: RunningSyncer,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    registry: Registry,
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = f"{registry.address}/test/never-pushed-{uuid.uuid4().hex[:8]}:v1"
    good, other = push(), push()
    failures = metric("image_syncer_syncer_pulls_total", result="failure")
    await publish_event(js, log_settings, "fleet.events.added", fleet("mixed", missing, good))
    await publish_event(js, log_settings, "fleet.events.added", fleet("fine", other))
    await eventually(lambda: {good, other} <= containerd.image_refs(), "good images pulled")
    await eventually(lambda: logged(caplog, "image pull failed", image=missing), "failure logged")
    record = logged(caplog, "image pull failed", image=missing)[0]
    assert fields_of(record)["fleets"] == "default/mixed" and fields_of(record)["error"]
    assert metric("image_syncer_syncer_pulls_total", result="failure") > failures
    assert missing not in containerd.image_refs()


async def test_garbage_is_terminated_counted_and_the_consumer_goes_on(
    syncer: RunningSyncer,
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = metric("image_syncer_syncer_messages_terminated_total", reason="malformed")
    garbage = [
        b"\x00\xffnot json",
        b'{"header":{"headers":{"event_type":"fleet.events.exploded"}},"message":{}}',
        b'{"header":{"headers":{"event_type":"fleet.events.added"}},"message":{"metadata":{}}}',
    ]
    # One subject each: the stream keeps one message per subject, so garbage published on one
    # subject could be compacted away before the consumer ever saw it.
    for i, payload in enumerate(garbage):
        subject = subject_for(log_settings.prefix, "fleet.events.added", "default", f"junk-{i}")
        await js.publish(subject, payload)
    image = push()
    await publish_event(js, log_settings, "fleet.events.added", fleet("after-junk", image))
    await eventually(lambda: image in containerd.image_refs(), "good event after garbage")
    after = metric("image_syncer_syncer_messages_terminated_total", reason="malformed")
    assert after - before == len(garbage)
    assert len(logged(caplog, "message terminated", reason="malformed")) >= len(garbage)
    stream = stream_name(log_settings.prefix, Kind.FLEET)

    async def settled() -> bool:
        info = await js.consumer_info(stream, settings.durable)
        result: bool = info.num_ack_pending == 0 and info.num_pending == 0
        return result

    await polling.eventually(settled, "garbage settled")


async def test_three_containers_and_an_init_container_all_pulled(
    syncer: RunningSyncer,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    images = [push() for _ in range(4)]
    await publish_event(
        js, log_settings, "fleet.events.added", fleet("multi", *images[:3], init=(images[3],))
    )
    await eventually(lambda: set(images) <= containerd.image_refs(), "all four images")


async def test_sigterm_of_the_cli_exits_zero(
    settings: SyncerSettings, js: JetStreamContext, log_settings: LogSettings, tmp_path: Path
) -> None:
    # Every setting through its environment twin, as the DaemonSet passes them.
    env = {
        **os.environ,
        "NODE_NAME": "cli-node",
        "CONN_TARGET": settings.runtime.endpoint,
        "NATS_URL": settings.nats.servers[0],
        "SUBJECT_PREFIX": log_settings.prefix,
        "SYNC_PERIOD": "1s",
        "METRICS_ADDR": "127.0.0.1:0",
    }
    log_path = tmp_path / "syncer.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "image_syncer",
            "syncer",
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        stream = stream_name(log_settings.prefix, Kind.FLEET)

        async def consumer_exists() -> bool:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.consumer_info(stream, "syncer-cli-node")
                return True
            return False

        async def created() -> bool:
            assert process.returncode is None, log_path.read_text()
            return await consumer_exists()

        await polling.eventually(created, "the CLI syncer created its consumer")
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            code = await process.wait()
        assert code == 0, log_path.read_text()
        assert "syncer stopped" in log_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_nats_restart_consumer_recreated_and_events_followed(
    settings: SyncerSettings,
    own_nats_server: NatsServer,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    nats = NatsSettings(servers=(own_nats_server.url,))
    log_settings = LogSettings(prefix=settings.subject_prefix)
    nc = await connect(nats, name="tests")
    try:
        js = nc.jetstream()
        await ensure_streams(js, log_settings)
        running = await RunningSyncer(override(settings, nats=nats)).start()
        try:
            before = push()
            await publish_event(js, log_settings, "fleet.events.added", fleet("pre", before))
            await eventually(lambda: before in containerd.image_refs(), "pulled before restart")
            # The memory-backed durable does not survive a server restart; the stream does.
            await asyncio.to_thread(own_nats_server.restart)
            after = push()
            await eventually(lambda: nc.is_connected, "test client reconnected")
            await publish_event(js, log_settings, "fleet.events.added", fleet("post", after))
            await eventually(lambda: after in containerd.image_refs(), "followed after restart")
        finally:
            assert await running.stop() == 0
    finally:
        await nc.close()


async def test_private_registry_credentials_from_a_dockerconfigjson(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    auth_registry: Registry,
    containerd: Containerd,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert auth_registry.credentials is not None
    user, password = auth_registry.credentials
    auth_file = tmp_path / "config.json"
    auth_file.write_text(
        json.dumps({"auths": {auth_registry.address: {"username": user, "password": password}}})
    )
    image = push(into=auth_registry)
    running = await RunningSyncer(override(settings, registry_auth_file=str(auth_file))).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("private", image))
        await eventually(lambda: image in containerd.image_refs(), "private image pulled")
    finally:
        assert await running.stop() == 0
    assert password not in caplog.text
