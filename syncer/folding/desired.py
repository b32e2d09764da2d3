"""The node's desired state: the fold of the Fleet event log into Fleet -> images.

Pure data, no I/O, so it is easy to test and cheap to rebuild: the syncer replays the compacted
log into a fresh :class:`DesiredState` on every start. Every init and regular container counts
(Octops image-syncer (Go) read only ``containers[0]`` and panicked on none). What cannot be used
(a Fleet with no images, a bad reference, an object that is not a Fleet) is reported in
:class:`Applied` with its reason, for the caller to log and count; it never raises.

A Fleet's next images (the annotation ``image-syncer.octops.io/next-images``, staged before a
rollout) are part of what it wants here, exactly like its template's: admitted, pulled, counted
by the gate, pinned and kept with the rest.

Each Fleet remembers the stream sequence of the event that last set it, so an older event seen
again (a redelivery, a replay overlapping the live consumer) cannot roll a Fleet back.

Admission. Not every Fleet is for this node: an opted-out Fleet, one outside ``--fleet-selector``,
one whose game servers cannot be scheduled here (``--respect-scheduling``). The ``admit`` rule
decides on every event, and again on :meth:`DesiredState.reevaluate` when the rule's inputs (the
node's labels and taints) change. A Fleet not admitted is *excluded*: kept, with its reason, so it
can come back without a new event, but treated as gone everywhere else (no pulls, removable).
Every change of admission is reported once as a :class:`Transition`.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from syncer.folding.references import ImageRef, InvalidImageReference, normalize
from wire.contract import (
    NEXT_IMAGES_ANNOTATION,
    Action,
    Event,
    Fleet,
    Kind,
    images_of,
    next_images_of,
)

__all__ = [
    "NEXT_IMAGES_SOURCE",
    "NODE_OWNER",
    "Admit",
    "Applied",
    "DesiredState",
    "Outcome",
    "SkippedImage",
    "Transition",
    "admit_all",
]

# Owner prefix of node-wide images in by_image(): never a Fleet key (Kubernetes names have no @).
NODE_OWNER = "@node/"

# What a skipped image names as its container when it came from the next-images annotation.
NEXT_IMAGES_SOURCE = f"annotation {NEXT_IMAGES_ANNOTATION}"

# (admitted, reason): the reason is a short phrase for the log line and the node status.
Admit = Callable[[Fleet], tuple[bool, str]]


def admit_all(_: Fleet) -> tuple[bool, str]:
    return True, "admitted"


class Outcome(enum.StrEnum):
    APPLIED = "applied"  # the Fleet now wants ``Applied.images``
    DELETED = "deleted"  # the Fleet is gone
    STALE = "stale"  # an older event than one already folded: ignored
    NOT_A_FLEET = "not_a_fleet"
    NO_IMAGES = "no_images"  # the Fleet names no usable image: it wants nothing
    EXCLUDED = "excluded"  # the Fleet is not for this node (``Applied.reason``): as if gone


@dataclass(frozen=True)
class SkippedImage:
    container: str
    image: str
    reason: str


@dataclass(frozen=True)
class Transition:
    """A Fleet's admission changed: ``admitted`` is the new verdict, ``reason`` says why."""

    fleet: str
    admitted: bool
    reason: str


@dataclass(frozen=True)
class Applied:
    """What folding one event did."""

    outcome: Outcome
    fleet: str
    images: frozenset[ImageRef] = frozenset()
    skipped: tuple[SkippedImage, ...] = ()
    reason: str = ""
    transition: Transition | None = None


