"""How far the cluster is with each Fleet: its live nodes judged against the Fleet's newest event.

The syncers report per node (the status bucket, :mod:`wire.nodestatus`); a platform team asks per
Fleet: "are my images out there?". This folds the one into the other with the judgement ``wait``
makes (:func:`wire.readiness.node_readiness`): a node counts for a Fleet once it folded the
Fleet's newest event. Nodes whose status is stale (no heartbeat within ``stale_after``) are left
out, like ``status`` leaves them out: a node that is gone is not a node that is behind.

A Fleet that names next images (``image-syncer.octops.io/next-images``, staged before a rollout)
is also judged on them alone (``wait --next``'s judgement): ``next_counts`` and ``next_failing``.
Failures of next images are counted there only, so a build not pushed yet does not read as the
running Fleet failing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from nats.js import JetStreamContext

from wire.contract import Action, ContractError, Kind, decode_event, next_images_of
from wire.eventlog import read_log, stream_name
from wire.imagerefs import InvalidImageReference, normalized
from wire.nodestatus import MissingState, NodeStatus, is_stale
from wire.pullfailures import short_error
from wire.readiness import FleetTarget, Readiness, node_readiness

__all__ = ["FleetConvergence", "LoggedFleet", "converge", "newest_events"]


@dataclass(frozen=True)
class LoggedFleet:
    """A live Fleet as the log has it: its newest event and its uid."""

    seq: int
    uid: str
    # Its next images, normalized as nodes report them (bad entries left out, as nodes skip them).
    next_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetConvergence:
    """One Fleet across the live nodes, as of its newest event ``seq``."""

    fleet: str
    uid: str
    seq: int
    counts: Mapping[Readiness, int]
    # (image, short error) -> the nodes whose last pull of that image failed with it.
    failing: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # The same for the Fleet's next images alone; empty counts when it names none.
    next_images: tuple[str, ...] = ()
    next_counts: Mapping[Readiness, int] = field(default_factory=dict)
    next_failing: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    @property
    def targeted(self) -> int:
        """Nodes the Fleet is for (all live nodes but those that exclude it)."""
        return sum(n for verdict, n in self.counts.items() if verdict is not Readiness.NOT_TARGETED)

    @property
    def ready(self) -> int:
        return self.counts.get(Readiness.DONE, 0)

    @property
    def complete(self) -> bool:
        return self.targeted > 0 and self.ready == self.targeted

    @property
    def next_ready(self) -> int:
        return self.next_counts.get(Readiness.DONE, 0)

    @property
    def next_complete(self) -> bool:
        """Every targeted node holds the next images: the Fleet can roll to them."""
        return bool(self.next_images) and self.targeted > 0 and self.next_ready == self.targeted


async def newest_events(js: JetStreamContext, prefix: str) -> dict[str, LoggedFleet]:
    """Every live Fleet (``namespace/name``) with its newest event."""
    newest: dict[str, LoggedFleet | None] = {}
    async for message in read_log(js, stream_name(prefix, Kind.FLEET)):
        try:
            event = decode_event(message.data)
        except ContractError:
            continue  # counted where the log is folded for publishing (catch-up)
        meta = event.obj.metadata
        key = f"{meta.namespace}/{meta.name}"
        deleted = event.action is Action.DELETED
        upcoming = _normalized(next_images_of(event.obj))
        newest[key] = None if deleted else LoggedFleet(message.seq, meta.uid or "", upcoming)
    return {fleet: logged for fleet, logged in newest.items() if logged is not None}


def converge(
    newest: Mapping[str, LoggedFleet],
    statuses: Mapping[str, NodeStatus],
    now: datetime,
    stale_after: float,
) -> dict[str, FleetConvergence]:
    live = {node: s for node, s in statuses.items() if not is_stale(s, now, stale_after)}
    result = {}
    for fleet, logged in newest.items():
        target = FleetTarget(seq=logged.seq, images=(), next_images=logged.next_images)
        upcoming = set(logged.next_images)
        counts: dict[Readiness, int] = defaultdict(int)
        next_counts: dict[Readiness, int] = defaultdict(int)
        failing: dict[tuple[str, str], list[str]] = defaultdict(list)
        next_failing: dict[tuple[str, str], list[str]] = defaultdict(list)
        for node in sorted(live):
            readiness = node_readiness(live[node], fleet, target)
            counts[readiness.verdict] += 1
            if upcoming:
                next_counts[node_readiness(live[node], fleet, target, next_only=True).verdict] += 1
            for image, missing in (
                readiness.progress.missing if readiness.progress else {}
            ).items():
                if missing.state is MissingState.FAILED:
                    into = next_failing if image in upcoming else failing
                    into[(image, short_error(missing.error))].append(node)
        result[fleet] = FleetConvergence(
            fleet,
            logged.uid,
            logged.seq,
            dict(counts),
            {k: tuple(v) for k, v in failing.items()},
            logged.next_images,
            dict(next_counts),
            {k: tuple(v) for k, v in next_failing.items()},
        )
    return result


def _normalized(images: list[str]) -> tuple[str, ...]:
    found = []
    for image in images:
        try:
            found.append(normalized(image))
        except InvalidImageReference:
            continue  # the nodes skip it too, and log why
    return tuple(dict.fromkeys(found))
