"""The NATS accounts of deploy/nats: generated from wire.permissions, and enforced as intended.

The config files the NATS pods would mount (built from the kustomization) run in a real
nats-server; each role then does what the broadcaster and the syncer do, through the same
wire functions, and tries what it must never do. A permission the code needs but the file lacks,
or one the file grants too widely, fails here rather than on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from support.deploy import (
    DEPLOY,
    NATS_BUILDS,
    SYNCER_OVERLAYS,
    build,
    container,
    env_value,
    nats_config_files,
    one,
)
from support.fleetdicts import fleet
from support.hostile_world import concrete
from support.staticnats import (
    Server,
    login,
    no_violations,
    password_env,
    route_env,
    running,
    violation,
    write_config,
)

from image_syncer.sandbox.nats_server import nats_server_binary
from syncer.keeping import cleaner, pinledger
from syncer.pulling import pullbudget
from wire import nodestatus
from wire.contract import AGONES_SDK_SOURCE, Kind, NodeImages
from wire.durables import DurableLimits, durable_config
from wire.eventlog import (
    LogSettings,
    ensure_node_images_stream,
    ensure_streams,
    node_images_stream_name,
    publish_event,
    publish_node_images,
    read_log,
    read_node_images,
    stream_name,
)
from wire.kvbuckets import ensure_bucket
from wire.permissions import (
    LEASE_BUCKET,
    NODES_BUCKET,
    PINNED_BUCKET,
    PULLED_BUCKET,
    SLOTS_BUCKET,
    broadcaster_permissions,
    bucket_for,
    install_buckets,
    render_accounts,
    syncer_permissions,
)

FLEETS = stream_name("agones", Kind.FLEET)


def _fleet(name: str, version: str = "1") -> dict[str, Any]:
    return fleet(name, "nginx", rv=version)


# --- One source of truth ------------------------------------------------------------------


def test_committed_accounts_file_is_generated_from_wire_permissions() -> None:
    committed = (DEPLOY / "nats/base/auth.conf").read_text()
    assert committed == render_accounts("agones"), (
        "deploy/nats/base/auth.conf is stale: "
        "python -m wire.permissions > deploy/nats/base/auth.conf"
    )


@pytest.mark.parametrize("prefix", ["agones", "games.eu-1"])
def test_bucket_names_are_the_ones_the_roles_use(prefix: str) -> None:
    assert bucket_for(NODES_BUCKET, prefix) == nodestatus.bucket_name(prefix)
    assert PULLED_BUCKET == cleaner.BUCKET
    assert PINNED_BUCKET == pinledger.BUCKET
    assert bucket_for(SLOTS_BUCKET, prefix) == pullbudget.budget_bucket(prefix)


@pytest.mark.parametrize("name", list(NATS_BUILDS))
def test_pods_mount_the_accounts_for_the_prefix_the_roles_use(name: str) -> None:
    prefixes = set()
    for overlay in SYNCER_OVERLAYS:
        for kind, role in (("Deployment", "broadcaster"), ("DaemonSet", "syncer")):
            workload = one(build(overlay), kind, f"image-syncer-{role}")
            prefixes.add(env_value(container(workload, role), "SUBJECT_PREFIX"))
    assert len(prefixes) == 1
    assert nats_config_files(name)["auth.conf"] == render_accounts(prefixes.pop())


@pytest.mark.parametrize("prefix", ["agones", "games.eu-1"])
def test_permissions_follow_the_prefix_and_never_grant_destruction(prefix: str) -> None:
    broadcaster = broadcaster_permissions(prefix)
    syncer = syncer_permissions(prefix)
    fleets = stream_name(prefix, Kind.FLEET)
    assert f"{prefix}.fleet.events.*.*.*" in broadcaster.publish
    assert f"{prefix}.gameserver.events.*.*.*" in broadcaster.publish
    assert f"$JS.API.STREAM.PURGE.{fleets}" in broadcaster.publish
    assert not [s for s in syncer.publish if s.startswith(f"{prefix}.")], "syncer publishes events"
    assert f"$KV.{bucket_for(NODES_BUCKET, prefix)}.node.>" in syncer.publish
    # The only delete anyone holds: a syncer replacing a consumer of the fleet stream.
    deletes = [s for s in broadcaster.publish + syncer.publish if "DELETE" in s]
    assert deletes == [f"$JS.API.CONSUMER.DELETE.{fleets}.*"]
    for subjects in (broadcaster.publish, syncer.publish):
        assert ">" not in subjects and "$JS.API.>" not in subjects
    # No syncer creates a stream or bucket (the broadcaster does, with their final config).
    assert not [s for s in syncer.publish if "PURGE" in s or "STREAM.CREATE" in s]
    assert not [s for s in syncer.publish if "STREAM.UPDATE" in s]
    for role in (broadcaster, syncer):
        assert role.subscribe == ("_INBOX.>",)


@pytest.mark.parametrize("name", list(NATS_BUILDS))
def test_server_config_parses_and_fails_closed_without_passwords(name: str, tmp_path: Path) -> None:
    config = write_config(name, tmp_path)
    env = {**os.environ, "SERVER_NAME": "nats-0", **password_env(), **route_env()}
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    env.pop("NATS_SYNCER_PASSWORD")
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True
    )
    assert checked.returncode != 0
    assert "NATS_SYNCER_PASSWORD" in checked.stderr + checked.stdout


# --- The shipped config in a real server -----------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("deploy-nats")) as result:
        yield result


async def _login(server: Server, user: str) -> Client:
    return await login(server, user)


@pytest.fixture
async def admin(server: Server) -> AsyncIterator[Client]:
    client = await _login(server, "admin")
    yield client
    await client.close()


@pytest.fixture
async def broadcaster(server: Server) -> AsyncIterator[Client]:
    client = await _login(server, "broadcaster")
    yield client
    await client.close()


@pytest.fixture
async def syncer(server: Server) -> AsyncIterator[Client]:
    client = await _login(server, "syncer")
    yield client
    await client.close()


async def _denied(server: Server, client: Client, user: str, subject: str) -> None:
    """Publish to ``subject`` and wait for the server's permissions violation for it."""
    await client.publish(subject, b"{}")
    await client.flush()
    await _violation(server, user, subject)


