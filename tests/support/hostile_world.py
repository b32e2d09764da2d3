"""The world the hostile-node suite attacks, and the machinery that judges each attack.

A real nats-server 2.15.1 runs the shipped callout config (``render_callout_accounts``), a real
``image-syncer auth`` process answers its logins against the fake API server's TokenReview, and
an admin (the operator, inside the JetStream account) installs everything the broadcaster would
and fills it: Fleet events, node images, every bucket with node-b's keys, node-b's durable (made
by the callout at node-b's login, as deployed). Node-a is the attacker: it logs in with its own
valid token and may do whatever its permissions let it send.

Judging: :func:`snapshot` reads every stream and bucket of the JetStream account (config, every
message with its headers, every consumer's config and state) through the admin, leaving out only
what node-a owns (its keys, its durable). An attack is harmless when the snapshot is unchanged.
:func:`judge` runs a batch, compares, and bisects a batch that changed something down to the
attacks that did (each attack is repeatable: a forgery stores again when sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from authcallout.natsjwt import Signer, new_account_seed
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import stop_process, wait_until
from support.fakekube import FakeKube
from support.fleetdicts import fleet
from wire import nodestatus
from wire.contract import AGONES_SDK_SOURCE, Kind, NodeImages
from wire.directread import read_direct
from wire.eventlog import (
    LogSettings,
    ensure_node_images_stream,
    ensure_streams,
    publish_event,
    publish_node_images,
    stream_name,
)
from wire.kvbuckets import ensure_bucket
from wire.natsconn import NatsSettings, connect
from wire.permissions import (
    AUTH_PASSWORD_ENV,
    AUTH_USER,
    CALLOUT_ISSUER_ENV,
    IMAGES_CONSUMER_SUFFIX,
    LEASE_BUCKET,
    PINNED_BUCKET,
    PULLED_BUCKET,
    READER_INBOX,
    REPLAY_CONSUMER_SUFFIX,
    SLOTS_BUCKET,
    bucket_for,
    durable_name,
    inbox_prefix,
    install_buckets,
    node_syncer_permissions,
    node_token,
    render_callout_accounts,
)

NS = "image-syncer"
NODE_NS = "image-syncer-node"
SYNCER_SA = "image-syncer-syncer"
# The staging Job of deploy/rollout in a Fleet's namespace: the callout's reader role.
READER_SA = "game-servers/image-syncer-rollout"
NODE_A = "node-a.example"
NODE_B = "node-b.example"
# A node that has not started yet: its durable must not exist, nor be creatable by anyone else.
NODE_NEW = "node-new.example"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def concrete(pattern: str, filler: str = "forged") -> str:
    """One subject a pattern matches, wildcards filled in."""
    return ".".join(
        filler if t == "*" else f"{filler}.x" if t == ">" else t for t in pattern.split(".")
    )


# A Fleet event as node-a would forge it, where it may write what it likes.
FORGED_EVENT = json.dumps(
    {"type": "fleet.events.added", "message": fleet("forged", "evil.example/x:1")}
).encode()


@dataclass
class Installation:
    """The server, the callout process and the fake Kubernetes API of one test module."""

    server: NatsServer
    kube: FakeKube
    directory: Path
    prefix: str

    def token_file(self, token: str) -> str:
        path = self.directory / f"token-{uuid.uuid4().hex[:8]}"
        path.write_text(token)
        return str(path)

    def node_settings(self, node: str) -> NatsSettings:
        token = self.kube.issue_token(NODE_NS, SYNCER_SA, node=node)
        return NatsSettings(
            servers=(self.server.url,),
            token_file=self.token_file(token),
            inbox_prefix=inbox_prefix(durable_name(node)),
        )

    def reader_settings(self) -> NatsSettings:
        namespace, _, name = READER_SA.partition("/")
        token = self.kube.issue_token(namespace, name)
        return NatsSettings(
            servers=(self.server.url,),
            token_file=self.token_file(token),
            inbox_prefix=inbox_prefix(READER_INBOX),
        )

    def admin_settings(self) -> NatsSettings:
        token = self.kube.issue_token(NS, "image-syncer-admin")
        return NatsSettings(servers=(self.server.url,), token_file=self.token_file(token))

    def violations(self, client_name: str) -> list[str]:
        """The server's own log of what it refused to the named connection."""
        lines = self.server.log_file.read_text(errors="replace").splitlines()
        return [line for line in lines if "Violation" in line and f':{client_name}"' in line]


