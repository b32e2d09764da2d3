"""Per-node NATS identities through the auth callout, on a real nats-server and real containerd.

The server runs the callout configuration deploy/nats uses (``render_callout_accounts``); the
callout (``authcallout.service.run``) reviews tokens against the fake API server's TokenReview.
The hostile-node test proves every refusal from the server's own log ("Violation" lines), and that
nothing of the other node changed, while the node's own syncer pulls through the same identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StorageType, StreamConfig
from support.fakekube import FakeKube
from support.fleetdicts import fleet
from support.polling import eventually as _until
from support.syncer_harness import (
    DEADLINE,
    RunningSyncer,
    eventually,
    logged,
    metric,
    settings_with,
)

from authcallout.natsjwt import Signer, new_account_seed
from authcallout.service import CalloutSettings, run
from authcallout.tokenreview import KubeConfigError, TokenReviewer
from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.nats_server import NatsServer
from ops.logs import fields_of
from syncer.keeping import ledger
from wire import nodestatus
from wire.contract import Kind
from wire.eventlog import LogSettings, ensure_streams, publish_event, stream_name
from wire.kvbuckets import ensure_bucket
from wire.natsconn import NatsSettings, NatsUnavailable, connect
from wire.permissions import (
    AUTH_PASSWORD_ENV,
    AUTH_USER,
    BROADCASTER_INBOX,
    CALLOUT_ISSUER_ENV,
    PINNED_BUCKET,
    PULLED_BUCKET,
    SLOTS_BUCKET,
    bucket_for,
    durable_name,
    inbox_prefix,
    install_buckets,
    render_callout_accounts,
)

pytestmark = pytest.mark.nats

NS = "image-syncer"
NODE_NS = "image-syncer-node"
SYNCER_SA = "image-syncer-syncer"


@dataclass
class Callout:
    server: NatsServer
    kube: FakeKube
    directory: Path
    prefix: str
    password: str = ""
    seed_file: Path = Path()
    stoppers: list[asyncio.Event] = field(default_factory=list)
    tasks: list[asyncio.Task[int]] = field(default_factory=list)

    async def start_replica(self, *, max_session: float = 3600.0) -> None:
        stopping, task = await _start_callout(
            self.server, self.kube, self.prefix, self.password, self.seed_file, max_session
        )
        self.stoppers.append(stopping)
        self.tasks.append(task)

    async def stop_replicas(self) -> None:
        for stopping in self.stoppers:
            stopping.set()
        for task in self.tasks:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DEADLINE):
                    await task

    def token_file(self, token: str) -> str:
        path = self.directory / f"token-{uuid.uuid4().hex[:8]}"
        path.write_text(token)
        return str(path)

    def settings(self, token: str, *, inbox: str | None = None) -> NatsSettings:
        return NatsSettings(
            servers=(self.server.url,), token_file=self.token_file(token), inbox_prefix=inbox
        )

    def node_settings(self, node: str) -> NatsSettings:
        token = self.kube.issue_token(NODE_NS, SYNCER_SA, node=node)
        return self.settings(token, inbox=inbox_prefix(durable_name(node)))

    async def admin(self) -> Client:
        token = self.kube.issue_token(NS, "image-syncer-admin")
        return await connect(self.settings(token), name="admin")

    def violations(self, client_name: str) -> list[str]:
        """The server's own log of what it refused to the named connection."""
        lines = self.server.log_file.read_text(errors="replace").splitlines()
        return [line for line in lines if "Violation" in line and f':{client_name}"' in line]


async def _start_callout(
    server: NatsServer,
    kube: FakeKube,
    prefix: str,
    password: str,
    seed_file: Path,
    max_session: float,
) -> tuple[asyncio.Event, asyncio.Task[int]]:
    settings = CalloutSettings(
        nats=NatsSettings(servers=(server.url,), user=AUTH_USER, password=password),
        issuer_seed_file=str(seed_file),
        kubeconfig=str(kube.kubeconfig),
        subject_prefix=prefix,
        max_session=max_session,
        metrics_addr="",
    )
    stopping = asyncio.Event()
    return stopping, asyncio.create_task(run(settings, stopping))


@pytest.fixture
async def callout(
    tmp_path: Path, kube: FakeKube, prefix: str, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Callout]:
    async for result in start_callout(tmp_path, kube, prefix, caplog):
        yield result


