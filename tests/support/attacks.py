"""The attacks the hostile suites generate, for any attacker (:class:`Attacked`): every
JetStream API verb on every stream and consumer name, every reply subject a stream captures,
every state-changing header. Used on node-a's per-node login (tests/integration/test_hostile_node.py)
and on the static install's read-only ``reader`` (tests/deploy/test_deploy_nats_reader.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js import JetStreamContext

from support.hostile_world import (
    NODE_A,
    NODE_B,
    NODE_NEW,
    Attack,
    Attacked,
    barrier,
    concrete,
    judge,
    matches,
    snapshot,
)
from wire import nodestatus
from wire.contract import Kind, node_images_filter, subject_filter
from wire.eventlog import stream_name
from wire.permissions import (
    IMAGES_CONSUMER_SUFFIX,
    REPLAY_CONSUMER_SUFFIX,
    durable_name,
    inbox_prefix,
    reader_permissions,
)

__all__ = [
    "CONSUMER_NAMES",
    "HEADERS",
    "VERBS",
    "ReaderAttacker",
    "allowed",
    "api_requests",
    "body_for",
    "consumer_filters",
    "reply_subjects",
    "send",
    "stored_subjects",
]

# Every verb of the JetStream API (nats-server 2.15, server/jetstream_api.go), by what follows it:
# "" nothing, "S" a stream, "SC" a stream and a consumer, "SCF" and a filter, "SX" a subject.
VERBS = {
    "INFO": "",
    "STREAM.LIST": "",
    "STREAM.NAMES": "",
    "ACCOUNT.PURGE": "",
    "META.LEADER.STEPDOWN": "",
    "SERVER.REMOVE": "",
    "STREAM.CREATE": "S",
    "STREAM.UPDATE": "S",
    "STREAM.DELETE": "S",
    "STREAM.INFO": "S",
    "STREAM.PURGE": "S",
    "STREAM.MSG.DELETE": "S",
    "STREAM.MSG.GET": "S",
    "STREAM.SNAPSHOT": "S",
    "STREAM.RESTORE": "S",
    "STREAM.LEADER.STEPDOWN": "S",
    "STREAM.PEER.REMOVE": "S",
    "ACCOUNT.STREAM.MOVE": "S",
    "ACCOUNT.STREAM.CANCEL_MOVE": "S",
    "DIRECT.GET": "S",
    "DIRECT.GET.": "SX",
    "CONSUMER.CREATE": "S",
    "CONSUMER.CREATE.": "SC",
    "CONSUMER.CREATE..": "SCF",
    "CONSUMER.DURABLE.CREATE": "SC",
    "CONSUMER.DELETE": "SC",
    "CONSUMER.INFO": "SC",
    "CONSUMER.LIST": "S",
    "CONSUMER.NAMES": "S",
    "CONSUMER.MSG.NEXT": "SC",
    "CONSUMER.LEADER.STEPDOWN": "SC",
    "CONSUMER.PAUSE": "SC",
    "CONSUMER.UNPIN": "SC",
    "CONSUMER.RESET": "SC",
}

# Every durable name, and every push consumer name (``syncer.following``), of node-a, node-b and
# a node that has not started, and one that is nobody's.
CONSUMER_NAMES = (
    *(
        durable_name(node) + suffix
        for node in (NODE_B, NODE_NEW, NODE_A)
        for suffix in ("", IMAGES_CONSUMER_SUFFIX, REPLAY_CONSUMER_SUFFIX)
    ),
    "evil",
)


def consumer_filters(world: Attacked) -> list[str]:
    """Every filter a consumer name's subject may carry: the log's, each push consumer's (node
    images, each node's replay key), and one outside every stream."""
    status = nodestatus.bucket_name(world.prefix)
    return [
        subject_filter(world.prefix, Kind.FLEET),
        node_images_filter(world.prefix),
        *(f"$KV.{status}.{nodestatus.replay_key(n)}" for n in (NODE_A, NODE_B, NODE_NEW)),
        "other.>",
    ]


def body_for(verb: str, stream: str, name: str, capture: str) -> bytes:
    """The most harmful body each verb takes: configs that capture, re-point or blind."""
    consumer = {
        "name": name,
        "durable_name": name,
        "filter_subject": "nothing.matches.this",
        "deliver_subject": capture,
        "ack_policy": "none",
    }
    bodies: dict[str, object] = {
        "STREAM.CREATE": {"name": stream, "subjects": ["_INBOX.>", capture]},
        "STREAM.UPDATE": {"name": stream, "subjects": ["_INBOX.>"], "allow_rollup_hdrs": True},
        "STREAM.PURGE": {},
        "STREAM.MSG.DELETE": {"seq": 1},
        "STREAM.MSG.GET": {"seq": 1},
        "DIRECT.GET": {"seq": 1, "next_by_subj": ">", "batch": 10},
        "CONSUMER.MSG.NEXT": {"batch": 1, "no_wait": True},
        "CONSUMER.PAUSE": {"pause_until": "2099-01-01T00:00:00Z"},
        "CONSUMER.RESET": {"seq": 1},
    }
    if verb.startswith("CONSUMER.CREATE") or verb == "CONSUMER.DURABLE.CREATE":
        return json.dumps({"stream_name": stream, "config": consumer}).encode()
    return json.dumps(bodies.get(verb, {})).encode()


