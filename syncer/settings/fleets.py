"""Which Fleets this node pulls for, and the startup taint it lifts once they are here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from ops.flagfields import Kind, flag, flag_of, require_positive
from syncer.folding.filtering import FleetFilter

__all__ = ["LABEL_KEY", "FleetSettings", "GateSettings"]

# A label key, as taint keys are: an optional DNS subdomain prefix and a name of 63 at most.
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


@dataclass(frozen=True)
class FleetSettings:
    """Which Fleets this node pulls for: a selector, and where their game servers may run."""

    panel: ClassVar[str] = "Which Fleets"

    # A label selector on Fleet labels; empty selects all.
    selector: str = field(
        default="",
        metadata=flag(
            "--fleet-selector",
            env="FLEET_SELECTOR",
            metavar="SELECTOR",
            help="Label selector on Fleet labels; empty selects all.",
        ),
    )
    respect_scheduling: bool = field(
        default=False,
        metadata=flag(
            "--respect-scheduling",
            env="RESPECT_SCHEDULING",
            help="Pull a Fleet's images only where its game servers could be scheduled.",
        ),
    )
    kube_api_url: str | None = field(
        default=None,
        metadata=flag(
            "--kube-api-url",
            env="KUBE_API_URL",
            metavar="URL",
            help="API server URL; in-cluster by default.",
        ),
    )
    node_refresh: float = field(
        default=60.0,
        metadata=flag(
            "--node-refresh",
            env="NODE_REFRESH",
            kind=Kind.DURATION,
            help="How often to re-read the node's labels and taints.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "node_refresh")
        FleetFilter.parse(self.selector)  # SelectorError (a ValueError) names the problem


@dataclass(frozen=True)
class GateSettings:
    """The startup-taint gate: the taint removed once the node's images are here."""

    panel: ClassVar[str] = "Which Fleets"

    # "" = off.
    taint: str = field(
        default="",
        metadata=flag(
            "--startup-taint",
            env="STARTUP_TAINT",
            metavar="KEY",
            help="Taint key to remove from this node once its images are here; empty: off.",
        ),
    )
    timeout: float = field(
        default=900.0,
        metadata=flag(
            "--startup-taint-timeout",
            env="STARTUP_TAINT_TIMEOUT",
            kind=Kind.DURATION,
            help="Remove the startup taint anyway after this long, images or not.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "timeout")
        if self.taint and not LABEL_KEY.match(self.taint):
            raise ValueError(
                f"{flag_of(self, 'taint')} {self.taint!r} is not a taint key ([prefix/]name)"
            )
