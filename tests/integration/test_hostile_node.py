"""A node holding valid credentials can change nothing that is not its own: generated attacks.

Against a real nats-server with the shipped callout config and a real ``image-syncer auth`` (see
tests/support/hostile_world.py), node-a's own login sends what the suite generates rather than a list:

- every JetStream API verb, on every stream and bucket, for every consumer name pattern (another
  node's durable, one not created yet, its own, any): those it may not send are refused by the
  server (its log says so) and change nothing;
- every verb it may send, with every reply subject that some stream or bucket captures (and every
  API subject, as a reply), so that the server's answer would be stored there;
- every header that changes stream state, on every subject it may publish;
- every subscription outside its own inbox;
- stream and bucket creation before the install;
- the 16 attacks that succeeded against the previous design, each a named case.

Each batch is judged by a snapshot of every stream and bucket (config, messages, consumers) taken
before and after, leaving out only node-a's own keys and durable; a batch that changed anything is
bisected down to the attacks that did.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
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
from support.hostile_world import (
    NODE_A,
    NODE_B,
    NODE_NEW,
    NODE_NS,
    SYNCER_SA,
    Attack,
    Installation,
    World,
    barrier,
    concrete,
    installation,
    judge,
    open_world,
)
from support.polling import eventually

from image_syncer.fleetlog import newest_event
from wire import nodestatus
from wire.contract import Kind, subject_filter
from wire.kvbuckets import BucketConfigError, ensure_bucket, kv_bucket_config
from wire.natsconn import NatsSettings, NatsUnavailable, connect
from wire.nodestatus import StatusWatch
from wire.permissions import (
    IMAGES_CONSUMER_SUFFIX,
    PINNED_BUCKET,
    PULLED_BUCKET,
    REPLAY_CONSUMER_SUFFIX,
    SLOTS_BUCKET,
    bucket_for,
    durable_name,
    inbox_prefix,
    install_buckets,
    node_syncer_permissions,
    node_token,
)

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    prefix = f"h{uuid.uuid4().hex[:8]}"
    with installation(tmp_path_factory.mktemp("hostile"), prefix) as result:
        yield result


@pytest.fixture
async def world(inst: Installation) -> AsyncIterator[World]:
    result = await open_world(inst)
    try:
        yield result
    finally:
        await result.close()


# --- what gets generated ------------------------------------------------------------------

# --- the generated suites ------------------------------------------------------------------


async def test_every_api_verb_a_node_may_not_send_is_refused_and_changes_nothing(
    world: World, inst: Installation
) -> None:
    streams = await stored_subjects(world)
    requests = api_requests(world, streams)
    refused = [(s, b) for s, b in requests if not allowed(world, s)]
    # What a node may send at all: reads, its own durable's pulls and state, and its own two
    # push consumers, each on its one filter (judged by the next tests).
    pushed = own_push_consumers(world)
    own = {
        f"CONSUMER.INFO.{world.fleets}.{durable_name(NODE_A)}",
        f"CONSUMER.MSG.NEXT.{world.fleets}.{durable_name(NODE_A)}",
        *(f"CONSUMER.CREATE.{stream}.{name}.{flt}" for stream, name, flt in pushed),
        *(f"CONSUMER.INFO.{stream}.{name}" for stream, name, _ in pushed),
    }
    for subject, _ in requests:
        if allowed(world, subject):
            verb = subject.removeprefix("$JS.API.")
            assert (
                verb == "INFO" or verb.startswith(("STREAM.INFO.", "DIRECT.GET.")) or verb in own
            ), f"node-a may send {subject}"
    for stream, name, flt in pushed:
        assert f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{flt}" in dict(requests)
    capture = concrete(subject_filter(world.prefix, Kind.FLEET))
    attacks = [send(world, s, b, reply=capture) for s, b in refused]
    assert len(attacks) > 1000, len(attacks)
    changed = await judge(world, attacks, lambda: barrier(world))
    assert not changed, "\n".join(changed)

    # The server itself refused each one (its log names the subject).
    def all_refused() -> list[str]:
        seen = "\n".join(inst.violations("attacker")).lower()
        return [s for s, _ in refused if f'"{s.lower()}"' not in seen]

    await eventually(lambda: not all_refused(), lambda: f"not refused: {all_refused()[:5]}")
    # No consumer for a node that has not started, and node-b's durable still delivers all.
    with pytest.raises(nats.js.errors.NotFoundError):
        await world.js.consumer_info(world.fleets, durable_name(NODE_NEW))


async def test_no_reply_subject_makes_the_server_write_anywhere(world: World) -> None:
    streams = await stored_subjects(world)
    requests = [(s, b) for s, b in api_requests(world, streams) if allowed(world, s)]
    # Acks of its own durable, and the plain KV subjects it may write, take a reply too.
    requests.append((f"$JS.ACK.{world.fleets}.{durable_name(NODE_A)}.1.1.1.0.0", b"+ACK"))
    total, failures = await judge_replies(world, requests, reply_subjects(world, streams))
    assert total > 1000, total
    assert not failures, "\n".join(failures)


def own_push_consumers(world: World) -> list[tuple[str, str, str]]:
    """(stream, name, filter) of every consumer node-a's permissions let it create: read from
    the permissions under test, so a create granted anywhere else shows up here too."""
    found = []
    for pattern in node_syncer_permissions(NODE_A, world.prefix).publish:
        if pattern.startswith("$JS.API.CONSUMER.CREATE."):
            stream, name, flt = pattern.removeprefix("$JS.API.CONSUMER.CREATE.").split(".", 2)
            found.append((stream, name, flt))
    return found


def delivery_targets(world: World, streams: dict[str, list[str]]) -> list[str]:
    """Where a push consumer must never deliver: every reply target, other roles' inboxes."""
    others = [inbox_prefix(r) for r in ("broadcaster", durable_name(NODE_B), "admin")]
    return [*reply_subjects(world, streams), *(f"{o}.x" for o in others), "_INBOX.x"]