@contextlib.contextmanager
def installation(directory: Path, prefix: str) -> Iterator[Installation]:
    """Server with the shipped callout config, and ``image-syncer auth`` as its own process."""
    seed = new_account_seed()
    seed_file = directory / "issuer.seed"
    seed_file.write_text(seed)
    password = f"auth-{uuid.uuid4().hex}"
    with FakeKube(directory / "kube") as kube:
        server = NatsServer(
            directory / "nats",
            extra_config=render_callout_accounts(prefix),
            env={AUTH_PASSWORD_ENV: password, CALLOUT_ISSUER_ENV: Signer(seed).public_key},
        ).start()
        log_path = directory / "auth.log"
        env = {
            **os.environ,
            "NATS_URL": server.url,
            "NATS_USER": AUTH_USER,
            "NATS_PASSWORD": password,
            "AUTH_ISSUER_SEED_FILE": str(seed_file),
            "KUBECONFIG": str(kube.kubeconfig),
            "SUBJECT_PREFIX": prefix,
            "AUTH_READER_ACCOUNTS": READER_SA,
        }
        with log_path.open("wb") as log:
            callout = subprocess.Popen(
                [sys.executable, "-m", "image_syncer", "auth", "--metrics-addr", ""],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: b"auth callout serving" in log_path.read_bytes(),
                timeout=60,
                what="image-syncer auth",
                process=callout,
                log_file=log_path,
            )
            yield Installation(server, kube, directory, prefix)
        finally:
            stop_process(callout)
            server.stop()


class Attacked(Protocol):
    """What the judge needs of a world under attack: the operator's view of the JetStream
    account, the attacker's connection, and what the attacker owns and may send."""

    @property
    def js(self) -> JetStreamContext: ...

    @property
    def attacker(self) -> Client: ...

    @property
    def prefix(self) -> str: ...

    def own(self, stream: str, subject: str) -> bool: ...

    def own_consumer(self, name: str) -> bool: ...

    def may_send(self) -> tuple[str, ...]: ...


@dataclass
class World:
    """Everything installed and filled; ``attacker`` is node-a's own valid login."""

    inst: Installation
    admin: Client
    js: JetStreamContext
    node_b: Client
    attacker: Client
    errors: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.inst.prefix

    @property
    def fleets(self) -> str:
        return stream_name(self.prefix, Kind.FLEET)

    def own(self, stream: str, subject: str) -> bool:
        """What node-a may change: its own keys. Written out here, not taken from the
        permissions under test, so a permission granted too widely shows as a change."""
        p = self.prefix
        status = nodestatus.bucket_name(p)
        slots = bucket_for(SLOTS_BUCKET, p)
        mine = [
            f"$KV.{status}.{nodestatus.node_key(NODE_A)}",
            f"$KV.{status}.{nodestatus.beat_key(NODE_A)}",
            f"$KV.{status}.{nodestatus.replay_key(NODE_A)}",
            f"$KV.{bucket_for(PULLED_BUCKET, p)}.{NODE_A}.*",
            f"$KV.{bucket_for(PINNED_BUCKET, p)}.{NODE_A}.*",
            *(
                f"$KV.{slots}.{kind}.*.{node_token(NODE_A)}"
                for kind in ("slot", "mirror", "backoff", "alive.slot", "alive.mirror")
            ),
            f"$KV.{slots}.seed.*.*.{node_token(NODE_A)}",
            f"$KV.{slots}.alive.seed.*.*.{node_token(NODE_A)}",
            f"$KV.{slots}.seeded.*.{NODE_A}",
        ]
        return any(matches(pattern, subject) for pattern in mine)

    def own_consumer(self, name: str) -> bool:
        """Node-a's consumers: its durable (made at its login) and the push consumers it makes
        for itself (``syncer.following``). What they deliver, and where, is judged apart."""
        durable = durable_name(NODE_A)
        return name in (durable, durable + IMAGES_CONSUMER_SUFFIX, durable + REPLAY_CONSUMER_SUFFIX)

    def may_send(self) -> tuple[str, ...]:
        return node_syncer_permissions(NODE_A, self.prefix).publish

    async def close(self) -> None:
        for client in (self.attacker, self.node_b, self.admin):
            with contextlib.suppress(Exception):
                await client.close()


