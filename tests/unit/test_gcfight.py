"""The removal tracker's arithmetic on a hand-driven clock (the real loop: test_syncer_gc.py)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from syncer.folding.references import ImageRef, normalize
from syncer.keeping.gcfight import RemovalTracker

GAME = normalize("registry.example.com/games/arena:1.0")
OTHER = normalize("registry.example.com/games/lobby:2.0")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> RemovalTracker:
    # rng 1.0: the jitter's top, so delays are the plain doubling.
    return RemovalTracker(
        threshold=3, window=600, backoff_min=60, backoff_max=400, clock=clock, rng=lambda: 1.0
    )


def removed(image: str) -> float:
    value = REGISTRY.get_sample_value(
        "image_syncer_images_removed_externally_total", {"image": image}
    )
    return value or 0.0


def vanish(tracker: RemovalTracker, clock: Clock, image: ImageRef = GAME) -> list[ImageRef]:
    """The image is seen present, then missing one reconcile later."""
    tracker.observe([image], {image})
    clock.now += 10
    return tracker.observe([image], set())


def test_a_single_removal_is_counted_and_re_pulled_at_once(
    tracker: RemovalTracker, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    before = removed(str(GAME))

    assert vanish(tracker, clock) == [GAME]

    assert removed(str(GAME)) == before + 1
    assert tracker.hold_off(GAME) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_repeated_removals_back_off_exponentially_up_to_the_cap_with_one_warning(
    tracker: RemovalTracker, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    vanish(tracker, clock)
    vanish(tracker, clock)
    assert tracker.hold_off(GAME) == 0

    vanish(tracker, clock)
    assert tracker.hold_off(GAME) == 60
    assert tracker.backing_off() == {GAME}
    tracker.pulled(GAME)
    vanish(tracker, clock)
    assert tracker.hold_off(GAME) == 120
    tracker.pulled(GAME)
    vanish(tracker, clock)
    assert tracker.hold_off(GAME) == 240
    tracker.pulled(GAME)
    vanish(tracker, clock)
    assert tracker.hold_off(GAME) == 400

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "kubelet's image garbage collector" in warnings[0].cause  # type: ignore[attr-defined]
    assert warnings[0].image == str(GAME)  # type: ignore[attr-defined]


def test_removals_spread_wider_than_the_window_never_back_off(
    tracker: RemovalTracker, clock: Clock
) -> None:
    for _ in range(5):
        vanish(tracker, clock)
        assert tracker.hold_off(GAME) == 0
        clock.now += 601


def test_a_quiet_window_starts_from_a_clean_slate(tracker: RemovalTracker, clock: Clock) -> None:
    for _ in range(3):
        vanish(tracker, clock)
    assert tracker.hold_off(GAME) > 0

    clock.now += 601
    tracker.observe([GAME], {GAME})

    assert vanish(tracker, clock) == [GAME]
    assert tracker.hold_off(GAME) == 0


def test_images_no_longer_wanted_or_never_held_are_not_counted(
    tracker: RemovalTracker, clock: Clock
) -> None:
    tracker.observe([GAME, OTHER], {GAME})
    clock.now += 10

    # GAME left the desired set (its Fleet was deleted) and OTHER was never here.
    assert tracker.observe([OTHER], set()) == []


def test_a_removed_desire_drops_its_metric_series(tracker: RemovalTracker, clock: Clock) -> None:
    image = normalize("registry.example.com/games/once-only:1.0")
    vanish(tracker, clock, image)
    assert removed(str(image)) == 1

    tracker.observe([], set())

    assert (
        REGISTRY.get_sample_value(
            "image_syncer_images_removed_externally_total", {"image": str(image)}
        )
        is None
    )


def test_a_pull_counts_as_held(tracker: RemovalTracker, clock: Clock) -> None:
    tracker.observe([GAME], set())
    tracker.pulled(GAME)

    assert tracker.observe([GAME], set()) == [GAME]
