"""This node's state as the cluster sees it: the input of the status reporter.

Built from what the syncer already holds in memory (the fold, the last ListImages answer, the
puller's in-flight set, the last failures), so taking one costs no I/O and can run every few
seconds. Images are written in normalized form, and only desired ones: the node's other images
are none of the cluster's business. Each desired or excluded Fleet carries the sequence of the
event it was last folded from, so readers know which version of the Fleet the entry speaks of.
"""

from __future__ import annotations

from syncer.desired import DesiredState
from syncer.puller import Puller
from syncer.reconcile import Reconciler
from wire.nodestatus import NodeState

__all__ = ["node_state"]


def node_state(
    desired: DesiredState, reconciler: Reconciler, puller: Puller, replayed_request: str = ""
) -> NodeState:
    fleets = desired.fleets()
    wanted = {image for images in fleets.values() for image in images}
    pulling = puller.pulling()
    return NodeState(
        desired={fleet: sorted(str(i) for i in images) for fleet, images in fleets.items()},
        present=frozenset(str(i) for i in wanted if reconciler.is_present(i)),
        pulling=frozenset(str(i) for i in wanted if i in pulling),
        failed={str(i): error for i, error in reconciler.failed.items() if i in wanted},
        excluded=frozenset(desired.excluded()),
        last_reconcile=reconciler.last_reconcile,
        replayed_request=replayed_request,
        fleet_seqs=desired.fleet_seqs(),
    )