_violation = violation
_no_violations = no_violations


async def test_broadcaster_manages_its_streams_publishes_and_reads(
    server: Server, broadcaster: Client
) -> None:
    js = broadcaster.jetstream(timeout=5)
    settings = LogSettings()
    await ensure_streams(js, settings, (Kind.FLEET, Kind.GAMESERVER))
    await ensure_streams(js, settings, (Kind.FLEET,))  # the update path
    await publish_event(js, settings, "fleet.events.added", _fleet("keep"))
    await publish_event(js, settings, "fleet.events.added", _fleet("gone"))
    await publish_event(js, settings, "fleet.events.deleted", _fleet("gone", "2"))  # purges
    subjects = [m.subject async for m in read_log(js, FLEETS)]
    assert "agones.fleet.events.added.default.keep" in subjects
    assert "agones.fleet.events.added.default.gone" not in subjects
    lease = await js.create_key_value(bucket=LEASE_BUCKET, history=1, ttl=30)
    await lease.put("leader", b"pod-a")
    assert (await lease.get("leader")).value == b"pod-a"
    _no_violations(server, "broadcaster")


async def test_broadcaster_cannot_delete_streams_or_touch_node_state(
    server: Server, broadcaster: Client, admin: Client
) -> None:
    await ensure_streams(broadcaster.jetstream(timeout=5), LogSettings())
    for subject in (
        f"$JS.API.STREAM.DELETE.{FLEETS}",
        f"$JS.API.STREAM.CREATE.{stream_name('other', Kind.FLEET)}",
        f"$KV.{NODES_BUCKET}.node.n1",
        "other.fleet.events.added.default.x",
    ):
        await _denied(server, broadcaster, "broadcaster", subject)
    assert (await admin.jetstream().stream_info(FLEETS)).config.name == FLEETS


async def test_syncer_consumes_through_its_durable_and_writes_its_buckets(
    server: Server, syncer: Client, broadcaster: Client
) -> None:
    settings = LogSettings()
    await ensure_streams(broadcaster.jetstream(timeout=5), settings)
    await publish_event(broadcaster.jetstream(), settings, "fleet.events.added", _fleet("s1"))
    for config in install_buckets("agones"):
        await ensure_bucket(broadcaster.jetstream(timeout=5), config)
    js = syncer.jetstream(timeout=5)
    assert [m async for m in read_log(js, FLEETS)]
    await js.add_consumer(FLEETS, durable_config("node-1", "agones", DurableLimits(), 1))
    sub = await js.pull_subscribe_bind(durable="syncer-node-1", stream=FLEETS)
    messages = await sub.fetch(100, timeout=5)
    for message in messages[:-1]:
        await message.ack_sync()
    await messages[-1].nak()
    assert (await sub.consumer_info()).name == "syncer-node-1"
    # A replay replaces the durable to move its start sequence.
    await sub.unsubscribe()
    assert await js.delete_consumer(FLEETS, "syncer-node-1")
    for bucket, key in (
        (NODES_BUCKET, "node.node-1"),
        (PULLED_BUCKET, "node-1.abc"),
        (PINNED_BUCKET, "node-1.abc"),
        (SLOTS_BUCKET, "slot.abc.node-1"),
    ):
        kv = await js.key_value(bucket)
        await kv.put(key, b"{}")
        assert (await kv.get(key)).value == b"{}"
        await kv.delete(key)
    _no_violations(server, "syncer")


