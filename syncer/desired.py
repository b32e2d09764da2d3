"""The node's desired state: the fold of the Fleet event log into Fleet -> images.

Pure data, no I/O, so it is easy to test and cheap to rebuild: the syncer replays the compacted
log into a fresh :class:`DesiredState` on every start. Every init and regular container counts
(the seed read only ``containers[0]`` and panicked on none). What cannot be used (a Fleet with
no images, a bad reference, an object that is not a Fleet) is reported in :class:`Applied` with
its reason, for the caller to log and count; it never raises.

Each Fleet remembers the stream sequence of the event that last set it, so an older event seen
again (a redelivery, a replay overlapping the live consumer) cannot roll a Fleet back.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass, field

from syncer.references import ImageRef, InvalidImageReference, normalize
from wire.contract import Action, Event, Kind, images_of

__all__ = ["Applied", "DesiredState", "Outcome", "SkippedImage"]


class Outcome(enum.StrEnum):
    APPLIED = "applied"  # the Fleet now wants ``Applied.images``
    DELETED = "deleted"  # the Fleet is gone
    STALE = "stale"  # an older event than one already folded: ignored
    NOT_A_FLEET = "not_a_fleet"
    NO_IMAGES = "no_images"  # the Fleet names no usable image: it wants nothing


@dataclass(frozen=True)
class SkippedImage:
    container: str
    image: str
    reason: str


@dataclass(frozen=True)
class Applied:
    """What folding one event did."""

    outcome: Outcome
    fleet: str
    images: frozenset[ImageRef] = frozenset()
    skipped: tuple[SkippedImage, ...] = ()


@dataclass
class DesiredState:
    _fleets: dict[str, frozenset[ImageRef]] = field(default_factory=dict)
    # Last folded sequence per Fleet, kept after a delete so a stale added cannot resurrect it.
    _seqs: dict[str, int] = field(default_factory=dict)
    last_seq: int = 0

    def apply(self, event: Event, seq: int = 0) -> Applied:
        """Fold one event; ``seq`` is its stream sequence (0 when unknown: always applied)."""
        fleet = event.key
        if event.kind is not Kind.FLEET:
            return Applied(Outcome.NOT_A_FLEET, fleet)
        if seq and seq < self._seqs.get(fleet, 0):
            return Applied(Outcome.STALE, fleet, self._fleets.get(fleet, frozenset()))
        if seq:
            self._seqs[fleet] = seq
            self.last_seq = max(self.last_seq, seq)
        if event.action is Action.DELETED:
            self._fleets.pop(fleet, None)
            return Applied(Outcome.DELETED, fleet)
        images, skipped = _images(event)
        if not images:
            self._fleets.pop(fleet, None)
            return Applied(Outcome.NO_IMAGES, fleet, skipped=skipped)
        self._fleets[fleet] = images
        return Applied(Outcome.APPLIED, fleet, images, skipped)

    def fleets(self) -> dict[str, frozenset[ImageRef]]:
        return dict(self._fleets)

    def images_of(self, fleet: str) -> frozenset[ImageRef]:
        return self._fleets.get(fleet, frozenset())

    def by_image(self) -> dict[ImageRef, set[str]]:
        """image -> the Fleets that want it."""
        wanted: dict[ImageRef, set[str]] = defaultdict(set)
        for fleet, images in self._fleets.items():
            for image in images:
                wanted[image].add(fleet)
        return dict(wanted)

    def fleets_of(self, image: ImageRef) -> list[str]:
        return sorted(fleet for fleet, images in self._fleets.items() if image in images)

    def __len__(self) -> int:
        return len(self._fleets)


def _images(event: Event) -> tuple[frozenset[ImageRef], tuple[SkippedImage, ...]]:
    refs: set[ImageRef] = set()
    skipped: list[SkippedImage] = []
    for container, image in images_of(event.obj):
        try:
            refs.add(normalize(image))
        except InvalidImageReference as e:
            skipped.append(SkippedImage(container, image, str(e)))
    return frozenset(refs), tuple(skipped)