async def _repoint(world: World, stream: str, name: str, flt: str, deliver: str) -> bool:
    """Node-a's push consumer made afresh to deliver everything under its filter to
    ``deliver``; returns once it delivered all of it, if anyone listens there. False: the
    server refused it (a deliver subject inside its own stream "forms a cycle")."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await world.js.delete_consumer(stream, name)  # the operator clears the previous one
    config = {
        "name": name,
        "filter_subject": flt,
        "deliver_subject": deliver,
        "deliver_policy": "all",
        "ack_policy": "none",
    }
    body = json.dumps({"stream_name": stream, "config": config}).encode()
    answer = json.loads(
        (
            await world.attacker.request(
                f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{flt}", body, timeout=5
            )
        ).data
    )
    if "error" in answer:
        return False

    async def delivered_or_unheard() -> bool:
        # The server pushes only where someone listens (push_bound); it then sends at once.
        info = await world.js.consumer_info(stream, name)
        return not info.push_bound or not info.num_pending

    await eventually(delivered_or_unheard, f"{name} to deliver to {deliver}")
    return True


async def test_no_push_consumer_a_node_may_make_delivers_anywhere_but_its_own_inbox(
    world: World,
) -> None:
    """The body of a consumer create names its deliver subject, and no permission can check a
    body: node-a may point its own push consumers anywhere. The deliveries (node images, and its
    own replay key, which holds what it likes) must land nowhere that stores or acts on them."""
    streams = await stored_subjects(world)
    pushed = own_push_consumers(world)
    assert {name for _, name, _ in pushed} == {
        durable_name(NODE_A) + IMAGES_CONSUMER_SUFFIX,
        durable_name(NODE_A) + REPLAY_CONSUMER_SUFFIX,
    }
    attacks: list[Attack] = []
    made: set[str] = set()
    for stream, name, flt in pushed:
        for target in delivery_targets(world, streams):

            async def action(
                stream: str = stream, name: str = name, flt: str = flt, target: str = target
            ) -> None:
                if await _repoint(world, stream, name, flt, target):
                    made.add(f"{name} {target}")

            attacks.append((f"{name} delivering to {target}", action))
    assert len(attacks) > 50, len(attacks)
    # The worst case: the operator (the one user inside the JetStream account) listens to
    # everything there, so every target has a listener in the account whose streams capture it.
    heard: list[str] = []

    async def listen(msg: Msg) -> None:
        heard.append(msg.subject)

    operator = await world.admin.subscribe(">", cb=listen)
    try:
        changed = await judge(world, attacks, lambda: barrier(world))
    finally:
        await operator.unsubscribe()
    assert not changed, "\n".join(changed)
    targets = set(delivery_targets(world, streams))
    assert not targets & set(heard), sorted(targets & set(heard))
    # The server refuses only targets inside the consumer's own stream: most were made.
    assert len(made) > len(attacks) * 3 // 4, (len(made), len(attacks))
    # The same consumers do deliver, where node-a listens: the attacks above were not empty.
    for stream, name, flt in pushed:
        inbox = f"{inbox_prefix(durable_name(NODE_A))}.{name}"
        sub = await world.attacker.subscribe(inbox)
        assert await _repoint(world, stream, name, flt, inbox)
        msg = await sub.next_msg(timeout=10)
        assert msg.data, name
        await sub.unsubscribe()
    assert not world.errors or all("Permissions Violation" in e for e in world.errors)


async def test_no_header_on_any_subject_a_node_may_publish_touches_anything_else(
    world: World,
) -> None:
    mine = node_syncer_permissions(NODE_A, world.prefix).publish
    # An ack subject names a delivery: stream and consumer sequences, counts, time.
    subjects = [
        p.replace(".>", ".1.1.1.0.0") if p.startswith("$JS.ACK.") else concrete(p)
        for p in mine
        if not p.startswith("$JS.API.")
    ]
    assert any("$KV." in s for s in subjects) and any("$JS.ACK." in s for s in subjects)
    capture = concrete(subject_filter(world.prefix, Kind.FLEET))
    attacks = [
        send(world, subject, b"forged", reply=reply, headers=headers)
        for subject in subjects
        for headers in HEADERS
        for reply in ("", capture)
    ]
    changed = await judge(world, attacks, lambda: barrier(world))
    assert not changed, "\n".join(changed)


async def test_no_subscription_outside_its_own_inbox(world: World, inst: Installation) -> None:
    got: list[str] = []

    async def record(msg: object) -> None:
        got.append(getattr(msg, "subject", ""))

    targets = [
        ">",
        "_INBOX.>",
        f"{inbox_prefix(durable_name(NODE_B))}.>",
        f"{inbox_prefix('broadcaster')}.>",
        "_R_.>",
        "$JS.>",
        "$KV.>",
        f"{world.prefix}.>",
        "$SYS.>",
    ]
    for subject in targets:
        with contextlib.suppress(nats.errors.Error):
            await world.attacker.subscribe(subject, cb=record)
    await world.attacker.flush()
    # Node-b works meanwhile: a read and a write whose traffic must not reach node-a.
    bjs = world.node_b.jetstream(timeout=5)
    await bjs.publish(
        f"$KV.{nodestatus.bucket_name(world.prefix)}.{nodestatus.node_key(NODE_B)}", b"{}"
    )

    def refused() -> list[str]:
        seen = "\n".join(inst.violations("attacker")).lower()
        return [s for s in targets if f'"{s.lower()}"' not in seen]

    await eventually(lambda: not refused(), lambda: f"subscriptions not refused: {refused()}")
    assert not got


async def test_no_stream_or_bucket_can_be_made_before_the_install(
    world: World, inst: Installation
) -> None:
    """A node that logs in before the broadcaster ran cannot create what the install makes."""
    fresh = f"p{uuid.uuid4().hex[:6]}"
    names = [c.name or "" for c in install_buckets(fresh)]
    names += [
        f"{fresh.upper()}_FLEETS",
        f"{fresh.upper()}_NODE_IMAGES",
        f"KV_{bucket_for('IMAGE_SYNCER_LEASE', fresh)}",
    ]
    names += [c.name or "" for c in install_buckets(world.prefix)]
    attacks = [
        send(
            world,
            f"$JS.API.STREAM.CREATE.{name}",
            json.dumps({"name": name, "subjects": ["_INBOX.>", f"$KV.{name}.>"]}).encode(),
        )
        for name in names
    ]
    changed = await judge(world, attacks, lambda: barrier(world))
    assert not changed, "\n".join(changed)
    existing = {info.config.name for info in await world.js.streams_info()}
    assert not [n for n in names[: len(names) // 2] if n in existing]


async def test_a_bucket_made_by_someone_else_is_refused_and_rollups_repaired(world: World) -> None:
    """What the broadcaster finds at start: a foreign bucket stops it, a lax one is fixed."""
    fresh = f"p{uuid.uuid4().hex[:6]}"
    slots, status = install_buckets(fresh)[3], install_buckets(fresh)[0]
    assert slots.name is not None and status.name is not None
    # Made by a node of the old design: its subjects also capture other clients' replies.
    await world.js.add_stream(
        StreamConfig(name=slots.name, subjects=[f"$KV.{slots.name[3:]}.>", "_INBOX.>"])
    )
    try:
        with pytest.raises(BucketConfigError, match="subjects"):
            await ensure_bucket(world.js, slots)
    finally:
        # It captures the operator's own replies (the admin lives in the JetStream account).
        await world.js.delete_stream(slots.name or "")
    # Made by hand with nats-py's defaults: rollups allowed, no direct gets.
    lax = kv_bucket_config(status.name[3:], "", 1)
    await world.js.add_stream(
        StreamConfig.from_response(
            {**lax.as_dict(), "allow_rollup_hdrs": True, "allow_direct": False}
        )
    )
    await ensure_bucket(world.js, status)
    info = await world.js.stream_info(status.name or "")
    assert info.config.allow_rollup_hdrs is False and info.config.allow_direct is True


# --- the attacks that got through before, each by name --------------------------------------


async def _forge_by_reply(world: World, target: str) -> None:
    """Old attack: a direct get of node-a's own key, answered into ``target``."""
    status = nodestatus.bucket_name(world.prefix)
    await world.attacker.publish(
        f"$JS.API.DIRECT.GET.KV_{status}.$KV.{status}.{nodestatus.node_key(NODE_A)}",
        b"",
        reply=target,
    )


