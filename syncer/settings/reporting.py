"""What this node tells the cluster: its status, how often, how long it stands."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ops.flagfields import Kind, flag, flag_of, require_positive

__all__ = ["StatusReportSettings"]


@dataclass(frozen=True)
class StatusReportSettings:
    """The node status this node writes: how often, how long it stands, how it is replicated."""

    panel: ClassVar[str] = "Node status"

    interval: float = field(
        default=5.0,
        metadata=flag(
            "--status-interval",
            env="STATUS_INTERVAL",
            kind=Kind.DURATION,
            help="Write this node's status at most this often.",
        ),
    )
    # How often a node whose status did not change says it is alive (a few dozen bytes).
    heartbeat: float = field(
        default=30.0,
        metadata=flag(
            "--status-heartbeat",
            env="STATUS_HEARTBEAT",
            kind=Kind.DURATION,
            help="Say this node is alive this often while its status does not change.",
        ),
    )
    # Also the replicas of every bucket a node writes to (pulled images, pins, budgets).
    replicas: int = field(
        default=1,
        metadata=flag(
            "--status-replicas",
            env="STATUS_REPLICAS",
            kind=Kind.COUNT,
            low=1,
            high=5,
            help="Replicas of the status and pulled-image buckets.",
        ),
    )
    ttl: float = field(
        default=3600.0,
        metadata=flag(
            "--status-ttl",
            env="STATUS_TTL",
            kind=Kind.DURATION,
            help="A vanished node's status entry expires after this.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "interval", "ttl", "heartbeat")
        if self.replicas < 1:
            raise ValueError(f"{flag_of(self, 'replicas')} must be at least 1")
