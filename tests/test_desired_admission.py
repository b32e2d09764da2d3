"""Admission in the fold: an excluded Fleet is gone for the node, and each change is reported once."""

from __future__ import annotations

from test_desired import event, fleet

from syncer.desired import DesiredState, Outcome, Transition
from syncer.references import normalize
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
    state.apply(event("deleted", fleet("b", "nginx:2")), 3)
    assert state.excluded() == {} and state.reevaluate() == []


def test_replace_with_takes_a_fresh_fold() -> None:
    state = DesiredState()
    state.apply(event("added", fleet("old", "nginx")), 5)
    fresh = DesiredState()
    fresh.apply(event("added", fleet("new", "redis")), 7)
    state.replace_with(fresh)
    assert set(state.fleets()) == {"default/new"} and state.last_seq == 7
