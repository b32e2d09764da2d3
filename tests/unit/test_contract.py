"""The wire contract: golden envelopes in the Go broadcaster's shape, round trips, errors."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from wire.contract import (
    MAX_EVENT_BYTES,
    Action,
    ContractError,
    EventType,
    Kind,
    NodeImages,
    decode_event,
    decode_node_images,
    decode_subject,
    encode_event,
    encode_node_images,
    event_headers,
    images_of,
    message_id,
    node_images_filter,
    node_images_message_id,
    node_images_subject,
    object_filter,
    subject_filter,
    subject_for,
)

# As the Go agones-event-broadcaster marshals a Fleet from an informer: TypeMeta present,
# managedFields and status included, empty collections as null.
GO_FLEET: dict[str, Any] = {
    "kind": "Fleet",
    "apiVersion": "agones.dev/v1",
    "metadata": {
        "name": "simple-game-server",
        "namespace": "default",
        "uid": "1f2e3d4c-0000-4000-8000-000000000001",
        "resourceVersion": "123456",
        "generation": 2,
        "creationTimestamp": "2026-11-01T10:00:00Z",
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
        "managedFields": [{"manager": "kubectl", "operation": "Update"}],
    },
    "spec": {
        "replicas": 2,
        "allocationOverflow": None,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}},
        "scheduling": "Packed",
        "template": {
            "metadata": {"creationTimestamp": None},
            "spec": {
                "container": "simple-game-server",
                "ports": [{"name": "default", "containerPort": 7654}],
                "health": {},
                "sdkServer": {"logLevel": "Info"},
                "template": {
                    "metadata": {"creationTimestamp": None},
                    "spec": {
                        "containers": [
                            {
                                "name": "simple-game-server",
                                "image": "us-docker.pkg.dev/agones-images/examples/simple-game-server:0.27",
                                "resources": {"limits": {"cpu": "20m", "memory": "64Mi"}},
                            }
                        ],
                        "initContainers": None,
                        "nodeSelector": None,
                        "tolerations": None,
                    },
                },
            },
        },
    },
    "status": {"replicas": 2, "readyReplicas": 2, "allocatedReplicas": 0, "players": None},
}


def go_envelope(event_type: str, message: object) -> bytes:
    return json.dumps(
        {"header": {"headers": {"event_type": event_type}}, "message": message}
    ).encode()


@pytest.mark.parametrize("action", ["added", "deleted"])
def test_go_broadcaster_added_and_deleted_decode(action: str) -> None:
    event = decode_event(go_envelope(f"fleet.events.{action}", GO_FLEET))
    assert event.kind is Kind.FLEET
    assert event.action is Action(action)
    assert event.key == "default/simple-game-server"
    assert event.old is None
    assert images_of(event.obj) == [
        ("simple-game-server", "us-docker.pkg.dev/agones-images/examples/simple-game-server:0.27")
    ]


def test_go_broadcaster_updated_decodes_old_and_new() -> None:
    new = json.loads(json.dumps(GO_FLEET))
    new["metadata"]["resourceVersion"] = "123457"
    new["spec"]["template"]["spec"]["template"]["spec"]["containers"][0]["image"] = "gs:2"
    event = decode_event(go_envelope("fleet.events.updated", {"old_obj": GO_FLEET, "new_obj": new}))
    assert event.action is Action.UPDATED
    assert event.obj.metadata.resource_version == "123457"
    assert images_of(event.obj) == [("simple-game-server", "gs:2")]
    assert event.old is not None and event.old.metadata.resource_version == "123456"


def test_encode_matches_the_go_envelope_shape_and_drops_managed_fields() -> None:
    for event_type in ("fleet.events.added", "fleet.events.deleted"):
        doc = json.loads(encode_event(event_type, GO_FLEET))
        assert doc["header"] == {"headers": {"event_type": event_type}}
        assert "managedFields" not in doc["message"]["metadata"]
        expected = {k: v for k, v in GO_FLEET["metadata"].items() if k != "managedFields"}
        assert doc["message"]["metadata"] == expected
        assert doc["message"]["status"] == GO_FLEET["status"]
    doc = json.loads(encode_event("fleet.events.updated", GO_FLEET, GO_FLEET))
    assert set(doc["message"]) == {"old_obj", "new_obj"}
    assert "managedFields" not in doc["message"]["old_obj"]["metadata"]
    # The caller's object is not modified.
    assert "managedFields" in GO_FLEET["metadata"]


@pytest.mark.parametrize(
    "event_type", ["fleet.events.added", "fleet.events.updated", "fleet.events.deleted"]
)
def test_round_trip(event_type: str) -> None:
    old = GO_FLEET if event_type.endswith("updated") else None
    event = decode_event(encode_event(event_type, GO_FLEET, old))
    assert event.event_type == event_type
    assert event.obj.metadata.uid == GO_FLEET["metadata"]["uid"]
    assert images_of(event.obj) == images_of(
        decode_event(go_envelope("fleet.events.added", GO_FLEET)).obj
    )


def test_every_container_and_init_container_counts() -> None:
    fleet = json.loads(json.dumps(GO_FLEET))
    pod = fleet["spec"]["template"]["spec"]["template"]["spec"]
    pod["containers"] = [{"name": f"c{i}", "image": f"img{i}"} for i in range(3)]
    pod["initContainers"] = [{"name": "init", "image": "init-img"}]
    event = decode_event(go_envelope("fleet.events.added", fleet))
    assert [image for _, image in images_of(event.obj)] == ["init-img", "img0", "img1", "img2"]


def test_gameserver_events_decode() -> None:
    gs = {
        "kind": "GameServer",
        "metadata": {"name": "gs-1", "namespace": "games"},
        "spec": {"template": {"spec": {"containers": [{"name": "gs", "image": "gs:1"}]}}},
    }
    event = decode_event(go_envelope("gameserver.events.added", gs))
    assert event.kind is Kind.GAMESERVER
    assert images_of(event.obj) == [("gs", "gs:1")]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not an event envelope"),
        (b"{", "not an event envelope"),
        (b"[]", "not an event envelope"),
        (b'{"header":{"headers":{}},"message":{}}', "no header.headers.event_type"),
        (
            b'{"header":{"headers":{"event_type":"pod.events.added"}},"message":{}}',
            "unknown event type",
        ),
        (b'{"header":{"headers":{"event_type":"fleet.events.added"}},"message":{}}', "metadata"),
        (
            b'{"header":{"headers":{"event_type":"fleet.events.added"}},"message":{"metadata":{"name":7}}}',
            "at `$.message.metadata.name`",
        ),
        (
            b'{"header":{"headers":{"event_type":"fleet.events.updated"}},"message":{"metadata":{"name":"x"}}}',
            "new_obj",
        ),
        (
            b'{"header":{"headers":{"event_type":"fleet.events.added"}},'
            b'"message":{"kind":"Pod","metadata":{"name":"x"}}}',
            "expected 'Fleet'",
        ),
    ],
)
def test_malformed_events_name_their_cause(payload: bytes, reason: str) -> None:
    with pytest.raises(ContractError, match=None) as raised:
        decode_event(payload)
    assert reason in str(raised.value)


def test_oversized_event_is_refused_before_parsing() -> None:
    with pytest.raises(ContractError, match="exceeds"):
        decode_event(b" " * (1024 * 1024 + 1))


def test_subjects_encode_dots_reversibly() -> None:
    subject = subject_for("agones", "fleet.events.updated", "default", "game.v2.eu")
    assert subject == "agones.fleet.events.updated.default.game_v2_eu"
    assert decode_subject("agones", subject) == ("fleet.events.updated", "default", "game.v2.eu")


@pytest.mark.parametrize("name", ["Bad", "a b", "x*", "x>", "", "a_b"])
def test_subjects_refuse_names_kubernetes_would_refuse(name: str) -> None:
    with pytest.raises(ContractError):
        subject_for("agones", "fleet.events.added", "default", name)


def test_message_id_is_deterministic_and_distinguishes_changes() -> None:
    headers = event_headers("fleet.events.added", GO_FLEET)
    assert headers["Nats-Msg-Id"] == message_id(
        GO_FLEET["metadata"]["uid"], GO_FLEET["metadata"]["resourceVersion"], "fleet.events.added"
    )
    assert headers["Nats-Msg-Id"] == event_headers("fleet.events.added", GO_FLEET)["Nats-Msg-Id"]
    assert headers["Nats-Msg-Id"] != event_headers("fleet.events.deleted", GO_FLEET)["Nats-Msg-Id"]
    assert headers["Agones-Resource-Version"] == "123456"


def test_encode_refuses_what_the_reader_would_refuse() -> None:
    with pytest.raises(ContractError):
        encode_event("fleet.events.added", {"kind": "Fleet", "metadata": {}})


def _fleet_named(name: object) -> dict[str, object]:
    return {"metadata": {"name": name}}


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b'{"header":{"headers":{}},"message":{}}', "envelope has no header.headers.event_type"),
        (go_envelope("fleet.events.added", _fleet_named("")), "$.message.metadata.name is empty"),
        (
            go_envelope("fleet.events.updated", {"metadata": {"name": "x"}}),
            "updated event without new_obj/old_obj: Object missing required field `new_obj` - at `$.message`",
        ),
        (
            go_envelope("fleet.events.updated", {"new_obj": _fleet_named(7)}),
            "invalid Fleet: Expected `str`, got `int` - at `$.message.new_obj.metadata.name`",
        ),
        (
            go_envelope("fleet.events.updated", {"new_obj": {"kind": "Pod", **_fleet_named("x")}}),
            "$.message.new_obj.kind is 'Pod', expected 'Fleet'",
        ),
        (
            go_envelope(
                "fleet.events.updated",
                {"new_obj": _fleet_named("x"), "old_obj": _fleet_named(7)},
            ),
            "invalid Fleet: Expected `str`, got `int` - at `$.message.old_obj.metadata.name`",
        ),
        (
            go_envelope(
                "fleet.events.updated", {"new_obj": _fleet_named("x"), "old_obj": _fleet_named("")}
            ),
            "$.message.old_obj.metadata.name is empty",
        ),
        (
            go_envelope("fleet.events.added", "not an object"),
            "invalid Fleet: Expected `object`, got `str` - at `$.message`",
        ),
        (
            b'{"header":{"headers":{"event_type":"fleet.events.added"}},"message":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            "not an event envelope: JSON nested too deeply",
        ),
    ],
)
def test_decode_errors_are_one_exact_line(payload: bytes, error: str) -> None:
    with pytest.raises(ContractError) as raised:
        decode_event(payload)

    assert str(raised.value) == error


def test_updated_event_without_an_old_object_has_none() -> None:
    event = decode_event(
        go_envelope("fleet.events.updated", {"new_obj": GO_FLEET, "old_obj": None})
    )

    assert event.old is None
    assert event.obj.metadata.name == "simple-game-server"


def test_the_size_limit_is_inclusive() -> None:
    envelope = go_envelope("fleet.events.added", GO_FLEET)
    padded = envelope + b" " * (MAX_EVENT_BYTES - len(envelope))

    assert decode_event(padded).key == "default/simple-game-server"
    with pytest.raises(ContractError) as raised:
        decode_event(padded + b" ")
    assert str(raised.value) == (
        f"event of {MAX_EVENT_BYTES + 1} bytes exceeds the {MAX_EVENT_BYTES} byte limit"
    )


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"kind": "Fleet", "metadata": {"name": ""}}, "$.metadata.name is empty"),
        (
            {"kind": "Fleet", "metadata": None},
            "invalid Fleet: Expected `object`, got `null` - at `$.metadata`",
        ),
        ({"kind": "Fleet"}, "invalid Fleet: Object missing required field `metadata` - at `$`"),
        (
            {"kind": "Fleet", "metadata": ["managedFields"]},
            "invalid Fleet: Expected `object`, got `array` - at `$.metadata`",
        ),
    ],
)
def test_encode_refuses_with_the_readers_reason(obj: dict[str, object], error: str) -> None:
    with pytest.raises(ContractError) as raised:
        encode_event("fleet.events.added", obj)

    assert str(raised.value) == error


def test_names_up_to_253_characters_make_subjects() -> None:
    longest = "a" * 253

    subject = subject_for("agones", "fleet.events.added", longest, longest)

    assert subject == f"agones.fleet.events.added.{longest}.{longest}"
    assert decode_subject("agones", subject) == ("fleet.events.added", longest, longest)
    with pytest.raises(ContractError) as raised:
        subject_for("agones", "fleet.events.added", "default", longest + "a")
    assert str(raised.value) == f"name {longest + 'a'!r} is not a valid Kubernetes name"
    with pytest.raises(ContractError) as raised:
        subject_for("agones", "fleet.events.added", longest + "a", "x")
    assert str(raised.value) == f"namespace {longest + 'a'!r} is not a valid Kubernetes name"


def test_subject_prefix_is_checked_with_a_reason() -> None:
    with pytest.raises(ContractError) as raised:
        subject_for("agones.*", "fleet.events.added", "default", "x")

    assert str(raised.value) == (
        "subject prefix 'agones.*' must be dot-separated [A-Za-z0-9_-] tokens"
    )


def test_decode_subject_needs_the_prefix_itself() -> None:
    # Same length, other prefix: not ours.
    with pytest.raises(ContractError) as raised:
        decode_subject("agones", "agonez.fleet.events.added.default.x")

    assert str(raised.value) == (
        "subject 'agonez.fleet.events.added.default.x' is not "
        "<agones>.<kind>.events.<action>.<namespace>.<name>"
    )
    with pytest.raises(ContractError):
        decode_subject("agones", "agones.fleet.events.added.default")
    with pytest.raises(ContractError):
        decode_subject("agones", "agones.pod.events.added.default.x")


def test_decode_subject_restores_dots_in_namespace_and_name() -> None:
    subject = subject_for("a.b", "gameserver.events.deleted", "team.eu", "gs.1")

    assert subject == "a.b.gameserver.events.deleted.team_eu.gs_1"
    assert decode_subject("a.b", subject) == ("gameserver.events.deleted", "team.eu", "gs.1")


def test_subject_filter_per_kind_and_action() -> None:
    assert subject_filter("agones", Kind.FLEET) == "agones.fleet.events.*.*.*"
    assert subject_filter("a.b", Kind.GAMESERVER, Action.UPDATED) == (
        "a.b.gameserver.events.updated.*.*"
    )
    with pytest.raises(ContractError):
        subject_filter("a..b", Kind.FLEET)


def test_headers_of_an_object_without_uid_or_version_are_empty() -> None:
    headers = event_headers("fleet.events.deleted", {"metadata": {"name": "x"}})

    assert headers == {
        "Nats-Msg-Id": message_id("", "", "fleet.events.deleted"),
        "Agones-Event-Type": "fleet.events.deleted",
        "Agones-Uid": "",
        "Agones-Resource-Version": "",
    }


def test_message_id_is_40_hex_characters_of_sha256() -> None:
    expected = hashlib.sha256(b"uid\x00rv\x00fleet.events.added").hexdigest()[:40]

    assert message_id("uid", "rv", "fleet.events.added") == expected
    assert len(expected) == 40


SDK = NodeImages(
    source="agones-sdk",
    images=["us-docker.pkg.dev/agones-images/release/agones-sdk:1.44.0"],
    origin="agones-system/agones-controller",
    resource_version="812",
)


def test_node_images_round_trip_in_the_documented_shape() -> None:
    data = encode_node_images(SDK)

    assert json.loads(data) == {
        "source": "agones-sdk",
        "images": ["us-docker.pkg.dev/agones-images/release/agones-sdk:1.44.0"],
        "origin": "agones-system/agones-controller",
        "resource_version": "812",
    }
    assert decode_node_images(data) == SDK


def test_node_images_subjects() -> None:
    assert node_images_subject("agones", "agones-sdk") == "agones.nodeimages.agones-sdk"
    assert node_images_filter("a.b") == "a.b.nodeimages.*"
    longest = "s" * 63
    assert node_images_subject("agones", longest) == f"agones.nodeimages.{longest}"
    with pytest.raises(ContractError) as raised:
        node_images_subject("agones", longest + "s")
    assert str(raised.value) == f"node-images source {longest + 's'!r} must be a DNS label"
    for bad_prefix in ("a..b", ""):
        with pytest.raises(ContractError):
            node_images_subject(bad_prefix, "agones-sdk")
        with pytest.raises(ContractError):
            node_images_filter(bad_prefix)


@pytest.mark.parametrize("images", [[""], ["x" * 4097], ["ok:1", ""]])
def test_node_images_refuse_empty_or_huge_references(images: list[str]) -> None:
    with pytest.raises(ContractError) as raised:
        encode_node_images(NodeImages(source="agones-sdk", images=images))

    assert str(raised.value) == "node images must be non-empty references"


def test_node_images_take_references_up_to_4096_characters() -> None:
    longest = NodeImages(source="agones-sdk", images=["x" * 4096])

    assert decode_node_images(encode_node_images(longest)) == longest


def test_node_images_need_a_valid_source_both_ways() -> None:
    with pytest.raises(ContractError) as raised:
        encode_node_images(NodeImages(source="Bad_Source"))
    assert str(raised.value) == "node-images source 'Bad_Source' must be a DNS label"
    with pytest.raises(ContractError) as raised:
        decode_node_images(b'{"source":"Bad_Source"}')
    assert str(raised.value) == "node-images source 'Bad_Source' must be a DNS label"


def test_node_images_decode_errors_are_one_line() -> None:
    with pytest.raises(ContractError) as raised:
        decode_node_images(b'{"images":[]}')
    assert str(raised.value) == (
        "not a node-images message: Object missing required field `source`"
    )
    padded = encode_node_images(SDK)
    padded += b" " * (MAX_EVENT_BYTES - len(padded))
    assert decode_node_images(padded) == SDK
    with pytest.raises(ContractError) as raised:
        decode_node_images(padded + b" ")
    assert str(raised.value) == (
        f"message of {MAX_EVENT_BYTES + 1} bytes exceeds the {MAX_EVENT_BYTES} byte limit"
    )


def test_node_images_message_id_covers_source_version_and_images() -> None:
    text = "agones-sdk\x00812\x00us-docker.pkg.dev/agones-images/release/agones-sdk:1.44.0"

    assert node_images_message_id(SDK) == hashlib.sha256(text.encode()).hexdigest()[:40]


def test_event_types_in_their_wire_form_and_back() -> None:
    updated = EventType(Kind.GAMESERVER, Action.UPDATED)

    assert str(updated) == "gameserver.events.updated"
    assert EventType.parse("gameserver.events.updated") == updated
    assert EventType.of("gameserver.events.updated") == updated
    assert EventType.of(updated) is updated
    for text in ("pod.events.added", "fleet.events.patched", "fleet.events.added.x", ""):
        with pytest.raises(ContractError) as raised:
            EventType.of(text)
        assert str(raised.value) == (
            f"unknown event type {text!r}; expected one of ['fleet.events.added', "
            "'fleet.events.deleted', 'fleet.events.updated', 'gameserver.events.added', "
            "'gameserver.events.deleted', 'gameserver.events.updated']"
        )


def test_object_filter_takes_every_action_of_one_object() -> None:
    assert object_filter("agones", Kind.FLEET, "team.eu", "game.v2") == (
        "agones.fleet.events.*.team_eu.game_v2"
    )
    assert object_filter("a.b", Kind.GAMESERVER, "default", "gs") == (
        "a.b.gameserver.events.*.default.gs"
    )
    with pytest.raises(ContractError) as raised:
        object_filter("agones", Kind.FLEET, "Bad", "x")
    assert str(raised.value) == "namespace 'Bad' is not a valid Kubernetes name"
    with pytest.raises(ContractError) as raised:
        object_filter("agones", Kind.FLEET, "default", "x_y")
    assert str(raised.value) == "name 'x_y' is not a valid Kubernetes name"
    with pytest.raises(ContractError):
        object_filter("a..b", Kind.FLEET, "default", "x")
