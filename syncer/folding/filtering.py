"""Which Fleets this syncer pre-pulls: a per-Fleet opt-out and a Fleet label selector.

Not every Fleet deserves a copy of its images on every node (a test Fleet, a huge tooling image),
and one cluster may run several syncers for different node pools. Two knobs decide:

- the annotation ``image-syncer.octops.io/sync: "false"`` (also ``"0"``, ``"no"``) on a Fleet
  opts it out;
- ``--fleet-selector`` (env ``FLEET_SELECTOR``) keeps only Fleets whose labels match a Kubernetes
  label selector: ``a=b``, ``a==b``, ``a!=b``, ``a in (b,c)``, ``a notin (b,c)``, ``a``, ``!a``,
  comma-separated and ANDed, with the API server's meaning (``!=`` and ``notin`` also match a
  Fleet without the label).

The fold asks :meth:`FleetFilter.admits` on every event; a Fleet that stops being admitted is
treated as deleted for this node, one that starts being admitted as added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from wire.contract import Fleet
from wire.labelselector import LabelSelector, Requirement, SelectorError

__all__ = [
    "SYNC_ANNOTATION",
    "FleetFilter",
    "LabelSelector",
    "Requirement",
    "SelectorError",
    "opted_out",
]

# The grammar lives in the wire layer (the broadcaster reads the same syntax); re-exported here
# because a Fleet filter is where the syncer's readers look for it.

SYNC_ANNOTATION = "image-syncer.octops.io/sync"
_OPT_OUT_VALUES = frozenset({"false", "0", "no"})

# --- The filter the syncer applies ------------------------------------------------------------


def opted_out(annotations: Mapping[str, str] | None) -> bool:
    """True when the Fleet says ``image-syncer.octops.io/sync: "false"`` (or ``"0"``, ``"no"``)."""
    value = (annotations or {}).get(SYNC_ANNOTATION)
    return value is not None and value.strip().lower() in _OPT_OUT_VALUES


@dataclass(frozen=True)
class FleetFilter:
    """The syncer's admission rule for Fleets: not opted out, and matching ``--fleet-selector``."""

    selector: LabelSelector = field(default_factory=LabelSelector)

    @classmethod
    def parse(cls, selector: str | None) -> FleetFilter:
        """From the ``--fleet-selector`` text; raises SelectorError on bad syntax."""
        return cls(LabelSelector.parse(selector or ""))

    def admits(self, fleet: Fleet) -> tuple[bool, str]:
        """(admitted, reason); the reason is a short phrase for the log line."""
        metadata = fleet.metadata
        if opted_out(metadata.annotations):
            value = (metadata.annotations or {})[SYNC_ANNOTATION]
            return False, f"opted out by annotation {SYNC_ANNOTATION}={value!r}"
        if not self.selector.matches(metadata.labels):
            return False, f"labels do not match fleet selector {str(self.selector)!r}"
        return True, "admitted"