@dataclass
class DesiredState:
    admit: Admit = admit_all
    # Keep each Fleet's object, to judge it again when the node changes (``reevaluate``). Only
    # a rule that depends on the node needs that; without one a Fleet is judged once per event,
    # and not keeping a thousand Fleet objects saves the syncer megabytes.
    keep_objects: bool = True
    _fleets: dict[str, frozenset[ImageRef]] = field(default_factory=dict)
    # Excluded Fleets: their images and the reason (their object, when kept, is in _objects).
    _excluded: dict[str, tuple[frozenset[ImageRef], str]] = field(default_factory=dict)
    _objects: dict[str, Fleet] = field(default_factory=dict)
    # Last folded sequence per Fleet, kept after a delete so a stale added cannot resurrect it.
    _seqs: dict[str, int] = field(default_factory=dict)
    last_seq: int = 0
    # Images every node keeps besides the Fleets' (syncer.node.nodeimages), by source. Not from the
    # log: a replay keeps them. They are wanted like a Fleet's, owned by ``@node/<source>``.
    _node: dict[str, frozenset[ImageRef]] = field(default_factory=dict)

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
            self._forget(fleet)
            return Applied(Outcome.DELETED, fleet)
        images, skipped = _images(event)
        if not images:
            self._forget(fleet)
            return Applied(Outcome.NO_IMAGES, fleet, skipped=skipped)
        assert isinstance(event.obj, Fleet)
        return self._place(fleet, event.obj, images, skipped)

    def _forget(self, fleet: str) -> None:
        self._fleets.pop(fleet, None)
        self._excluded.pop(fleet, None)
        self._objects.pop(fleet, None)

    def _place(
        self,
        fleet: str,
        obj: Fleet,
        images: frozenset[ImageRef],
        skipped: tuple[SkippedImage, ...] = (),
    ) -> Applied:
        was_excluded = fleet in self._excluded
        admitted, reason = self.admit(obj)
        if self.keep_objects:
            self._objects[fleet] = obj
        if admitted:
            self._excluded.pop(fleet, None)
            self._fleets[fleet] = images
            change = Transition(fleet, True, reason) if was_excluded else None
            return Applied(Outcome.APPLIED, fleet, images, skipped, reason, change)
        self._fleets.pop(fleet, None)
        self._excluded[fleet] = (images, reason)
        # A new Fleet excluded from the start is a transition too: one line says why.
        change = None if was_excluded else Transition(fleet, False, reason)
        return Applied(Outcome.EXCLUDED, fleet, images, skipped, reason, change)

    def reevaluate(self) -> list[Transition]:
        """Judge every known Fleet again (the rule's inputs changed); return what changed."""
        changes = []
        for fleet, obj in sorted(self._objects.items()):
            images = self._fleets.get(fleet) or self._excluded[fleet][0]
            applied = self._place(fleet, obj, images)
            if applied.transition is not None:
                changes.append(applied.transition)
        return changes

    def excluded(self) -> dict[str, str]:
        """Fleets known here but not for this node -> why."""
        return {fleet: reason for fleet, (_, reason) in self._excluded.items()}

    def fleet_seqs(self) -> dict[str, int]:
        """Desired and excluded Fleets -> the stream sequence of the last event folded for each.

        Fleets folded without a sequence (``apply(event)`` alone) are left out.
        """
        known = (*self._fleets, *self._excluded)
        return {fleet: self._seqs[fleet] for fleet in known if fleet in self._seqs}

    def replace_with(self, other: DesiredState) -> None:
        """Take ``other``'s content (a fresh fold of the whole log) in place."""
        self._fleets = other._fleets
        self._excluded = other._excluded
        self._objects = other._objects if self.keep_objects else {}
        self._seqs = other._seqs
        self.last_seq = other.last_seq

    def fleets(self) -> dict[str, frozenset[ImageRef]]:
        return dict(self._fleets)

    def set_node_images(self, by_source: Mapping[str, Iterable[ImageRef]]) -> bool:
        """Replace the node-wide images (sidecar, ``--extra-image``); True if they changed."""
        new = {source: frozenset(images) for source, images in by_source.items() if images}
        if new == self._node:
            return False
        self._node = new
        return True

    def node_images(self) -> dict[str, frozenset[ImageRef]]:
        return dict(self._node)

    def _owners(self) -> Iterator[tuple[str, frozenset[ImageRef]]]:
        yield from self._fleets.items()
        for source, images in self._node.items():
            yield NODE_OWNER + source, images

    def images_of(self, fleet: str) -> frozenset[ImageRef]:
        return self._fleets.get(fleet, frozenset())

    def by_image(self) -> dict[ImageRef, set[str]]:
        """image -> the Fleets (and node-wide sources, ``@node/<source>``) that want it.

        Everything that keeps images on the node goes by this: the reconcile re-pulls them,
        ``--remove-unused`` never removes them.
        """
        wanted: dict[ImageRef, set[str]] = defaultdict(set)
        for owner, images in self._owners():
            for image in images:
                wanted[image].add(owner)
        return dict(wanted)

    def fleets_of(self, image: ImageRef) -> list[str]:
        return sorted(owner for owner, images in self._owners() if image in images)

    def __len__(self) -> int:
        return len(self._fleets)


def _images(event: Event) -> tuple[frozenset[ImageRef], tuple[SkippedImage, ...]]:
    """The template's images and the next images staged for the Fleet, as one set.

    The next images are wanted exactly as the template's are (same admission, pull, gate, pins,
    never removed), so a rolling update to them finds them on the node. A bad entry of the
    annotation is skipped like a bad container image: the rest of the Fleet is still pulled.
    """
    refs: set[ImageRef] = set()
    skipped: list[SkippedImage] = []
    named = [
        *images_of(event.obj),
        *((NEXT_IMAGES_SOURCE, image) for image in next_images_of(event.obj)),
    ]
    for container, image in named:
        try:
            refs.add(normalize(image))
        except InvalidImageReference as e:
            skipped.append(SkippedImage(container, image, str(e)))
    return frozenset(refs), tuple(skipped)
