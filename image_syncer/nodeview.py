"""The cluster's nodes rolled up the way a person asks about them: per Fleet and per node.

``image-syncer status`` shows, by default, per Fleet how many nodes are ready and which are not
and why, and per node how many of its Fleets are ready, its heartbeat and its problems. Thousands
of nodes times hundreds of Fleets do not fit a nodes x Fleets matrix, so that one is only drawn
on request. This module computes the rollups (plain data, also the ``--json`` document); the
command renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from image_syncer.problems import natural_key
from wire.nodestatus import Missing, MissingState, NodeStatus, is_stale
from wire.readiness import FleetProgress, FleetTarget, Readiness, fleet_progress, node_readiness

__all__ = [
    "FleetRollup",
    "NodeRollup",
    "describe_missing",
    "describe_progress",
    "fleet_rollups",
    "next_rollup",
    "node_rollups",
]

_WHY = {
    MissingState.PULLING: "pulling",
    MissingState.WAITING_SLOT: "waiting for a cluster pull slot",
    MissingState.WAITING_SEED: "waiting for a seed",
    MissingState.PENDING: "pending",
    MissingState.FAILED: "failed",
}


# A failed image is retried: the node reports it failed between retries, pulling (or waiting for
# a slot) during one, and keeps the last error in both. Read at any moment it is the same image
# that cannot be pulled, so it reads "failed" with the error either way, plus what happens now.
_RETRY = {
    MissingState.PULLING: "failed, pulling again",
    MissingState.WAITING_SLOT: "failed, waiting for a cluster pull slot to retry",
    MissingState.WAITING_SEED: "failed, waiting for a seed to retry",
}


def describe_missing(image: str, why: Missing) -> str:
    """``image (failed: 401 Unauthorized)``: one missing image and why, for a person."""
    reason = _WHY.get(why.state, str(why.state))
    if why.error and why.state is MissingState.FAILED:
        reason = f"{reason}: {why.error}"
    elif why.error and why.state in _RETRY:
        reason = f"{_RETRY[why.state]}: {why.error}"
    elif why.error:
        # Pending with a reason is not an error: why the node holds the pull back (disk
        # budget, image GC backoff).
        reason = f"held back: {why.error}"
    return f"{image} ({reason})"


def describe_progress(progress: FleetProgress) -> str:
    missing = ", ".join(describe_missing(i, w) for i, w in sorted(progress.missing.items()))
    return f"{progress.ready}/{progress.total} images; missing {missing}"


@dataclass
class FleetRollup:
    """One Fleet across the live nodes that want it (or, with the log, should have seen it)."""

    fleet: str
    ready: list[str] = field(default_factory=list)
    # Node -> why it is not ready, one line.
    not_ready: dict[str, str] = field(default_factory=dict)
    target: FleetTarget | None = None
    # What the not-ready nodes miss: (node, image, why), why None for a node behind the log;
    # what ``image_syncer.problems`` groups.
    missing: list[tuple[str, str, Missing | None]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.ready) + len(self.not_ready)


@dataclass
class NodeRollup:
    node: str
    status: NodeStatus
    stale: bool
    fleets_ready: int = 0
    fleets_total: int = 0
    # One short line per problem: missing images by reason, Fleets behind the log.
    problems: list[str] = field(default_factory=list)
    # Every Fleet it knows excludes it (a selector or scheduling that matches nothing?).
    excludes_all: bool = False

    @property
    def healthy(self) -> bool:
        return not self.stale and not self.problems and self.fleets_ready == self.fleets_total


def _behind(status: NodeStatus, fleet: str, target: FleetTarget | None) -> str | None:
    if target is None:
        return None
    readiness = node_readiness(status, fleet, target)
    if readiness.verdict is not Readiness.BEHIND:
        return None
    if readiness.seq is None:
        return f"behind: has not folded the Fleet (log at seq {target.seq})"
    return f"behind: seq {readiness.seq} < {target.seq}"


def fleet_rollups(
    view: dict[str, NodeStatus],
    now: datetime,
    stale_after: float,
    targets: dict[str, FleetTarget] | None = None,
) -> dict[str, FleetRollup]:
    """Per Fleet: the live nodes ready and not ready (stale nodes are counted nowhere).

    Judges as :func:`wire.readiness.node_readiness` does, written for thousands of nodes times
    hundreds of Fleets: a ready Fleet costs a dict lookup and an append.
    """
    targets = targets or {}
    rollups = {fleet: FleetRollup(fleet, target=target) for fleet, target in targets.items()}

    def rollup(fleet: str) -> FleetRollup:
        found = rollups.get(fleet)
        if found is None:
            found = rollups[fleet] = FleetRollup(fleet)
        return found

    for node, status in sorted(view.items(), key=lambda item: natural_key(item[0])):
        if is_stale(status, now, stale_after):
            continue
        summary = status.summary
        gaps = summary.gaps
        for fleet, seq in summary.fleets.items():
            target = targets.get(fleet) if targets else None
            if target is not None and seq < target.seq:
                rollup(fleet).not_ready[node] = f"behind: seq {seq} < {target.seq}"
                rollup(fleet).missing.append((node, "", None))
            elif fleet in gaps:
                progress = fleet_progress(status, fleet)
                assert progress is not None, "a Fleet with a gap is desired"
                rollup(fleet).not_ready[node] = describe_progress(progress)
                rollup(fleet).missing.extend((node, i, w) for i, w in progress.missing.items())
            else:
                rollup(fleet).ready.append(node)
        for fleet, target in targets.items():
            if fleet not in summary.fleets:
                behind = _behind(status, fleet, target)
                if behind is not None:  # else: excluded as of the target, not for this node
                    rollups[fleet].not_ready[node] = behind
                    rollups[fleet].missing.append((node, "", None))
    return dict(sorted(rollups.items(), key=lambda item: natural_key(item[0])))


def next_rollup(
    view: dict[str, NodeStatus], fleet: str, target: FleetTarget, now: datetime, stale_after: float
) -> FleetRollup:
    """``fleet``'s next images alone across the live nodes it targets (``wait --next``'s view)."""
    rollup = FleetRollup(fleet, target=target)
    for node, status in sorted(view.items()):
        if is_stale(status, now, stale_after):
            continue
        readiness = node_readiness(status, fleet, target, next_only=True)
        if readiness.verdict is Readiness.DONE:
            rollup.ready.append(node)
        elif readiness.verdict is Readiness.BEHIND:
            rollup.not_ready[node] = _behind(status, fleet, target) or "behind"
        elif readiness.progress is not None:  # MISSING
            rollup.not_ready[node] = describe_progress(readiness.progress)
    return rollup


def node_rollups(
    view: dict[str, NodeStatus],
    now: datetime,
    stale_after: float,
    targets: dict[str, FleetTarget] | None = None,
) -> dict[str, NodeRollup]:
    """Per node: its Fleets ready/total, and its problems in a few words each."""
    targets = targets or {}
    rollups = {}
    for node, status in sorted(view.items(), key=lambda item: natural_key(item[0])):
        summary = status.summary
        rollup = NodeRollup(node, status, is_stale(status, now, stale_after))
        if summary.excluded and not summary.fleets:
            rollup.excludes_all = True
            rollup.problems.append(f"wants no Fleet: all {len(summary.excluded)} excluded")
        rollup.fleets_total = len(summary.fleets)
        rollup.fleets_ready = rollup.fleets_total - len(summary.gaps)
        counts: dict[MissingState, int] = {}
        for why in summary.missing.values():
            counts[why.state] = counts.get(why.state, 0) + 1
        for state in (
            MissingState.FAILED,
            MissingState.WAITING_SLOT,
            MissingState.WAITING_SEED,
            MissingState.PULLING,
        ):
            if counts.get(state):
                rollup.problems.append(f"{counts[state]} {_WHY[state]}")
        if counts.get(MissingState.PENDING):
            rollup.problems.append(f"{counts[MissingState.PENDING]} pending")
        behind = [f for f, t in targets.items() if _behind(status, f, t) is not None]
        if behind:
            rollup.problems.append(f"behind the log on {len(behind)} Fleets")
        budget = summary.budget
        if budget is not None and budget.backoff_until is not None and budget.backoff_until > now:
            rollup.problems.append("registry rate limit: cluster pulls held back")
        disk = summary.disk
        if disk is not None and disk.paused:
            usage = f" {disk.usage:.0%}" if disk.usage is not None else ""
            rollup.problems.append(f"disk{usage} full: pulls paused")
        if disk is not None and disk.gc_backoff:
            rollup.problems.append(f"{len(disk.gc_backoff)} removed repeatedly (image GC?)")
        if summary.gate is not None and summary.gate.state == "closed":
            rollup.problems.append("startup taint kept: images missing")
        rollups[node] = rollup
    return rollups
