"""The static install's read-only ``reader`` user: what a CD job's staging step runs with.

The Secret ``image-syncer-rollout-nats`` copied into every Fleet's namespace holds this user, so
it must read what ``wait``, ``status`` and ``rollout --stage-only`` read and change nothing.
Against a real nats-server with the shipped static config (deploy/nats/single): the commands run
end to end as subprocesses with the reader's credentials, against streams and buckets the
operator installed and the shared syncer user filled; then the reader's own login sends what
tests/support/attacks.py generates (every JetStream API verb on every stream and consumer name,
every reply subject a stream captures, every state-changing header on every subject it may
publish, subscriptions outside its inbox), each batch judged by a snapshot of every stream and
bucket (config, messages, consumers) that must not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from support.attacks import (
    HEADERS,
    ReaderAttacker,
    allowed,
    api_requests,
    judge_replies,
    reply_subjects,
    send,
    stored_subjects,
)
from support.fakekube import FakeKube
from support.fakekube.harness import fleet
from support.hostile_world import barrier, concrete, install, judge, snapshot
from support.polling import eventually
from support.staticnats import PASSWORDS, Server, login, running

from wire import nodestatus
from wire.contract import NEXT_IMAGES_ANNOTATION, Kind, subject_filter
from wire.eventlog import LogSettings, publish_event, stream_name
from wire.nodestatus import NodeState, NodeStatus, StatusSettings, put_status
from wire.permissions import (
    READER_INBOX,
    inbox_prefix,
    reader_permissions,
    render_accounts,
)

pytestmark = pytest.mark.nats

PREFIX = "agones"
CURRENT = "registry.example/game:1"
NEXT = "registry.example/game:2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("deploy-nats-reader")) as result:
        yield result


@pytest.fixture
async def admin(server: Server) -> AsyncIterator[Client]:
    """The operator (inside the JetStream account): installs what the broadcaster would."""
    client = await login(server, "admin")
    js = client.jetstream(timeout=5)
    await install(js, PREFIX)
    # No node of an earlier test: each test's nodes are the only ones that report.
    await js.purge_stream(f"KV_{nodestatus.bucket_name(PREFIX)}")
    yield client
    await client.close()


@pytest.fixture
async def syncer(server: Server) -> AsyncIterator[Client]:
    client = await login(server, "syncer")
    yield client
    await client.close()


@pytest.fixture
async def reader(server: Server) -> AsyncIterator[Client]:
    client = await login(server, "reader", inbox_prefix=inbox_prefix(READER_INBOX))
    yield client
    await client.close()


# --- The role ---------------------------------------------------------------------------------


def test_the_reader_may_only_read_and_only_on_its_own_inbox() -> None:
    role = reader_permissions(PREFIX)
    reads = ("$JS.API.STREAM.INFO.", "$JS.API.DIRECT.GET.")
    assert role.publish[0] == "$JS.API.INFO"
    assert all(s.startswith(reads) for s in role.publish[1:]), role.publish
    streams = {s.removeprefix(reads[0]) for s in role.publish if s.startswith(reads[0])}
    assert streams == {
        stream_name(PREFIX, Kind.FLEET),
        f"KV_{nodestatus.bucket_name(PREFIX)}",
    }
    assert role.subscribe == ("_INBOX.reader.>",)
    assert "user: reader\n        password: $NATS_READER_PASSWORD" in render_accounts(PREFIX)


# --- The commands, end to end with the reader's credentials ----------------------------------


async def _fleet_with_nodes(admin: Client, syncer: Client, *, done: bool) -> tuple[str, str, int]:
    """A Fleet staging ``NEXT`` in the log, and one node reporting it (done or behind)."""
    name = f"game-{uuid.uuid4().hex[:6]}"
    obj = fleet(name, CURRENT)
    # Its own uid: the log drops a second message with the same id (uid and version).
    obj["metadata"] |= {"annotations": {NEXT_IMAGES_ANNOTATION: NEXT}, "uid": f"uid-{name}"}
    ack = await publish_event(
        admin.jetstream(timeout=5), LogSettings(prefix=PREFIX), "fleet.events.added", obj
    )
    node = f"node-{uuid.uuid4().hex[:6]}"
    await _report(syncer, node, f"default/{name}", ack.seq if done else ack.seq - 1)
    return f"default/{name}", node, ack.seq


async def _report(syncer: Client, node: str, fleet_key: str, seq: int) -> None:
    """What a syncer writes, through the shared syncer user: folded up to ``seq``, nothing
    missing (a node with the Fleet's images)."""
    now = datetime.now(UTC)
    status = NodeStatus(
        node=node,
        version="v",
        reported_at=now,
        started_at=now,
        summary=NodeState(fleets={fleet_key: seq}),
    )
    await put_status(syncer.jetstream(timeout=5), StatusSettings(prefix=PREFIX), status)


def _env(server: Server, kube: FakeKube | None = None) -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    for variable in ("NATS_TOKEN", "NATS_TOKEN_FILE", "NATS_CREDS", "KUBECONFIG"):
        env.pop(variable, None)
    env |= {
        "NATS_URL": server.url,
        "NATS_USER": "reader",
        "NATS_PASSWORD": PASSWORDS["reader"],
        "SUBJECT_PREFIX": PREFIX,
    }
    if kube is not None:
        env["KUBECONFIG"] = str(kube.kubeconfig)
    return env


async def _run(server: Server, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        *args,
        env=_env(server),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_wait_and_status_work_with_the_reader_credentials(
    server: Server, admin: Client, syncer: Client
) -> None:
    fleet_key, node, seq = await _fleet_with_nodes(admin, syncer, done=True)
    for args, shown in (
        (["wait", "--fleet", fleet_key, "--timeout", "30s"], f"as of event seq {seq}"),
        (["wait", "--fleet", fleet_key, "--next", "--timeout", "30s"], "next images present"),
        (["status"], node),
        (["status", "--fleet", fleet_key], node),
        (["status", "--check-log", "--json"], fleet_key),
        (["status", "--node", node], fleet_key),
    ):
        code, out, err = await _run(server, *args)
        assert code == 0, (args, out, err)
        assert shown in out, (args, out)
        assert "permissions violation" not in (out + err).lower(), (args, err)


async def test_rollout_stage_only_follows_the_nodes_live_with_the_reader_credentials(
    server: Server, admin: Client, syncer: Client, kube: FakeKube
) -> None:
    """Already staged on the Fleet: the command reads the log until it names the next image,
    then follows the status bucket, polling, until the node that was behind catches up."""
    fleet_key, node, seq = await _fleet_with_nodes(admin, syncer, done=False)
    name = fleet_key.split("/")[1]
    staged = fleet(name, CURRENT)
    staged["metadata"]["annotations"] = {NEXT_IMAGES_ANNOTATION: NEXT}
    kube.create("fleets", staged)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "image_syncer",
        "rollout",
        fleet_key,
        "--image",
        f"game={NEXT}",
        "--stage-only",
        "--timeout",
        "60s",
        "--poll-interval",
        "200ms",
        env=_env(server, kube),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None and process.stdout is not None
    try:
        # The progress line says it is following, with the node behind.
        progress = b""
        while b"next images on 0/1 targeted nodes" not in progress:
            try:
                line = await asyncio.wait_for(process.stderr.readline(), timeout=60)
            except TimeoutError:
                pytest.fail(f"no progress line within 60s: {progress.decode()}")
            assert line, f"rollout ended: {progress.decode()}"
            progress += line
        await _report(syncer, node, fleet_key, seq)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, (out.decode(), (progress + err).decode())
    assert "not moved (--stage-only)" in out.decode()
    assert "permissions violation" not in (progress + err).decode().lower()


async def test_the_old_watch_of_the_status_bucket_is_refused_to_the_reader(
    server: Server, admin: Client, reader: Client
) -> None:
    """What wait and status did before (a KV watch: the bare consumer create, whose body may
    name any consumer and deliver subject) is not the reader's to send."""
    kv = await reader.jetstream(timeout=5).key_value(nodestatus.bucket_name(PREFIX))
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await kv.watch(">", inactive_threshold=1.0)
    subject = f"$JS.API.CONSUMER.CREATE.KV_{nodestatus.bucket_name(PREFIX)}"
    await eventually(
        lambda: any(subject.lower() in e.lower() for u, e in server.errors if u == "reader"),
        lambda: f"the watch's consumer create refused; errors seen: {server.errors}",
    )
    consumers = await admin.jetstream(timeout=5).consumers_info(
        f"KV_{nodestatus.bucket_name(PREFIX)}"
    )
    assert not consumers


# --- Generated attacks: the reader changes nothing ------------------------------------------


@pytest.fixture
async def world(admin: Client, syncer: Client, reader: Client) -> ReaderAttacker:
    await _fleet_with_nodes(admin, syncer, done=True)
    return ReaderAttacker(admin.jetstream(timeout=5), reader, PREFIX)


async def _refused_by_the_server(server: Server, subjects: list[str]) -> None:
    def missing() -> list[str]:
        seen = "\n".join(e for u, e in server.errors if u == "reader").lower()
        return [s for s in subjects if f'"{s.lower()}"' not in seen]

    await eventually(lambda: not missing(), lambda: f"not refused: {missing()[:5]}")


async def test_every_api_verb_the_reader_may_not_send_is_refused_and_changes_nothing(
    server: Server, world: ReaderAttacker
) -> None:
    streams = await stored_subjects(world)
    requests = api_requests(world, streams)
    for subject, _ in requests:
        if allowed(world, subject):
            verb = subject.removeprefix("$JS.API.")
            assert verb == "INFO" or verb.startswith(("STREAM.INFO.", "DIRECT.GET.")), subject
    refused = [(s, b) for s, b in requests if not allowed(world, s)]
    assert [s for s, _ in refused if ".CONSUMER.CREATE." in s]
    capture = concrete(subject_filter(PREFIX, Kind.FLEET))
    attacks = [send(world, s, b, reply=capture) for s, b in refused]
    assert len(attacks) > 1000, len(attacks)
    changed = await judge(world, attacks, lambda: barrier(world))
    assert not changed, "\n".join(changed)
    await _refused_by_the_server(server, [s for s, _ in refused])


async def test_no_reply_subject_makes_the_server_write_for_the_reader(
    world: ReaderAttacker,
) -> None:
    streams = await stored_subjects(world)
    requests = [(s, b) for s, b in api_requests(world, streams) if allowed(world, s)]
    assert requests
    total, failures = await judge_replies(world, requests, reply_subjects(world, streams))
    assert total > 300, total
    assert not failures, "\n".join(failures)


async def test_no_header_on_any_subject_the_reader_may_publish_changes_anything(
    world: ReaderAttacker,
) -> None:
    subjects = [concrete(p) for p in world.may_send()]
    capture = concrete(subject_filter(PREFIX, Kind.FLEET))
    attacks = [
        send(world, subject, b"forged", reply=reply, headers=headers)
        for subject in subjects
        for headers in HEADERS
        for reply in ("", capture)
    ]
    changed = await judge(world, attacks, lambda: barrier(world))
    assert not changed, "\n".join(changed)


async def test_no_subscription_outside_the_readers_inbox(
    server: Server, world: ReaderAttacker, syncer: Client
) -> None:
    got: list[str] = []

    async def record(msg: Msg) -> None:
        got.append(msg.subject)

    targets = [
        ">",
        "_INBOX.>",
        f"{inbox_prefix('broadcaster')}.>",
        "_INBOX.syncer-node-1.>",
        "_R_.>",
        "$JS.>",
        "$KV.>",
        f"{PREFIX}.>",
        "$SYS.>",
    ]
    for subject in targets:
        with contextlib.suppress(nats.errors.Error):
            await world.attacker.subscribe(subject, cb=record)
    await world.attacker.flush()
    # The syncer works meanwhile: a read and a write whose traffic must not reach the reader.
    sjs = syncer.jetstream(timeout=5)
    await sjs.publish(f"$KV.{nodestatus.bucket_name(PREFIX)}.{nodestatus.node_key('n-x')}", b"{}")
    await sjs.stream_info(stream_name(PREFIX, Kind.FLEET))
    await _refused_by_the_server(server, targets)
    assert not got
    before = await snapshot(world)
    assert before  # the judge's view is not empty: the install is there