async def install(js: JetStreamContext, prefix: str) -> None:
    """What the broadcaster ensures at start (streams, node images, every bucket, its lease)."""
    settings = LogSettings(prefix=prefix)
    await ensure_streams(js, settings, (Kind.FLEET, Kind.GAMESERVER))
    await ensure_node_images_stream(js, settings)
    for config in install_buckets(prefix):
        await ensure_bucket(js, config)
    await js.create_key_value(bucket=bucket_for(LEASE_BUCKET, prefix), history=1, ttl=3600)


async def open_world(inst: Installation) -> World:
    admin = await connect(inst.admin_settings(), name="admin")
    js = admin.jetstream(timeout=5)
    await install(js, inst.prefix)
    settings = LogSettings(prefix=inst.prefix)
    for name in ("game", "lobby"):
        await publish_event(
            js, settings, "fleet.events.added", fleet(name, f"registry.example/{name}:1")
        )
    sdk = NodeImages(AGONES_SDK_SOURCE, ["registry.example/agones-sdk:1.44.0"], "agones-system/x")
    await publish_node_images(js, settings, sdk)
    lease = await js.key_value(bucket_for(LEASE_BUCKET, inst.prefix))
    await lease.put("leader", b"broadcaster-0")
    # Node-b logs in (the callout makes its durable) and writes what a syncer writes.
    node_b = await connect(inst.node_settings(NODE_B), name="node-b")
    bjs = node_b.jetstream(timeout=5)
    status = nodestatus.bucket_name(inst.prefix)
    token_b = node_token(NODE_B)
    writes = [
        (status, nodestatus.node_key(NODE_B), b'{"node": "b"}'),
        (status, nodestatus.beat_key(NODE_B), b'{"beat": "b"}'),
        (
            bucket_for(PULLED_BUCKET, inst.prefix),
            f"{NODE_B}.aaaa",
            b'{"ref": "registry.example/b:1"}',
        ),
        (
            bucket_for(PINNED_BUCKET, inst.prefix),
            f"{NODE_B}.aaaa",
            b'{"ref": "registry.example/b:1"}',
        ),
        (bucket_for(SLOTS_BUCKET, inst.prefix), f"slot.img.{token_b}", b"node-b"),
        (bucket_for(SLOTS_BUCKET, inst.prefix), f"alive.slot.img.{token_b}", b"node-b"),
        (bucket_for(SLOTS_BUCKET, inst.prefix), f"backoff.registry_example.{token_b}", b"{}"),
    ]
    ttl_buckets = {c.name for c in install_buckets(inst.prefix) if c.allow_msg_ttl}
    for bucket, key, value in writes:
        ttl = 3600.0 if f"KV_{bucket}" in ttl_buckets else None
        await bjs.publish(f"$KV.{bucket}.{key}", value, msg_ttl=ttl)
    replay = await js.key_value(status)
    await replay.put(nodestatus.replay_key(NODE_B), b'{"id": "op-1"}')
    # Node-a too: its durable exists (made at its login) and it has keys of its own.
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    attacker = await nats.connect(
        servers=[inst.server.url],
        token=inst.kube.issue_token(NODE_NS, SYNCER_SA, node=NODE_A),
        inbox_prefix=inbox_prefix(durable_name(NODE_A)).encode(),
        name="attacker",
        error_cb=on_error,
        allow_reconnect=False,
    )
    ajs = attacker.jetstream(timeout=5)
    await ajs.publish(f"$KV.{status}.{nodestatus.node_key(NODE_A)}", b'{"node": "a"}')
    # Its own replay key holds what it likes: what its replay consumer would deliver.
    await ajs.publish(f"$KV.{status}.{nodestatus.replay_key(NODE_A)}", FORGED_EVENT)
    return World(inst, admin, js, node_b, attacker, errors)


