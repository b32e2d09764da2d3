"""Hostile input against the Fleet-to-images fold, as the syncer's consumer drives it.

A node's desired state is ``DesiredState.apply(decode_event(payload), seq)`` over whatever the
stream delivers: valid events, garbage, wrong types, injection attempts in image strings, other
kinds, duplicates and out-of-order redeliveries. Whatever the sequence, the fold never raises,
every input it refuses comes with a reason, good events after bad ones still count, and the
result equals a model small enough to trust: per Fleet, the event with the highest stream
sequence wins, a delete (or a Fleet with no usable image) means nothing wanted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fleetdicts import fleet

from syncer.folding.desired import DesiredState, Outcome
from syncer.folding.references import ImageRef, normalize
from wire.contract import ContractError, decode_event

VALID_IMAGES = [
    "nginx",
    "nginx:1.27",
    "docker.io/library/nginx:latest",  # the same image as "nginx", spelled out
    "127.0.0.1:5000/game/server:v2",
    "ghcr.io/team/game@sha256:" + "a" * 64,
]
# Strings that try to reach a shell, a path, a log line or a flag parser: never references.
HOSTILE_IMAGES = [
    "nginx; rm -rf /",
    "$(reboot)",
    "`id`",
    "../../etc/passwd",
    "registry.example.com/a/b:tag\nlevel=info msg=FAKE",
    "\x00\x01",
    "a" * 5000,
    "UPPER/Case:Tag",
    "--privileged",
    "a|b && c",
    "http://evil.example/x",
    "nginx ",
]
FLEETS = [("default", "f0"), ("default", "f1"), ("team-a", "f0"), ("team-a", "g.1")]


def _fleet(namespace: str, name: str, images: list[str], kind: str = "Fleet") -> dict[str, Any]:
    return {**fleet(name, *images, namespace=namespace), "kind": kind}


def _gameserver(namespace: str, name: str, images: list[str]) -> dict[str, Any]:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return {
        "kind": "GameServer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": {"spec": {"containers": containers}}},
    }


def _envelope(event_type: str, message: Any) -> bytes:
    return json.dumps(
        {"header": {"headers": {"event_type": event_type}}, "message": message}
    ).encode()


@dataclass(frozen=True)
class Valid:
    """A Fleet event the contract accepts; the model knows what it means."""

    action: str
    key: tuple[str, str]
    images: tuple[str, ...]

    def payload(self) -> bytes:
        obj = _fleet(*self.key, list(self.images))
        if self.action == "updated":
            return _envelope("fleet.events.updated", {"old_obj": obj, "new_obj": obj})
        return _envelope(f"fleet.events.{self.action}", obj)

    def wanted(self) -> frozenset[ImageRef]:
        return frozenset(normalize(i) for i in self.images if i in VALID_IMAGES)


@dataclass(frozen=True)
class Junk:
    """Anything else the stream might carry; ``decodes`` says whether the contract accepts it."""

    data: bytes
    decodes: bool = False


images = st.lists(st.sampled_from(VALID_IMAGES + HOSTILE_IMAGES + [""]), max_size=4)
valid_events = st.builds(
    Valid, st.sampled_from(["added", "updated", "deleted"]), st.sampled_from(FLEETS), images
)


def _mutated(key: tuple[str, str], how: str) -> bytes:
    """A Fleet event made invalid in one way: wrong types, missing parts, wrong kind."""
    obj = _fleet(*key, ["nginx"])
    pod = obj["spec"]["template"]["spec"]["template"]["spec"]
    match how:
        case "image-int":
            pod["containers"][0]["image"] = 42
        case "image-list":
            pod["containers"][0]["image"] = ["nginx"]
        case "containers-object":
            pod["containers"] = {"name": "c", "image": "nginx"}
        case "name-int":
            obj["metadata"]["name"] = 7
        case "name-empty":
            obj["metadata"]["name"] = ""
        case "metadata-string":
            obj["metadata"] = "default/f0"
        case "spec-list":
            obj["spec"] = [1, 2]
        case "kind-mismatch":
            obj["kind"] = "GameServer"
        case "message-null":
            return _envelope("fleet.events.added", None)
        case "update-without-new":
            return _envelope("fleet.events.updated", {"old_obj": obj})
        case "unknown-type":
            return _envelope("fleet.events.exploded", obj)
        case "no-event-type":
            return json.dumps({"header": {"headers": {}}, "message": obj}).encode()
    return _envelope("fleet.events.added", obj)


MUTATIONS = [
    "image-int",
    "image-list",
    "containers-object",
    "name-int",
    "name-empty",
    "metadata-string",
    "spec-list",
    "kind-mismatch",
    "message-null",
    "update-without-new",
    "unknown-type",
    "no-event-type",
]


@st.composite
def junk(draw: st.DrawFn) -> Junk:
    choice = draw(st.sampled_from(["bytes", "truncated", "mutated", "gameserver", "json"]))
    if choice == "bytes":
        return Junk(draw(st.binary(max_size=256)))
    if choice == "truncated":
        full = draw(valid_events).payload()
        return Junk(full[: draw(st.integers(0, len(full) - 1))])
    if choice == "mutated":
        return Junk(_mutated(draw(st.sampled_from(FLEETS)), draw(st.sampled_from(MUTATIONS))))
    if choice == "gameserver":
        # Same namespace/name as a Fleet: a GameServer must never touch the Fleet's state.
        gs = _gameserver(*draw(st.sampled_from(FLEETS)), draw(images))
        return Junk(_envelope("gameserver.events.added", gs), decodes=True)
    value = draw(st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers())))
    return Junk(json.dumps(value).encode())


@st.composite
def deliveries(draw: st.DrawFn) -> list[tuple[int, Valid | Junk]]:
    """The log (sequences 1..n), then delivered at least once each, in any order, with repeats."""
    log = draw(st.lists(st.one_of(valid_events, junk()), min_size=1, max_size=40))
    entries = list(enumerate(log, start=1))
    extra = draw(st.lists(st.sampled_from(entries), max_size=15))
    return draw(st.permutations(entries + extra))


def _model(delivered: list[tuple[int, Valid | Junk]]) -> dict[str, frozenset[ImageRef]]:
    last: dict[tuple[str, str], tuple[int, Valid]] = {}
    for seq, item in delivered:
        if isinstance(item, Valid) and seq >= last.get(item.key, (0, item))[0]:
            last[item.key] = (seq, item)
    return {
        f"{key[0]}/{key[1]}": event.wanted()
        for key, (_, event) in last.items()
        if event.action != "deleted" and event.wanted()
    }


def _fold(state: DesiredState, seq: int, data: bytes) -> list[str]:
    """One delivery as the consumer handles it; returns the reasons of whatever was refused."""
    try:
        event = decode_event(data)
    except ContractError as e:
        return [str(e)]
    applied = state.apply(event, seq)
    reasons = [s.reason for s in applied.skipped]
    assert all(reasons), f"a skipped image without a reason: {applied.skipped}"
    if applied.outcome is Outcome.NOT_A_FLEET:
        reasons.append(f"{event.event_type} is not a Fleet event")
    return reasons


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
def test_fold_equals_last_event_per_fleet_whatever_the_input(
    delivered: list[tuple[int, Valid | Junk]],
) -> None:
    state = DesiredState()
    newest: dict[tuple[str, str], int] = {}
    for seq, item in delivered:
        reasons = _fold(state, seq, item.payload() if isinstance(item, Valid) else item.data)
        if isinstance(item, Junk) and not item.decodes:
            assert reasons and all(reasons), f"junk accepted without a reason: {item.data[:80]!r}"
        if isinstance(item, Junk) and item.decodes:
            assert any("not a Fleet" in r for r in reasons)
        if isinstance(item, Valid):
            # Only an event that is folded (not a delete, not older than one seen) reads images.
            read = item.action != "deleted" and seq >= newest.get(item.key, 0)
            hostile = [i for i in item.images if i in HOSTILE_IMAGES] if read else []
            assert len(reasons) == len(hostile), (item.images, reasons)
            newest[item.key] = max(seq, newest.get(item.key, 0))
    assert state.fleets() == _model(delivered)
    fleet_seqs = [seq for seq, item in delivered if isinstance(item, Valid)]
    assert state.last_seq == max(fleet_seqs, default=0)


@given(st.lists(junk(), min_size=1, max_size=20), st.sampled_from(VALID_IMAGES))
def test_a_valid_event_after_any_garbage_is_applied(garbage: list[Junk], image: str) -> None:
    state = DesiredState()
    for seq, item in enumerate(garbage, start=1):
        _fold(state, seq, item.data)
    assert state.fleets() == {}, "garbage alone must want nothing"
    good = Valid("added", ("default", "after"), (image,))
    assert _fold(state, len(garbage) + 1, good.payload()) == []
    assert state.images_of("default/after") == {normalize(image)}


@given(st.lists(st.sampled_from(HOSTILE_IMAGES), min_size=1, max_size=6))
def test_hostile_image_strings_are_each_refused_with_their_own_reason(hostile: list[str]) -> None:
    state = DesiredState()
    applied = state.apply(decode_event(Valid("added", FLEETS[0], tuple(hostile)).payload()), 1)
    assert applied.outcome is Outcome.NO_IMAGES
    assert [s.image for s in applied.skipped] == hostile
    for skipped in applied.skipped:
        assert skipped.reason and "invalid image reference" in skipped.reason
    assert state.fleets() == {}
