"""What is wrong across the cluster, grouped the way an operator fixes it: by image and reason.

Two broken Fleets on a thousand nodes are two problems, not two thousand lines: every node that
cannot pull ``registry.example/game:v2`` because the tag does not exist says the same thing in
the runtime's words (the image reference four times in 250 characters). So ``status`` and
``wait`` group what the nodes report by (image, short reason) and show each group once, with how
many nodes and a few of their names; the full text stays in ``status --node`` and ``--json``.
Names sort naturally (``fleet-3`` before ``fleet-12``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from wire.nodestatus import Missing, MissingState
from wire.pullfailures import PullFailure, classify

__all__ = [
    "ProblemGroup",
    "group_problems",
    "name_some",
    "natural_key",
    "short_reason",
]

# A failure class in the words an operator uses.
_FAILURE_WORDS = {
    PullFailure.NOT_FOUND: "not found",
    PullFailure.AUTH: "unauthorized",
    PullFailure.RATE_LIMITED: "rate limited",
    PullFailure.REGISTRY_UNREACHABLE: "unreachable",
    PullFailure.DISK_FULL: "disk full",
    PullFailure.TIMEOUT: "timeout",
    PullFailure.RUNTIME_UNAVAILABLE: "runtime down",
    PullFailure.OTHER: "failed",
}
_IN_PROGRESS = {
    MissingState.PULLING: "pulling",
    MissingState.WAITING_SLOT: "waiting for a pull slot",
    MissingState.PENDING: "pending",
}
# Reasons that are no failure: the node is on its way (shown after the failures).
PROGRESS_REASONS = frozenset({*_IN_PROGRESS.values(), "held back", "behind the log"})
# Names shown per group before "+N".
NAMED = 3


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``fleet-3`` before ``fleet-12``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part
    )


def short_reason(why: Missing) -> str:
    """``not found``, ``unauthorized``, ``pulling``...: why an image is missing, in a word or two.

    An image that failed and is being retried (pulling again, waiting for a slot) is still
    failing: its reason is the failure's class.
    """
    if why.error and why.state is not MissingState.PENDING:
        return _FAILURE_WORDS[classify(why.error)]
    if why.error:
        return "held back"  # the disk budget or the image-GC backoff, not an error
    return _IN_PROGRESS.get(why.state, str(why.state))


@dataclass
class ProblemGroup:
    """Nodes that miss ``image`` for the same ``reason`` (``image`` is empty for "behind")."""

    image: str
    reason: str
    nodes: set[str] = field(default_factory=set)
    fleets: set[str] = field(default_factory=set)
    # One full error text as a node reported it, for ``--fleet``/``--node`` readers to match.
    example: str = ""

    @property
    def failing(self) -> bool:
        return self.reason not in PROGRESS_REASONS

    def sort_key(self) -> tuple[bool, int, tuple[tuple[int, int | str], ...], str]:
        return (not self.failing, -len(self.nodes), natural_key(self.image), self.reason)


def group_problems(items: Iterable[tuple[str, str, str, Missing | None]]) -> list[ProblemGroup]:
    """Group ``(node, fleet, image, why)`` by (image, reason): failures first, then by how many
    nodes, then naturally by image. ``why`` None means the node is behind the log."""
    groups: dict[tuple[str, str], ProblemGroup] = {}
    for node, fleet, image, why in items:
        reason = "behind the log" if why is None else short_reason(why)
        group = groups.get((image, reason))
        if group is None:
            group = groups[(image, reason)] = ProblemGroup(image, reason)
            if why is not None:
                group.example = why.error
        group.nodes.add(node)
        if fleet:
            group.fleets.add(fleet)
    return sorted(groups.values(), key=ProblemGroup.sort_key)


def name_some(names: Iterable[str], limit: int = NAMED) -> str:
    """``a, b, c +4``: a few names, naturally sorted, and how many more."""
    ordered = sorted(names, key=natural_key)
    shown = ", ".join(ordered[:limit])
    return shown + (f" +{len(ordered) - limit}" if len(ordered) > limit else "")
