"""This node's state as the cluster sees it: the input of the status reporter.

Built from what the syncer already holds in memory (the fold, and the node's inventory: the last
ListImages answer, the pulls in flight, the last failures), so taking one costs no I/O and can
run every few seconds. It is the compact form of :func:`wire.nodestatus.summarize`: per Fleet the
sequence of the event it was folded from, and image strings only for what is missing, with why.
"""

from __future__ import annotations

from datetime import datetime

from syncer.folding.desired import DesiredState
from syncer.keeping.keeper import Keeper
from syncer.pulling.inventory import Inventory
from syncer.pulling.pullbudget import PullBudget
from syncer.pulling.seeding import Seeding
from wire.nodestatus import BudgetSummary, GateStatus, NodeState, summarize

__all__ = ["node_state"]


def node_state(
    desired: DesiredState,
    inventory: Inventory,
    *,
    last_reconcile: datetime | None = None,
    replayed_request: str = "",
    budget: PullBudget | None = None,
    keeper: Keeper | None = None,
    gate: GateStatus | None = None,
    log_created: datetime | None = None,
    seeding: Seeding | None = None,
) -> NodeState:
    fleets = desired.fleets()
    node_images = desired.node_images()
    wanted = {image for images in (*fleets.values(), *node_images.values()) for image in images}
    missing = {image for image in wanted if not inventory.is_present(image)}
    # A pull waiting for a cluster slot is in flight for the puller, but not pulling yet.
    waiting = budget.waiting() if budget is not None else frozenset()
    # As is one waiting for a seed to fetch it from the registry first.
    seed_waiting = seeding.waiting() if seeding is not None else frozenset()
    pulling = inventory.pulling() - waiting - seed_waiting
    summary = None
    if budget is not None:
        summary = BudgetSummary(
            waiting=tuple(sorted(str(i) for i in waiting)), backoff_until=budget.backoff_until
        )
    return summarize(
        desired={fleet: [str(i) for i in images] for fleet, images in fleets.items()},
        present={str(i) for i in wanted - missing},
        fleet_seqs=desired.fleet_seqs(),
        excluded=desired.excluded(),
        pulling={str(i) for i in missing if i in pulling},
        waiting_slot={str(i) for i in missing if i in waiting},
        waiting_seed={str(i) for i in missing if i in seed_waiting},
        failed={str(i): error for i, error in inventory.failed.items() if i in missing},
        held=keeper.held(missing - pulling) if keeper is not None else None,
        last_reconcile=last_reconcile,
        replayed_request=replayed_request,
        log_created=log_created,
        budget=summary,
        pins=keeper.pin_summary(wanted - missing) if keeper is not None else None,
        disk=keeper.disk_summary() if keeper is not None else None,
        node_images={
            source: sorted(str(i) for i in images) for source, images in node_images.items()
        },
        gate=gate,
    )
