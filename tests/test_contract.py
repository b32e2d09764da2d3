"""The wire contract: golden envelopes in the Go broadcaster's shape, round trips, errors."""

from __future__ import annotations

import json

import pytest

from wire.contract import (
    Action,
    ContractError,
    Kind,
    decode_event,
    decode_subject,
    encode_event,
    event_headers,
    images_of,
    message_id,
    subject_for,
)

# As the Go agones-event-broadcaster marshals a Fleet from an informer: TypeMeta present,
# managedFields and status included, empty collections as null.
GO_FLEET = {
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