async def start_callout(
    tmp_path: Path, kube: FakeKube, prefix: str, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Callout]:
    """A server with the shipped callout config for ``prefix`` and two callout replicas."""
    caplog.set_level(logging.INFO)
    seed = new_account_seed()
    seed_file = tmp_path / "issuer.seed"
    seed_file.write_text(seed)
    password = f"auth-{uuid.uuid4().hex}"
    server = NatsServer(
        tmp_path / "nats",
        extra_config=render_callout_accounts(prefix),
        env={AUTH_PASSWORD_ENV: password, CALLOUT_ISSUER_ENV: Signer(seed).public_key},
    ).start()
    result = Callout(server, kube, tmp_path, prefix, password, seed_file)
    try:
        # Two replicas in one queue group, as deployed.
        for _ in range(2):
            await result.start_replica()
        await eventually(
            lambda: len(logged(caplog, "auth callout serving")) == 2, "callouts serving"
        )
        yield result
    finally:
        await result.stop_replicas()
        server.stop()


async def install(js: JetStreamContext, prefix: str) -> None:
    """What the broadcaster ensures at start: the streams and every bucket, final config."""
    await ensure_streams(js, LogSettings(prefix=prefix))
    for config in install_buckets(prefix):
        await ensure_bucket(js, config)


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return logged(caplog, "nats client refused")


# --- the hostile node -----------------------------------------------------------------------


async def _attempt(action: Callable[[], object]) -> None:
    """Run one hostile operation; the server drops it, so the client sees a timeout or error."""
    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
        async with asyncio.timeout(10):
            await action()  # type: ignore[misc]