# --- snapshots ----------------------------------------------------------------------------


async def snapshot(world: Attacked) -> dict[str, Any]:
    """Every stream and bucket (config, messages, consumers) but what node-a owns."""
    js = world.js
    found: dict[str, Any] = {}
    for info in await js.streams_info():
        name = info.config.name or ""
        messages = [m for m in await _messages(js, info) if not world.own(name, m[1])]
        consumers = []
        for c in await js.consumers_info(name):
            if world.own_consumer(c.name):
                continue
            consumers.append(
                (
                    c.name,
                    json.dumps(c.config.as_dict(), sort_keys=True, default=str),
                    c.delivered.stream_seq if c.delivered else None,
                    c.ack_floor.stream_seq if c.ack_floor else None,
                    c.num_pending,
                    c.num_ack_pending,
                    c.num_redelivered,
                )
            )
        found[name] = {
            "config": json.dumps(info.config.as_dict(), sort_keys=True, default=str),
            "messages": messages,
            "consumers": sorted(consumers),
        }
    return found


async def _messages(js: JetStreamContext, info: Any) -> list[Any]:
    name = info.config.name or ""
    if not info.state.messages:
        return []
    if info.config.allow_direct:
        return [
            (m.seq, m.subject, m.data, sorted(m.headers.items()))
            async for m in read_direct(js, name)
        ]
    found = []  # the broadcaster's lease bucket: no direct gets
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            m = await js.get_msg(name, seq)
            found.append((m.seq, m.subject, m.data, sorted((m.headers or {}).items())))
    return found


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed, one line per stream and part, for the failure message."""
    lines = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            lines.append(f"{name}: created")
            continue
        if name not in after:
            lines.append(f"{name}: deleted")
            continue
        for part in ("config", "consumers", "messages"):
            old, new = before[name][part], after[name][part]
            if old != new:
                if part == "messages":
                    added = [m[:2] for m in new if m not in old]
                    gone = [m[:2] for m in old if m not in new]
                    lines.append(f"{name}: messages added {added} removed {gone}")
                else:
                    lines.append(f"{name}: {part} changed")
    return lines


Attack = tuple[str, Callable[[], Awaitable[object]]]


async def run_quietly(action: Callable[[], Awaitable[object]]) -> None:
    """Send one attack; refusals come back as errors or silence, both fine here."""
    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError, ValueError):
        async with asyncio.timeout(5):
            await action()


async def judge(
    world: Attacked, attacks: list[Attack], barrier: Callable[[], Awaitable[None]]
) -> list[str]:
    """Run ``attacks``, then ``barrier`` (which returns once the server handled them all);
    the attacks that changed anything, each with what it changed (bisected)."""
    before = await snapshot(world)
    for _, action in attacks:
        await run_quietly(action)
    await barrier()
    changed = differences(before, await snapshot(world))
    if not changed:
        return []
    if len(attacks) == 1:
        return [f"{attacks[0][0]}: {'; '.join(changed)}"]
    half = len(attacks) // 2
    return [
        *await judge(world, attacks[:half], barrier),
        *await judge(world, attacks[half:], barrier),
    ]


async def barrier(world: Attacked) -> None:
    """Return once the server handled everything the attacker sent before.

    A flush makes the server read (and permission-check) all of it; a request with a real reply
    on each path an attack may have queued (every stream's direct gets, the API, node-a's durable)
    is answered only after what that path queued before it.
    """
    nc = world.attacker
    await nc.flush()
    streams = [info.config.name or "" for info in await world.js.streams_info()]
    subjects = ["$JS.API.INFO"]
    for stream in streams:
        subjects += [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.DIRECT.GET.{stream}"]
    fleets = stream_name(world.prefix, Kind.FLEET)
    subjects.append(f"$JS.API.CONSUMER.INFO.{fleets}.{durable_name(NODE_A)}")
    allowed = world.may_send()
    for subject in [s for s in subjects if any(matches(p, s) for p in allowed)]:
        body = b'{"seq": 1}' if ".DIRECT.GET." in subject else b""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await nc.request(subject, body, timeout=2)
