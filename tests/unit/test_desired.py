"""The desired state is the fold of the log: every container counts, bad input is skipped."""

from __future__ import annotations

from support.fleetdicts import fleet
from support.foldevents import event, whole

from syncer.folding.desired import Applied, DesiredState, Outcome, SkippedImage
from syncer.folding.references import normalize


def test_every_container_and_init_container_counts() -> None:
    state = DesiredState()
    applied = state.apply(event("added", fleet("f", "a:1", "b:1", "c:1", init=("d:1",))), 1)
    assert applied.outcome is Outcome.APPLIED
    assert state.images_of("default/f") == {normalize(x) for x in ("a:1", "b:1", "c:1", "d:1")}


def test_update_replaces_and_delete_removes() -> None:
    state = DesiredState()
    state.apply(event("added", fleet("f", "nginx")), 1)
    state.apply(event("updated", fleet("f", "nginx:2")), 2)
    assert state.images_of("default/f") == {normalize("nginx:2")}
    assert state.apply(event("deleted", fleet("f", "nginx:2")), 3).outcome is Outcome.DELETED
    assert state.fleets() == {}


def test_older_event_cannot_roll_back_or_resurrect() -> None:
    state = DesiredState()
    state.apply(event("updated", fleet("f", "app:2")), 5)
    assert state.apply(event("added", fleet("f", "app:1")), 3).outcome is Outcome.STALE
    assert state.images_of("default/f") == {normalize("app:2")}
    state.apply(event("deleted", fleet("f", "app:2")), 6)
    assert state.apply(event("updated", fleet("f", "app:2")), 5).outcome is Outcome.STALE
    assert len(state) == 0
    # The same event seen again (a redelivery) is applied again, harmlessly.
    assert state.apply(event("deleted", fleet("f", "app:2")), 6).outcome is Outcome.DELETED


def test_bad_reference_is_skipped_with_reason_others_kept() -> None:
    state = DesiredState()
    applied = state.apply(event("added", fleet("f", "good:1", "Bad Image")), 1)
    assert applied.outcome is Outcome.APPLIED
    assert applied.images == {normalize("good:1")}
    assert [s.image for s in applied.skipped] == ["Bad Image"]
    assert "invalid image reference" in applied.skipped[0].reason
    assert applied.skipped == (SkippedImage("c1", "Bad Image", applied.skipped[0].reason),)


def test_fleet_without_images_wants_nothing() -> None:
    state = DesiredState()
    state.apply(event("added", fleet("f", "a:1")), 1)
    applied = state.apply(event("updated", fleet("f")), 2)
    assert applied.outcome is Outcome.NO_IMAGES
    assert state.fleets() == {}


def test_gameserver_is_not_a_fleet() -> None:
    gs = {
        "kind": "GameServer",
        "metadata": {"name": "gs"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}},
    }
    state = DesiredState()
    assert state.apply(event("added", gs, kind="gameserver"), 1).outcome is Outcome.NOT_A_FLEET
    assert state.fleets() == {}


def test_by_image_groups_fleets() -> None:
    state = DesiredState()
    state.apply(event("added", fleet("a", "nginx", "redis")), 1)
    state.apply(event("added", fleet("b", "docker.io/library/nginx:latest", namespace="prod")), 2)
    assert state.by_image() == {
        normalize("nginx"): {"default/a", "prod/b"},
        normalize("redis"): {"default/a"},
    }
    assert state.fleets_of(normalize("nginx")) == ["default/a", "prod/b"]


def test_each_outcome_names_its_fleet_and_changes_only_what_it_says() -> None:
    state = DesiredState()
    nginx = frozenset({normalize("nginx:1")})

    added = state.apply(event("added", fleet("f", "nginx:1")), 3)
    assert added == Applied(Outcome.APPLIED, "default/f", nginx, reason="admitted")
    holding = {
        "fleets": {"default/f": nginx},
        "excluded": {},
        "seqs": {"default/f": 3},
        "last_seq": 3,
        "by_image": {normalize("nginx:1"): {"default/f"}},
        "len": 1,
    }
    assert whole(state) == holding

    # A stale event reports what the Fleet still wants, and changes nothing.
    stale = state.apply(event("updated", fleet("f", "nginx:0")), 2)
    assert stale == Applied(Outcome.STALE, "default/f", nginx)
    assert whole(state) == holding

    gs = {"kind": "GameServer", "metadata": {"name": "gs", "namespace": "default"}}
    not_a_fleet = state.apply(event("added", gs, kind="gameserver"), 4)
    assert not_a_fleet == Applied(Outcome.NOT_A_FLEET, "default/gs")
    assert whole(state) == holding

    emptied = state.apply(event("updated", fleet("f")), 5)
    assert emptied == Applied(Outcome.NO_IMAGES, "default/f")
    gone = {"fleets": {}, "excluded": {}, "seqs": {}, "last_seq": 5, "by_image": {}, "len": 0}
    assert whole(state) == gone

    state.apply(event("added", fleet("f", "nginx:1")), 6)
    deleted = state.apply(event("deleted", fleet("f", "nginx:1")), 7)
    assert deleted == Applied(Outcome.DELETED, "default/f")
    assert whole(state) == {**gone, "last_seq": 7}
    # Stale after the delete: the Fleet wants nothing, and stays deleted.
    late = state.apply(event("updated", fleet("f", "nginx:1")), 6)
    assert late == Applied(Outcome.STALE, "default/f", frozenset())
    assert whole(state) == {**gone, "last_seq": 7}


def test_events_without_a_sequence_always_apply_and_record_none() -> None:
    state = DesiredState()
    state.apply(event("added", fleet("f", "app:2")))
    state.apply(event("updated", fleet("f", "app:1")))

    assert whole(state) == {
        "fleets": {"default/f": {normalize("app:1")}},
        "excluded": {},
        "seqs": {},
        "last_seq": 0,
        "by_image": {normalize("app:1"): {"default/f"}},
        "len": 1,
    }


def test_an_unknown_fleet_wants_nothing() -> None:
    state = DesiredState()
    state.apply(event("added", fleet("f", "nginx")), 1)

    assert state.images_of("default/other") == frozenset()
    assert state.fleets_of(normalize("redis")) == []


def test_node_images_are_wanted_like_a_fleets_and_survive_a_rebuild() -> None:
    from syncer.folding.desired import NODE_OWNER
    from syncer.folding.references import normalize

    state = DesiredState()
    sdk = normalize("registry.example/agones-sdk:1.44.0")
    assert state.set_node_images({"agones-sdk": [sdk], "extra": []})
    assert not state.set_node_images({"agones-sdk": [sdk]})  # unchanged
    assert state.by_image() == {sdk: {NODE_OWNER + "agones-sdk"}}
    assert state.fleets_of(sdk) == [NODE_OWNER + "agones-sdk"]
    assert state.fleets() == {} and len(state) == 0
    state.replace_with(DesiredState())
    assert state.node_images() == {"agones-sdk": frozenset({sdk})}