async def test_a_node_can_touch_only_itself(
    callout: Callout,
    containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = callout.prefix
    log_settings = LogSettings(prefix=prefix)
    fleets = stream_name(prefix, Kind.FLEET)
    status = nodestatus.StatusSettings(prefix=prefix)
    pulled_bucket = bucket_for(PULLED_BUCKET, prefix)
    pinned_bucket = bucket_for(PINNED_BUCKET, prefix)
    slots_bucket = bucket_for(SLOTS_BUCKET, prefix)
    node_a, node_b = f"node-a-{uuid.uuid4().hex[:4]}.example", "node-b.example"
    durable_b = durable_name(node_b)

    # Node B's state, made by the admin: its durable with one event pending, status, ledger.
    admin = await callout.admin()
    js = admin.jetstream()
    await install(js, prefix)
    image = push()
    await publish_event(js, log_settings, "fleet.events.added", fleet("game", image))
    await js.add_consumer(
        fleets, ConsumerConfig(durable_name=durable_b, mem_storage=True, num_replicas=1)
    )
    status_kv = await nodestatus.ensure_status_bucket(js, status)
    await status_kv.put(nodestatus.node_key(node_b), b'{"b": "status"}')
    pulled_kv = await ledger.ensure_ledger_bucket(js, pulled_bucket, description="pulled")
    ledger_b = ledger.record_key(node_b, "registry.example/b:1")
    await pulled_kv.put(ledger_b, b"b-ledger")
    pinned_kv = await ledger.ensure_ledger_bucket(js, pinned_bucket, description="pinned")
    await pinned_kv.put(ledger_b, b"b-pinned")
    await status_kv.put(nodestatus.beat_key(node_b), b"b-beat")

    async def snapshot() -> object:
        info = await js.consumer_info(fleets, durable_b)
        streams = [
            (await js.stream_info(s)).config.as_dict()
            for s in (fleets, f"KV_{status.bucket}", f"KV_{pulled_bucket}", f"KV_{pinned_bucket}")
        ]
        return (
            (info.delivered.stream_seq, info.ack_floor.stream_seq, info.num_pending),
            info.config.as_dict(),
            (await status_kv.get(nodestatus.node_key(node_b))).revision,
            (await pulled_kv.get(ledger_b)).revision,
            (await pinned_kv.get(ledger_b)).revision,
            (await status_kv.get(nodestatus.beat_key(node_b))).revision,
            streams,
        )

    before = await snapshot()

    # A's own syncer works end to end through its per-node identity.
    settings = settings_with(
        node_name=node_a,
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        pull_timeout=30.0,
        subject_prefix=prefix,
        metrics_addr="",
        status_interval=0.2,
        remove_unused=True,
        # Seeding on: its lease and its report go through A's identity too.
        mirror=("*",),
        consumer_provisioned=True,
        nats=callout.node_settings(node_a),
    )
    syncer = await RunningSyncer(settings).start()
    try:
        await eventually(lambda: image in containerd.image_refs(), f"{image} pulled by A")
        own_record = ledger.record_key(node_a, image)
        await _until(lambda: _exists(pulled_kv, own_record), "A recorded its pull")
        await _until(lambda: _exists(status_kv, nodestatus.node_key(node_a)), "A wrote its status")
        # The report is written after the pull is recorded: poll for its line.
        await eventually(lambda: bool(logged(caplog, "seed complete", node=node_a)), "A seeded")

        # The same identity, used by an attacker on node A.
        attacker = await connect(callout.node_settings(node_a), name="attacker")
        # Refused requests get no answer: a short timeout keeps the test quick.
        ajs = attacker.jetstream(timeout=1)
        a_status = await ajs.key_value(status.bucket)
        a_pulled = await ajs.key_value(pulled_bucket)
        a_pinned = await ajs.key_value(pinned_bucket)

        async def fetch_b() -> None:
            sub = await ajs.pull_subscribe_bind(durable=durable_b, stream=fleets)
            await sub.fetch(1, timeout=1)

        async def raw_create(config: dict[str, Any]) -> dict[str, Any]:
            body = json.dumps({"stream_name": fleets, "config": config}).encode()
            reply = await attacker.request(f"$JS.API.CONSUMER.CREATE.{fleets}", body, timeout=5)
            result: dict[str, Any] = json.loads(reply.data)
            return result

        hostile: list[tuple[str, Callable[[], object]]] = [
            (f"$JS.API.CONSUMER.MSG.NEXT.{fleets}.{durable_b}", fetch_b),
            (
                f"$JS.ACK.{fleets}.{durable_b}.1.1.1.0.0",
                lambda: attacker.publish(f"$JS.ACK.{fleets}.{durable_b}.1.1.1.0.0", b"+ACK"),
            ),
            (
                f"$JS.API.CONSUMER.DELETE.{fleets}.{durable_b}",
                lambda: ajs.delete_consumer(fleets, durable_b),
            ),
            (
                f"$JS.API.CONSUMER.DURABLE.CREATE.{fleets}.{durable_b}",
                lambda: ajs.add_consumer(fleets, durable_name=durable_b),
            ),
            (
                f"$JS.API.CONSUMER.CREATE.{fleets}.{durable_b}",
                lambda: ajs.add_consumer(fleets, name=durable_b, durable_name=durable_b),
            ),
            (
                f"$KV.{status.bucket}.{nodestatus.node_key(node_b)}",
                lambda: a_status.put(nodestatus.node_key(node_b), b"forged"),
            ),
            (
                f"$KV.{status.bucket}.{nodestatus.node_key(node_b)}",
                lambda: a_status.delete(nodestatus.node_key(node_b)),
            ),
            (f"$KV.{pulled_bucket}.{ledger_b}", lambda: a_pulled.put(ledger_b, b"forged")),
            (f"$KV.{pinned_bucket}.{ledger_b}", lambda: a_pinned.delete(ledger_b)),
            # A seed report in B's name (syncer.pulling.seeding): only B may say it holds an image.
            (
                f"$KV.{slots_bucket}.seeded.{'0' * 24}.{node_b}",
                lambda: ajs.publish(
                    f"$KV.{slots_bucket}.seeded.{'0' * 24}.{node_b}", b"{}", msg_ttl=60
                ),
            ),
            (
                f"$KV.{status.bucket}.{nodestatus.beat_key(node_b)}",
                lambda: a_status.put(nodestatus.beat_key(node_b), b"forged"),
            ),
            (
                f"{prefix}.fleet.events.added.default.evil",
                lambda: ajs.publish(f"{prefix}.fleet.events.added.default.evil", b"{}"),
            ),
            (
                f"{prefix}.fleet.events.deleted.default.game",
                lambda: attacker.publish(f"{prefix}.fleet.events.deleted.default.game", b"{}"),
            ),
            (
                f"{inbox_prefix(durable_b)}.>",
                lambda: attacker.subscribe(f"{inbox_prefix(durable_b)}.>"),
            ),
            ("_INBOX.>", lambda: attacker.subscribe("_INBOX.>")),
            (
                f"$JS.API.STREAM.UPDATE.{fleets}",
                lambda: ajs.update_stream(StreamConfig(name=fleets, max_msgs=1)),
            ),
            (
                f"$JS.API.STREAM.UPDATE.KV_{status.bucket}",
                lambda: ajs.update_stream(StreamConfig(name=f"KV_{status.bucket}", max_msgs=1)),
            ),
            (f"$JS.API.STREAM.PURGE.{fleets}", lambda: ajs.purge_stream(fleets)),
            (
                f"$JS.API.STREAM.DELETE.KV_{pulled_bucket}",
                lambda: ajs.delete_stream(f"KV_{pulled_bucket}"),
            ),
        ]
        for subject, action in hostile:
            await _attempt(action)
            await eventually(
                partial(_violated, callout, "attacker", subject),
                f"server refused {subject}",
            )

        # What permissions cannot name, the server refuses itself: the bare create subject
        # (nats-py's ordered reads) cannot make or take over a durable, and a create that
        # differs from an existing bucket is no update.
        for config in (
            {"durable_name": durable_b, "ack_policy": "explicit"},
            {"name": durable_b, "ack_policy": "explicit"},
        ):
            with pytest.raises(nats.errors.Error):
                await raw_create(config)
        with pytest.raises(nats.errors.Error):
            await ajs.add_stream(
                StreamConfig(
                    name=f"KV_{status.bucket}",
                    subjects=[f"$KV.{status.bucket}.>"],
                    storage=StorageType.MEMORY,
                )
            )
        await attacker.close()

        assert await snapshot() == before, "node B's durable, keys or a stream changed"
        # A's own syncer needed nothing it was not given.
        assert not callout.violations(f"syncer {node_a}")
        assert syncer.task is not None and not syncer.task.done()
    finally:
        assert await syncer.stop() == 0
        await admin.close()


async def _exists(kv: object, key: str) -> bool:
    try:
        await kv.get(key)  # type: ignore[attr-defined]
    except nats.js.errors.KeyNotFoundError:
        return False
    return True


# --- refusals, recovery, rotation, replicas --------------------------------------------------


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "token is expired"),
        ("wrong-audience", "is invalid for the target audiences"),
        ("unknown-account", "service account default/intruder has no role here"),
        ("not-node-bound", "token not bound to a pod on a node"),
        ("not-a-token", "token has been invalidated"),
    ],
)
async def test_a_bad_token_is_refused_with_one_clear_line(
    callout: Callout, case: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    kube = callout.kube
    issuers: dict[str, Callable[[], str]] = {
        "expired": lambda: kube.issue_token(NODE_NS, SYNCER_SA, node="n1", expires_in=-1),
        "wrong-audience": lambda: kube.issue_token(
            NS, SYNCER_SA, node="n1", audiences=("https://kubernetes.default.svc",)
        ),
        "unknown-account": lambda: kube.issue_token("default", "intruder", node="n1"),
        "not-node-bound": lambda: kube.issue_token(NODE_NS, SYNCER_SA),
        "not-a-token": lambda: "not-a-token",
    }
    token = issuers[case]()
    refused_before = metric("image_syncer_auth_requests_total", result="refused", role="")
    with pytest.raises(NatsUnavailable, match="Authorization Violation"):
        await connect(replace(callout.settings(token), connect_timeout=1.0), name="refused")
    assert metric("image_syncer_auth_requests_total", result="refused", role="") > refused_before
    refusals = _refusals(caplog)
    assert refusals, "no refusal logged"
    for record in refusals:
        fields = fields_of(record)
        assert reason in fields["reason"], fields["reason"]
        assert fields["client_host"] == "127.0.0.1"
    for record in caplog.records:
        assert token not in record.getMessage() and token not in str(vars(record))
    assert not logged(caplog, "nats client authorized", role="syncer")


async def test_syncer_retries_and_recovers_once_given_a_valid_token(
    callout: Callout,
    containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = f"node-{uuid.uuid4().hex[:6]}"
    settings = settings_with(
        node_name=node,
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        subject_prefix=callout.prefix,
        metrics_addr="",
        consumer_provisioned=True,
        nats=callout.settings(
            callout.kube.issue_token(NODE_NS, SYNCER_SA, node=node, expires_in=-1),
            inbox=inbox_prefix(durable_name(node)),
        ),
    )
    admin = await callout.admin()
    js = admin.jetstream()
    log_settings = LogSettings(prefix=callout.prefix)
    await install(js, callout.prefix)
    starting = asyncio.create_task(RunningSyncer(settings).start())
    try:
        await eventually(lambda: _refusals(caplog), "the expired token refused")
        assert not starting.done()
        assert settings.nats.token_file is not None
        # The kubelet writes the rotated token into the same file.
        fresh = callout.kube.issue_token(NODE_NS, SYNCER_SA, node=node)
        await asyncio.to_thread(Path(settings.nats.token_file).write_text, fresh)
        syncer = await starting
    except BaseException:
        starting.cancel()
        await admin.close()
        raise
    try:
        image = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("late", image))
        await eventually(lambda: image in containerd.image_refs(), f"{image} pulled")
    finally:
        assert await syncer.stop() == 0
        await admin.close()


async def test_a_lost_durable_is_made_again_at_the_nodes_next_login(
    callout: Callout,
    containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The node may not create its durable: when it is gone (a NATS restart drops the
    memory-backed consumer), the syncer reconnects, and the callout makes it at the login."""
    node = f"node-{uuid.uuid4().hex[:6]}"
    admin = await callout.admin()
    js = admin.jetstream()
    log_settings = LogSettings(prefix=callout.prefix)
    await install(js, callout.prefix)
    settings = settings_with(
        node_name=node,
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        subject_prefix=callout.prefix,
        metrics_addr="",
        consumer_provisioned=True,
        fetch_expiry=2.0,
        fetch_heartbeat=0.5,
        nats=callout.node_settings(node),
    )
    fleets = stream_name(callout.prefix, Kind.FLEET)
    syncer = await RunningSyncer(settings).start()
    try:
        assert (await js.consumer_info(fleets, durable_name(node))).config.filter_subject
        logins = len(logged(caplog, "nats client authorized", node=node))
        await js.delete_consumer(fleets, durable_name(node))
        image = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("after-loss", image))
        # The replay that follows the loss reads the log without a consumer: the image comes.
        await eventually(lambda: image in containerd.image_refs(), f"{image} pulled")
        await eventually(
            lambda: len(logged(caplog, "nats client authorized", node=node)) > logins,
            "the syncer logged in again",
        )

        async def durable_back() -> bool:
            try:
                await js.consumer_info(fleets, durable_name(node))
            except nats.js.errors.NotFoundError:
                return False
            return True

        await _until(durable_back, "the durable made again at the login")
        # And it delivers: a Fleet published now is pulled through the live loop.
        later = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("later", later))
        await eventually(lambda: later in containerd.image_refs(), f"{later} pulled")
        assert not callout.violations(f"syncer {node}")
    finally:
        assert await syncer.stop() == 0
        await admin.close()


async def test_a_session_ends_when_its_jwt_expires_and_resumes_with_the_rotated_token(
    callout: Callout, caplog: pytest.LogCaptureFixture
) -> None:
    # Sessions of two seconds (the token would allow an hour): each ends while the test runs.
    await callout.stop_replicas()
    await callout.start_replica(max_session=2.0)
    await eventually(
        lambda: logged(caplog, "auth callout serving"), "the short-session replica serving"
    )
    node = "rotating.example"
    kube = callout.kube
    first = kube.issue_token(NODE_NS, SYNCER_SA, node=node)
    settings = callout.settings(first, inbox=inbox_prefix(durable_name(node)))
    nc = await connect(settings, name="rotating", retry_forever=True)
    try:
        assert settings.token_file is not None
        # The kubelet rotates the file; the old pod-bound token then stops passing review.
        fresh = kube.issue_token(NODE_NS, SYNCER_SA, node=node)
        await asyncio.to_thread(Path(settings.token_file).write_text, fresh)
        kube.revoke_token(first)
        reconnects = nc.stats["reconnects"]
        authorized = len(logged(caplog, "nats client authorized", node=node))
        # The server ends the expired session; the client comes back with the file's new token
        # instead of closing for good (nats-py alone would close on the server's error).
        await eventually(lambda: nc.stats["reconnects"] > reconnects, "reconnected")
        await eventually(
            lambda: len(logged(caplog, "nats client authorized", node=node)) > authorized,
            "authorized again",
        )
        await eventually(lambda: nc.is_connected, "connected again")
        assert not nc.is_closed
        newest = logged(caplog, "nats client authorized", node=node)[-1]
        assert int(fields_of(newest)["expires_in"].rstrip("s")) <= 2
    finally:
        await nc.close()


async def test_one_callout_replica_down_leaves_the_other_answering(callout: Callout) -> None:
    callout.stoppers[0].set()
    for _ in range(3):
        nc = await callout.admin()
        await nc.close()


async def test_the_broadcaster_publishes_through_its_own_identity(
    callout: Callout, caplog: pytest.LogCaptureFixture
) -> None:
    from support.broadcaster_harness import broadcasting
    from support.fakekube.harness import fleet as kube_fleet
    from support.fakekube.harness import wait_converged

    from broadcaster.settings import Settings
    from image_syncer.sandbox.processes import free_port

    kube = callout.kube
    token = kube.issue_token(NS, "image-syncer-broadcaster")
    settings = Settings(
        nats=callout.settings(token),
        log=LogSettings(prefix=callout.prefix),
        kubeconfig=str(kube.kubeconfig),
        metrics_addr=f"127.0.0.1:{free_port()}",
        backoff_initial=0.05,
        backoff_max=0.5,
        ha=True,
    )
    admin = await callout.admin()
    try:
        kube.create("fleets", kube_fleet("first", "game:1"))
        async with broadcasting(settings):
            kube.create("fleets", kube_fleet("second", "game:2"))
            await wait_converged(admin.jetstream(), callout.prefix, kube.objects())
        assert logged(caplog, "nats client authorized", role="broadcaster")
        # It needed nothing its role does not grant (its lease, streams, the status it reads).
        assert not callout.violations("broadcaster")

        # And the role grants no more: no node's state, no other client's replies.
        stolen = await connect(
            callout.settings(token, inbox=inbox_prefix(BROADCASTER_INBOX)), name="stolen"
        )
        status_key = f"$KV.{nodestatus.bucket_name(callout.prefix)}.node.some-node"
        for subject, action in (
            (status_key, lambda: stolen.publish(status_key, b"forged")),
            ("_INBOX.>", lambda: stolen.subscribe("_INBOX.>")),
        ):
            await _attempt(action)
            await eventually(
                partial(_violated, callout, "stolen", subject),
                f"server refused {subject}",
            )
        await stolen.close()
    finally:
        await admin.close()


def test_keygen_and_a_bad_issuer_seed_are_one_line_each(tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "image_syncer", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    keygen = cli("auth-keygen")
    assert keygen.returncode == 0, keygen.stderr
    seed = keygen.stdout.strip()
    public = keygen.stderr.strip().rsplit(": ", 1)[1]
    assert Signer(seed).public_key == public and public.startswith("A")

    bad = tmp_path / "seed"
    bad.write_text("not a seed")
    refused = cli("auth", "--issuer-seed-file", str(bad), "--metrics-addr", "")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == "error: the issuer seed is not an nkey seed"


def test_a_node_identity_writes_every_bucket_and_reads_every_stream_the_static_syncer_does() -> (
    None
):
    """A bucket or stream added to the static syncer's list must reach the per-node one too."""
    from wire.permissions import node_syncer_permissions, syncer_permissions

    static = syncer_permissions("agones").publish
    node = node_syncer_permissions("ip-10-0-0-1.example", "agones").publish

    def buckets(subjects: tuple[str, ...]) -> set[str]:
        return {s.split(".")[1] for s in subjects if s.startswith("$KV.")}

    def read_streams(subjects: tuple[str, ...]) -> set[str]:
        return {s.rsplit(".", 1)[1] for s in subjects if s.startswith("$JS.API.STREAM.INFO.")}

    assert buckets(node) == buckets(static)
    assert read_streams(node) == read_streams(static)
    # Narrower, never wider: no wildcard durable, no stream or bucket update.
    assert not [s for s in node if "UPDATE" in s or "PURGE" in s or s.endswith(".*.*")]


@pytest.mark.parametrize(
    "text",
    [
        "clusters: 7\n",  # TypeError deep in the client
        "- a\n- list\n",  # TypeError
        "current-context: x\ncontexts: [{name: x, context: 5}]\n",  # AttributeError
    ],
)
def test_a_malformed_kubeconfig_is_one_kube_config_error_naming_the_file(
    tmp_path: Path, text: str
) -> None:
    """The callout loads the kubeconfig as the broadcaster does (kubeclient): a file of the wrong
    shape is a KubeConfigError, which the CLI prints as one line, not a traceback."""
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    with pytest.raises(KubeConfigError, match=f"^cannot load kubeconfig {path}: "):
        TokenReviewer(str(path), "nats")


def _violated(callout: Callout, user: str, subject: str) -> bool:
    """Whether the server logged a permissions violation of ``user`` on ``subject``."""
    return any(f'"{subject}"' in v for v in callout.violations(user))
