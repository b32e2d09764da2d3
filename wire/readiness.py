"""Is a Fleet ready on a node? The one judgement ``status`` and ``wait`` both make.

A node's entry (:mod:`wire.nodestatus`) says per Fleet which event it was folded from and what is
still missing; the event log says which event is the Fleet's newest (:class:`FleetTarget`, read
by ``image_syncer.fleetlog``). Right after a publish a node's entry may still speak of the
previous version, whose images are all present: so a node is done only once it folded the
target event (or a newer one) and holds the Fleet completely, or excludes it as of that event.

A Fleet may also name next images (``image-syncer.octops.io/next-images``), which nodes fold
into what the Fleet wants: "complete" then means current and next images. A rollout asks about
the next images alone (``wait --next``): :func:`node_readiness` with ``next_only`` judges the
same entry restricted to them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from wire.nodestatus import Missing, MissingState, NodeStatus

__all__ = [
    "FleetProgress",
    "FleetTarget",
    "NodeReadiness",
    "Readiness",
    "fleet_progress",
    "next_progress",
    "node_readiness",
]


class FleetTarget(msgspec.Struct, frozen=True):
    """A live Fleet as the event log has it now: its newest event's sequence and its images.

    ``images`` are normalized the way the syncer normalizes them. ``stream_created`` says which
    incarnation of the stream ``seq`` belongs to (None: unknown).
    """

    seq: int
    images: tuple[str, ...]
    stream_created: datetime | None = None
    # The next images the Fleet names (normalized), a subset of ``images``; empty: none.
    next_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetProgress:
    """How far one node is with one desired Fleet: what a status cell and ``wait`` show."""

    # The event the node folded the Fleet from.
    seq: int
    # Distinct images the Fleet wants on the node.
    total: int
    # Image -> why it is not on the node; empty when the Fleet is ready.
    missing: dict[str, Missing] = field(default_factory=dict)

    @property
    def ready(self) -> int:
        return self.total - len(self.missing)

    @property
    def complete(self) -> bool:
        return not self.missing


def fleet_progress(status: NodeStatus, fleet: str) -> FleetProgress | None:
    """The node's progress on ``fleet``, or None when the node does not want it."""
    summary = status.summary
    seq = summary.fleets.get(fleet)
    if seq is None:
        return None
    gap = summary.gaps.get(fleet)
    if gap is None:
        # Ready; the entry does not say how many images that took, and nobody asks.
        return FleetProgress(seq=seq, total=0)
    pending = Missing(MissingState.PENDING)
    missing = {image: summary.missing.get(image, pending) for image in gap.missing}
    return FleetProgress(seq=seq, total=gap.total, missing=missing)


class Readiness(enum.StrEnum):
    DONE = "done"  # at (or past) the target, every image present
    NOT_TARGETED = "not_targeted"  # at (or past) the target, and the Fleet is not for this node
    BEHIND = "behind"  # has not folded the target event yet (or the Fleet at all)
    MISSING = "missing"  # at (or past) the target, images still missing


@dataclass(frozen=True)
class NodeReadiness:
    verdict: Readiness
    # The node's sequence for the Fleet; None when it reports none (unseen).
    seq: int | None
    # Progress, for MISSING (and DONE); None otherwise.
    progress: FleetProgress | None = None

    @property
    def counts_as_done(self) -> bool:
        return self.verdict in (Readiness.DONE, Readiness.NOT_TARGETED)


def node_readiness(
    status: NodeStatus, fleet: str, target: FleetTarget, *, next_only: bool = False
) -> NodeReadiness:
    """Is ``fleet`` as of ``target`` ready on this node? What a CD pipeline's ``wait`` asks.

    ``next_only`` asks about the target's next images alone: the progress counts them only, and
    the node is done once none of them is missing (its current images may still be coming). A
    node past the target folded a newer version: what it reports for the Fleet is judged,
    since that is what it now holds. A node whose sequences belong to another incarnation of
    the stream than the target's (both known) is behind, whatever the numbers say.
    """
    summary = status.summary
    if _other_stream(summary.log_created, target.stream_created):
        # Its sequences belong to a stream since lost and created again: not comparable.
        return NodeReadiness(Readiness.BEHIND, None)
    excluded_seq = summary.excluded.get(fleet)
    seq = summary.fleets.get(fleet, excluded_seq)
    if seq is None or seq < target.seq:
        return NodeReadiness(Readiness.BEHIND, seq)
    if excluded_seq is not None:
        return NodeReadiness(Readiness.NOT_TARGETED, seq)
    progress = fleet_progress(status, fleet)
    assert progress is not None, "a Fleet with a sequence is desired or excluded"
    if next_only:
        progress = next_progress(progress, target.next_images)
    verdict = Readiness.DONE if progress.complete else Readiness.MISSING
    return NodeReadiness(verdict, seq, progress=progress)


def next_progress(progress: FleetProgress, next_images: tuple[str, ...]) -> FleetProgress:
    """``progress`` restricted to ``next_images``: how far the node is with the next version."""
    wanted = set(next_images)
    missing = {image: why for image, why in progress.missing.items() if image in wanted}
    return FleetProgress(seq=progress.seq, total=len(wanted), missing=missing)


def _other_stream(node: datetime | None, target: datetime | None) -> bool:
    return node is not None and target is not None and node != target