def _known(world: World) -> dict[str, Attack]:
    p = world.prefix
    status = nodestatus.bucket_name(p)
    pulled, pinned = bucket_for(PULLED_BUCKET, p), bucket_for(PINNED_BUCKET, p)
    slots = bucket_for(SLOTS_BUCKET, p)
    fleets = world.fleets

    def reply(target: str) -> Attack:
        async def action() -> None:
            await _forge_by_reply(world, target)

        return target, action

    def create(name: str) -> Attack:
        # Node-b's durable as it is, re-pointed at a filter inside the stream's subjects that
        # matches no Fleet (an update); for a name not taken yet, the same config squats it.
        config = {
            "name": name,
            "filter_subject": f"{p}.fleet.events.added.nothing.here",
            "mem_storage": True,
            "num_replicas": 1,
            "ack_policy": "explicit",
            "ack_wait": 30 * 10**9,
            "max_ack_pending": 256,
            "max_deliver": -1,
            "inactive_threshold": 24 * 3600 * 10**9,
        }
        body = {"stream_name": fleets, "config": config}

        async def action() -> None:
            await world.attacker.request(
                f"$JS.API.CONSUMER.CREATE.{fleets}", json.dumps(body).encode(), timeout=2
            )

        return name, action

    def rollup(bucket: str, own_key: str) -> Attack:
        async def action() -> None:
            await world.attacker.request(
                f"$KV.{bucket}.{own_key}", b"", headers={"Nats-Rollup": "all"}, timeout=2
            )

        return bucket, action

    async def hijack() -> None:
        body = {"name": f"KV_{slots}", "subjects": [f"$KV.{slots}.>", "_INBOX.>"]}
        await world.attacker.request(
            f"$JS.API.STREAM.CREATE.KV_{slots}", json.dumps(body).encode(), timeout=2
        )

    async def purge_slot() -> None:
        key = f"$KV.{slots}.slot.img.{node_token(NODE_B)}"
        await world.attacker.request(
            key, b"", headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"}, timeout=2
        )

    async def forever_slot() -> None:
        await world.attacker.request(f"$KV.{slots}.slot.img.0", b"node-a", timeout=2)

    async def backoff_2099() -> None:
        value = b'{"until": "2099-01-01T00:00:00Z", "node": "node-a"}'
        await world.attacker.request(f"$KV.{slots}.backoff.registry_example", value, timeout=2)

    return {
        "1-reply-into-fleet-added": reply(f"{p}.fleet.events.added.default.forged"),
        "2-reply-into-fleet-deleted": reply(f"{p}.fleet.events.deleted.default.game"),
        "3-reply-into-node-images": reply(f"{p}.nodeimages.agones-sdk"),
        "4-reply-into-other-status": reply(f"$KV.{status}.{nodestatus.node_key(NODE_B)}"),
        "5-reply-into-other-beat": reply(f"$KV.{status}.{nodestatus.beat_key(NODE_B)}"),
        "6-reply-into-other-replay": reply(f"$KV.{status}.{nodestatus.replay_key(NODE_B)}"),
        "7-reply-into-other-pulled": reply(f"$KV.{pulled}.{NODE_B}.forged"),
        "8-reply-into-other-pinned": reply(f"$KV.{pinned}.{NODE_B}.forged"),
        "9-blind-other-durable": create(durable_name(NODE_B)),
        "10-squat-unstarted-durable": create(durable_name(NODE_NEW)),
        "11-rollup-status": rollup(status, nodestatus.node_key(NODE_A)),
        "12-rollup-pulled": rollup(pulled, f"{NODE_A}.own"),
        "13-rollup-pinned": rollup(pinned, f"{NODE_A}.own"),
        "14-hijack-missing-bucket": ("stream create", hijack),
        "15-slot-without-ttl-and-2099-backoff": ("shared keys", _both(forever_slot, backoff_2099)),
        "16-purge-other-slots": ("purge", purge_slot),
    }


