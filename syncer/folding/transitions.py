"""Folding one event into the desired state, with the log lines that say what it changed.

The replay and the live consumer fold events the same way; only what they do with the outcome
differs (the replay reads on, the live consumer acks or pulls). What is worth a line: a change of
a Fleet's admission on this node, an unusable image reference (of a container or of the
next-images annotation; also counted), a Fleet deleted (live only: a replayed tombstone is old
news), a Fleet with no images, an object that is not a Fleet.
"""

from __future__ import annotations

import logging

from syncer import metrics
from syncer.folding.desired import NEXT_IMAGES_SOURCE, Applied, DesiredState, Outcome, Transition
from wire.contract import Event

__all__ = ["fold", "report_transition"]

log = logging.getLogger(__name__)


def fold(desired: DesiredState, event: Event, seq: int, *, replayed: bool = False) -> Applied:
    """Apply ``event`` (stream sequence ``seq``) to ``desired`` and log what it changed."""
    applied = desired.apply(event, seq)
    if not (replayed and applied.outcome is Outcome.DELETED):
        _report(applied, event)
    return applied


def report_transition(change: Transition) -> None:
    """One line per change of a Fleet's admission on this node."""
    if change.admitted:
        log.info("fleet included", extra={"fleet": change.fleet, "reason": change.reason})
    else:
        log.info(
            "fleet excluded, treated as deleted on this node",
            extra={"fleet": change.fleet, "reason": change.reason},
        )


def _report(applied: Applied, event: Event) -> None:
    if applied.transition is not None:
        report_transition(applied.transition)
    for skipped in applied.skipped:
        source = "next_images" if skipped.container == NEXT_IMAGES_SOURCE else "container"
        metrics.INVALID_IMAGES.labels(source).inc()
        log.warning(
            "invalid image reference",
            extra={
                "fleet": applied.fleet,
                "container": skipped.container,
                "image": skipped.image,
                "reason": skipped.reason,
            },
        )
    if applied.outcome is Outcome.DELETED:
        log.info("fleet deleted", extra={"fleet": applied.fleet})
    elif applied.outcome is Outcome.NO_IMAGES:
        log.warning("fleet has no images", extra={"fleet": applied.fleet})
    elif applied.outcome is Outcome.NOT_A_FLEET:
        log.warning(
            "not a fleet, skipped", extra={"object": applied.fleet, "type": event.event_type}
        )
