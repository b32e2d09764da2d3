"""Hostile input against the envelope decoder: every rejection is a ContractError with a reason.

Whatever arrives on the bus — random bytes, truncated JSON, wrong types, huge payloads, references
that try to smuggle shell or path syntax — the decoder either returns a well-typed Event or raises
ContractError. Nothing else may escape: a stray exception would stop a consumer.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fleetdicts import fleet as fleet_dict

from wire.contract import (
    MAX_EVENT_BYTES,
    ContractError,
    Event,
    decode_event,
    encode_event,
    images_of,
)

EVENT_TYPES = [
    f"{k}.events.{a}" for k in ("fleet", "gameserver") for a in ("added", "updated", "deleted")
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def decode_or_reason(payload: bytes) -> Event | str:
    try:
        event = decode_event(payload)
    except ContractError as e:
        assert str(e), "a rejection must say why"
        return str(e)
    assert isinstance(event, Event)
    images_of(event.obj)  # reading the images of a decoded event never fails either
    return event


@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(payload: bytes) -> None:
    decode_or_reason(payload)


@given(json_values)
def test_random_json_never_crashes(value: object) -> None:
    decode_or_reason(json.dumps(value).encode())


@given(st.sampled_from(EVENT_TYPES), json_values)
def test_random_messages_in_a_valid_envelope_never_crash(event_type: str, message: object) -> None:
    envelope = {"header": {"headers": {"event_type": event_type}}, "message": message}
    decode_or_reason(json.dumps(envelope).encode())


def fleet(images: list[str], name: str = "f") -> dict[str, Any]:
    return fleet_dict(name, *images)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_truncated_valid_events_are_rejected_with_a_reason(data: st.DataObject) -> None:
    payload = encode_event("fleet.events.added", fleet(["nginx:1.27"]))
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    assert isinstance(decode_or_reason(payload[:cut]), str)


@given(
    st.lists(
        st.sampled_from(
            [
                "nginx; rm -rf /",
                "$(reboot)",
                "`id`",
                "../../etc/passwd",
                "registry.example.com/a/b:tag\nFAKE LOG LINE",
                "\x00\x01",
                "a" * 5000,
                "UPPER/Case:Tag",
            ]
        )
        | st.text(max_size=50),
        max_size=5,
    )
)
def test_image_strings_are_carried_verbatim_for_the_reference_parser(images: list[str]) -> None:
    # The contract transports strings as they are; whether they are valid references is the
    # syncer's reference parser's decision (tested there), never the shell's.
    result = decode_or_reason(
        json.dumps(
            {"header": {"headers": {"event_type": "fleet.events.added"}}, "message": fleet(images)}
        ).encode()
    )
    assert isinstance(result, Event)
    assert [image for _, image in images_of(result.obj)] == [i for i in images if i]


def test_huge_payload_is_rejected_by_size_not_by_parsing() -> None:
    huge = fleet(["x" * (MAX_EVENT_BYTES + 10)])
    payload = json.dumps(
        {"header": {"headers": {"event_type": "fleet.events.added"}}, "message": huge}
    )
    reason = decode_or_reason(payload.encode())
    assert isinstance(reason, str) and "exceeds" in reason


def test_deeply_nested_json_is_rejected_not_a_recursion_error() -> None:
    payload = (
        b'{"header":{"headers":{"event_type":"fleet.events.added"}},"message":' + b"[" * 100_000
    )
    assert isinstance(decode_or_reason(payload), str)


def test_valid_event_after_garbage_still_decodes() -> None:
    for garbage in (b"\xff\xfe", b"{}", b"null"):
        assert isinstance(decode_or_reason(garbage), str)
    assert isinstance(decode_or_reason(encode_event("fleet.events.added", fleet(["nginx"]))), Event)