def _both(*actions: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[object]]:
    async def action() -> None:
        for one in actions:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await one()

    return action


KNOWN = [
    "1-reply-into-fleet-added",
    "2-reply-into-fleet-deleted",
    "3-reply-into-node-images",
    "4-reply-into-other-status",
    "5-reply-into-other-beat",
    "6-reply-into-other-replay",
    "7-reply-into-other-pulled",
    "8-reply-into-other-pinned",
    "9-blind-other-durable",
    "10-squat-unstarted-durable",
    "11-rollup-status",
    "12-rollup-pulled",
    "13-rollup-pinned",
    "14-hijack-missing-bucket",
    "15-slot-without-ttl-and-2099-backoff",
    "16-purge-other-slots",
]


@pytest.mark.parametrize("case", KNOWN)
async def test_the_attacks_that_got_through_before_change_nothing(world: World, case: str) -> None:
    label, action = _known(world)[case]
    if case == "14-hijack-missing-bucket":
        # The bucket nobody created yet (the pull-slot bucket was missing by default).
        await world.js.delete_stream(f"KV_{bucket_for(SLOTS_BUCKET, world.prefix)}")
    changed = await judge(world, [(f"{case}: {label}", action)], lambda: barrier(world))
    if case == "14-hijack-missing-bucket":
        # Whatever happened, the next test finds the install as the broadcaster makes it.
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await world.js.delete_stream(f"KV_{bucket_for(SLOTS_BUCKET, world.prefix)}")
    assert not changed, "\n".join(changed)
    with pytest.raises(nats.js.errors.NotFoundError):
        await world.js.consumer_info(world.fleets, durable_name(NODE_NEW))


