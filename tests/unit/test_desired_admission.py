"""Admission in the fold: an excluded Fleet is gone for the node, and each change is reported once."""

from __future__ import annotations

from support.fleetdicts import fleet
from support.foldevents import event, whole

from syncer.folding.desired import Applied, DesiredState, Outcome, Transition
from syncer.folding.references import normalize
from wire.contract import Fleet


def test_excluded_fleet_is_gone_until_admitted_again() -> None:
    allowed = {"default/a"}

    def admit(obj: Fleet) -> tuple[bool, str]:
        key = f"{obj.metadata.namespace}/{obj.metadata.name}"
        return (key in allowed, "ok" if key in allowed else "not on this node")

    state = DesiredState(admit=admit)
    first = state.apply(event("added", fleet("b", "nginx:1")), 1)
    assert first.outcome is Outcome.EXCLUDED
    assert first.transition == Transition("default/b", False, "not on this node")
    assert state.fleets() == {} and state.by_image() == {}
    assert state.excluded() == {"default/b": "not on this node"}
    # Still excluded: no new transition.
    again = state.apply(event("updated", fleet("b", "nginx:2")), 2)
    assert again.outcome is Outcome.EXCLUDED and again.transition is None

    allowed.add("default/b")
    assert state.reevaluate() == [Transition("default/b", True, "ok")]
    assert state.images_of("default/b") == {normalize("nginx:2")}
    assert state.excluded() == {}
    assert state.reevaluate() == []

    allowed.clear()
    changes = state.reevaluate()
    assert [c.fleet for c in changes] == ["default/b"] and not changes[0].admitted
    # Excluded again: gone from everything a reader sees, remembered with its reason.
    assert whole(state) == {
        "fleets": {},
        "excluded": {"default/b": "not on this node"},
        "seqs": {"default/b": 2},
        "last_seq": 2,
        "by_image": {},
        "len": 0,
    }
    state.apply(event("deleted", fleet("b", "nginx:2")), 3)
    assert state.excluded() == {} and state.reevaluate() == []


def test_replace_with_takes_a_fresh_fold() -> None:
    state = DesiredState()
    state.apply(event("added", fleet("old", "nginx")), 5)
    fresh = DesiredState()
    fresh.apply(event("added", fleet("new", "redis")), 7)
    state.replace_with(fresh)
    assert set(state.fleets()) == {"default/new"} and state.last_seq == 7


def test_applied_says_what_admission_decided() -> None:
    verdict = (False, "not on this node")
    state = DesiredState(admit=lambda _: verdict)
    nginx = frozenset({normalize("nginx:1")})

    excluded = state.apply(event("added", fleet("a", "nginx:1", "Bad Image")), 1)
    assert excluded == Applied(
        Outcome.EXCLUDED,
        "default/a",
        nginx,
        excluded.skipped,
        "not on this node",
        Transition("default/a", False, "not on this node"),
    )
    assert [s.image for s in excluded.skipped] == ["Bad Image"]

    verdict = (True, "labels match")
    admitted = state.apply(event("updated", fleet("a", "nginx:1")), 2)
    assert admitted == Applied(
        Outcome.APPLIED,
        "default/a",
        nginx,
        (),
        "labels match",
        Transition("default/a", True, "labels match"),
    )


def test_replace_with_takes_everything_of_the_fresh_fold() -> None:
    allowed = {"default/in"}

    def admit(obj: Fleet) -> tuple[bool, str]:
        ok = f"{obj.metadata.namespace}/{obj.metadata.name}" in allowed
        return ok, "ok" if ok else "no"

    state = DesiredState(admit=admit)
    state.apply(event("added", fleet("old", "nginx")), 5)
    fresh = DesiredState(admit=admit)
    fresh.apply(event("added", fleet("in", "redis")), 7)
    fresh.apply(event("added", fleet("out", "memcached")), 8)

    state.replace_with(fresh)

    assert whole(state) == whole(fresh)
    assert state.excluded() == {"default/out": "no"}
    assert state.fleet_seqs() == {"default/in": 7, "default/out": 8}
    # The excluded Fleet's object came along: it can be admitted without a new event.
    allowed.add("default/out")
    assert state.reevaluate() == [Transition("default/out", True, "ok")]
    assert state.images_of("default/out") == {normalize("memcached")}
    # And the sequences did: an older event of it is stale.
    assert state.apply(event("updated", fleet("out", "x")), 6).outcome is Outcome.STALE


def test_without_kept_objects_fleets_are_judged_once_per_event() -> None:
    allowed: set[str] = set()

    def admit(obj: Fleet) -> tuple[bool, str]:
        ok = f"{obj.metadata.namespace}/{obj.metadata.name}" in allowed
        return ok, "ok" if ok else "no"

    state = DesiredState(admit=admit, keep_objects=False)
    state.apply(event("added", fleet("a", "nginx")), 1)
    fresh = DesiredState(admit=admit)
    fresh.apply(event("added", fleet("b", "redis")), 2)
    state.replace_with(fresh)
    excluded_b = whole(state)
    assert excluded_b["excluded"] == {"default/b": "no"}

    # Nothing kept to judge again: the node's change waits for the Fleet's next event.
    allowed.add("default/b")
    assert state.reevaluate() == []
    assert whole(state) == excluded_b
    assert state.apply(event("updated", fleet("b", "redis")), 3).transition == Transition(
        "default/b", True, "ok"
    )
    assert state.images_of("default/b") == {normalize("redis")}