def api_requests(world: Attacked, streams: dict[str, list[str]]) -> list[tuple[str, bytes]]:
    """Every verb on every stream (and consumer name, filter, stored subject): subject, body."""
    capture = concrete(subject_filter(world.prefix, Kind.FLEET))
    found = []
    for verb, shape in VERBS.items():
        base = f"$JS.API.{verb.rstrip('.')}"
        if not shape:
            found.append((base, body_for(verb, "", "", capture)))
            continue
        for stream, subjects in streams.items():
            if shape == "S":
                found.append((f"{base}.{stream}", body_for(verb, stream, "", capture)))
            elif shape == "SX":
                for subject in subjects:
                    found.append((f"{base}.{stream}.{subject}", b""))
            else:
                for name in CONSUMER_NAMES:
                    filters = [""] if shape == "SC" else consumer_filters(world)
                    for flt in filters:
                        tail = f".{flt}" if flt else ""
                        found.append(
                            (f"{base}.{stream}.{name}{tail}", body_for(verb, stream, name, capture))
                        )
    return found


async def stored_subjects(world: Attacked) -> dict[str, list[str]]:
    """Each stream's capture patterns made concrete, plus the subjects it stores now."""
    result: dict[str, list[str]] = {}
    for stream, state in (await snapshot(world)).items():
        config = json.loads(state["config"])
        subjects = [concrete(s) for s in config.get("subjects") or []]
        subjects += sorted({m[1] for m in state["messages"]})
        result[stream] = list(dict.fromkeys(subjects))
    return result


def allowed(world: Attacked, subject: str) -> bool:
    """Whether the attacker's permissions let it send ``subject`` at all."""
    return any(matches(p, subject) for p in world.may_send())


def reply_subjects(world: Attacked, streams: dict[str, list[str]]) -> list[str]:
    """Where an answer must never land: every captured subject, and every API verb."""
    replies = [s for subjects in streams.values() for s in subjects]
    for stream in streams:
        replies += [
            f"$JS.API.STREAM.PURGE.{stream}",
            f"$JS.API.STREAM.DELETE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
        ]
    replies += [
        f"$JS.API.CONSUMER.DELETE.{stream_name(world.prefix, Kind.FLEET)}.{durable_name(NODE_B)}",
        f"$JS.API.CONSUMER.CREATE.{stream_name(world.prefix, Kind.FLEET)}.{durable_name(NODE_NEW)}",
        f"$JS.ACK.{stream_name(world.prefix, Kind.FLEET)}.{durable_name(NODE_B)}.1.1.1.0.0",
        f"{inbox_prefix(durable_name(NODE_B))}.x",
    ]
    return list(dict.fromkeys(replies))


def send(
    world: Attacked,
    subject: str,
    body: bytes,
    reply: str = "",
    headers: dict[str, str] | None = None,
) -> Attack:
    async def action() -> None:
        await world.attacker.publish(subject, body, reply=reply, headers=headers)

    label = f"{subject} reply={reply}" + (f" headers={headers}" if headers else "")
    return label, action


async def judge_replies(
    world: Attacked, requests: list[tuple[str, bytes]], replies: list[str]
) -> tuple[int, list[str]]:
    """Send each request once with each reply subject, judged one request at a time (so a
    failure bisects within one request's batch); how many were sent, and what changed."""
    failures: list[str] = []
    total = 0
    for subject, body in requests:
        batch = [send(world, subject, body, reply=r) for r in replies]
        total += len(batch)
        failures += await judge(world, batch, lambda: barrier(world))
    return total, failures


HEADERS: list[dict[str, str]] = [
    {"Nats-Rollup": "all"},
    {"Nats-Rollup": "sub"},
    {"Nats-Rollup": "all", "KV-Operation": "PURGE"},
    {"KV-Operation": "PURGE"},
    {"KV-Operation": "DEL"},
    {"Nats-Expected-Stream": "AGONES_FLEETS"},
    {"Nats-Expected-Last-Sequence": "0"},
    {"Nats-Expected-Last-Subject-Sequence": "0"},
    {"Nats-Expected-Last-Msg-Id": "x"},
    {"Nats-TTL": "never"},
    {"Nats-TTL": "1s"},
    {"Nats-TTL": "-1"},
    {"Nats-Marker-Reason": "Purge"},
    {"Nats-Marker-Reason": "MaxAge"},
    {"Nats-Marker-Reason": "Remove"},
    {"Nats-Msg-Id": "collide"},
]


@dataclass
class ReaderAttacker:
    """The read-only ``reader`` role as the attacker (static user or the callout's reader): it
    owns nothing, so any change at all is one too many. ``js`` is the operator's view."""

    js: JetStreamContext
    attacker: Client
    prefix: str

    def own(self, stream: str, subject: str) -> bool:
        return False

    def own_consumer(self, name: str) -> bool:
        return False

    def may_send(self) -> tuple[str, ...]:
        return reader_permissions(self.prefix).publish