@pytest.mark.parametrize("node", ["a..b", ".a", "a.", "-a", "a_b", "A", "a" * 64, "*", "a.>"])
async def test_a_token_bound_to_a_node_name_that_is_no_dns_subdomain_is_refused(
    inst: Installation, node: str
) -> None:
    token = inst.kube.issue_token(NODE_NS, SYNCER_SA, node=node)
    settings = NatsSettings(
        servers=(inst.server.url,), token_file=inst.token_file(token), connect_timeout=2.0
    )
    with pytest.raises(NatsUnavailable, match="Authorization Violation"):
        await connect(settings, name="bad-node")


def test_node_names_are_dns_subdomains() -> None:
    for bad in ("a..b", ".a", "a.", "-a", "a-", "a_b", "A", "a" * 64, "a." + "b" * 64):
        with pytest.raises(nodestatus.StatusError):
            nodestatus.check_node(bad)
    for good in ("a", "a.b", "node-1.eu-west-1.compute.internal", "a" * 63):
        assert nodestatus.check_node(good) == good


async def test_the_staging_jobs_reader_identity_reads_and_changes_nothing(
    world: World, inst: Installation
) -> None:
    """The callout's reader role (a ServiceAccount listed in --reader-accounts, the staging Job
    of deploy/rollout): what wait and status read works, every API verb it may not send is
    refused by the server and changes nothing."""
    reader = await connect(inst.reader_settings(), name="reader")
    try:
        rjs = reader.jetstream(timeout=5)
        kv = await rjs.key_value(nodestatus.bucket_name(world.prefix))
        async with StatusWatch(kv) as watch:
            # The suite's entries are not status entries a reader decodes: named, not dropped.
            assert {NODE_A, NODE_B} <= set(watch.invalid)
        newest = await newest_event(rjs, world.prefix, "default/game")
        assert newest is not None and "default/game" in newest
        attacker = ReaderAttacker(world.js, reader, world.prefix)
        streams = await stored_subjects(attacker)
        refused = [(s, b) for s, b in api_requests(attacker, streams) if not allowed(attacker, s)]
        capture = concrete(subject_filter(world.prefix, Kind.FLEET))
        attacks = [send(attacker, s, b, reply=capture) for s, b in refused]
        assert len(attacks) > 1000, len(attacks)
        changed = await judge(attacker, attacks, lambda: barrier(attacker))
        assert not changed, "\n".join(changed)

        def all_refused() -> list[str]:
            seen = "\n".join(inst.violations("reader")).lower()
            return [s for s, _ in refused if f'"{s.lower()}"' not in seen]

        await eventually(lambda: not all_refused(), lambda: f"not refused: {all_refused()[:5]}")
    finally:
        await reader.close()