async def test_syncer_cannot_publish_events_or_damage_the_log(
    server: Server, syncer: Client, broadcaster: Client, admin: Client
) -> None:
    await ensure_streams(broadcaster.jetstream(timeout=5), LogSettings())
    for subject in (
        "agones.fleet.events.added.default.evil",
        f"$JS.API.STREAM.DELETE.{FLEETS}",
        f"$JS.API.STREAM.PURGE.{FLEETS}",
        f"$JS.API.STREAM.UPDATE.{FLEETS}",
        f"$JS.API.CONSUMER.DELETE.KV_{NODES_BUCKET}.watcher",
        f"$JS.API.STREAM.DELETE.KV_{NODES_BUCKET}",
        f"$JS.API.STREAM.CREATE.{stream_name('agones', Kind.GAMESERVER)}",
        f"$KV.{LEASE_BUCKET}.leader",
    ):
        await _denied(server, syncer, "syncer", subject)
    # Reading around JetStream, straight off the event subjects, is not allowed either.
    await syncer.subscribe("agones.>")
    await syncer.flush()
    await _violation(server, "syncer", "agones.>")
    stored = [m.subject async for m in read_log(admin.jetstream(), FLEETS)]
    assert not [s for s in stored if s.endswith(".evil")]


async def test_node_images_published_by_the_broadcaster_read_by_syncers(
    server: Server, syncer: Client, broadcaster: Client
) -> None:
    settings = LogSettings()
    await ensure_node_images_stream(broadcaster.jetstream(timeout=5), settings)
    await ensure_node_images_stream(broadcaster.jetstream(timeout=5), settings)  # the update path
    sdk = NodeImages(AGONES_SDK_SOURCE, ["registry.example/agones-sdk:1.44.0"], "agones-system/x")
    await publish_node_images(broadcaster.jetstream(), settings, sdk)
    assert await read_node_images(syncer.jetstream(timeout=5), "agones") == {AGONES_SDK_SOURCE: sdk}
    for subject in (
        f"agones.nodeimages.{AGONES_SDK_SOURCE}",
        f"$JS.API.STREAM.PURGE.{node_images_stream_name('agones')}",
        f"$JS.API.STREAM.UPDATE.{node_images_stream_name('agones')}",
    ):
        await _denied(server, syncer, "syncer", subject)
    # (The server is shared: earlier tests' deliberate violations are not this test's.)
    mine = [
        e
        for u, e in server.errors
        if u == "broadcaster" and ("node_images" in e.lower() or "nodeimages" in e.lower())
    ]
    assert not mine


async def test_a_wrong_password_is_refused(server: Server) -> None:
    client = Client()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization"):
            await client.connect(server.url, user="syncer", password="wrong", allow_reconnect=False)
    finally:
        await client.close()


async def test_no_reply_subject_lets_the_shared_syncer_make_the_server_write(
    server: Server, syncer: Client, broadcaster: Client, admin: Client
) -> None:
    """The static install has the same structure: every API verb the shared syncer may send,
    with every subject a stream or bucket captures as its reply, stores nothing anywhere."""
    settings = LogSettings()
    bjs = broadcaster.jetstream(timeout=5)
    await ensure_streams(bjs, settings, (Kind.FLEET, Kind.GAMESERVER))
    await ensure_node_images_stream(bjs, settings)
    for config in install_buckets("agones"):
        await ensure_bucket(bjs, config)
    await publish_event(bjs, settings, "fleet.events.added", _fleet("replied"))
    ajs = admin.jetstream(timeout=5)
    streams = await ajs.streams_info()
    replies = [concrete(s) for info in streams for s in info.config.subjects or []]
    replies += [f"$JS.API.STREAM.PURGE.{info.config.name}" for info in streams]
    verbs = [concrete(p) for p in syncer_permissions().publish if p.startswith("$JS.API.")]
    verbs = [v.replace(".forged.x", "") if ".DIRECT.GET." in v else v for v in verbs]

    async def state() -> dict[str, tuple[int, int]]:
        return {
            info.config.name or "": (info.state.last_seq, info.state.messages)
            for info in await ajs.streams_info()
        }

    before = await state()
    for verb in verbs:
        body = b'{"seq": 1}' if ".DIRECT.GET." in verb else b""
        for reply in replies:
            await syncer.publish(verb, body, reply=reply)
    await syncer.flush()
    # Each path answers a request with a real reply only after what it queued before.
    for verb in verbs:
        body = b'{"seq": 1}' if ".DIRECT.GET." in verb else b""
        with contextlib.suppress(nats.errors.Error):
            await syncer.request(verb, body, timeout=2)
    assert len(verbs) * len(replies) > 300
    assert await state() == before
