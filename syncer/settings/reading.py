"""How this node reads the Fleet event log: its durable consumer and long poll."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ops.flagfields import Kind, flag, flag_of

__all__ = ["ConsumerSettings"]


@dataclass(frozen=True)
class ConsumerSettings:
    """This node's durable consumer of the Fleet event log, and how it reads it."""

    panel: ClassVar[str] = "Event log"

    max_ack_pending: int = field(
        default=256,
        metadata=flag(
            "--max-ack-pending",
            env="MAX_ACK_PENDING",
            kind=Kind.COUNT,
            low=1,
            high=10_000,
            help="Events in flight at once.",
        ),
    )
    ack_wait: float = field(
        default=30.0,
        metadata=flag(
            "--ack-wait",
            env="ACK_WAIT",
            kind=Kind.DURATION,
            help="Redeliver an event not acked (nor kept alive) this long.",
        ),
    )
    inactive_threshold: float = field(
        default=24 * 3600.0,
        metadata=flag(
            "--consumer-inactive-threshold",
            env="CONSUMER_INACTIVE_THRESHOLD",
            kind=Kind.DURATION,
            help="Delete this node's consumer after it has been unused this long.",
        ),
    )
    # Per-node NATS identities: the node's durable is created at its login (the auth callout),
    # never by the node, which binds to it and skips what its replay already folded.
    provisioned: bool = field(
        default=False,
        metadata=flag(
            "--consumer-provisioned",
            env="CONSUMER_PROVISIONED",
            help="The node's consumer is created at its NATS login (auth callout): bind to it, "
            "never create it.",
        ),
    )
    # Anti-entropy: fold the whole log again this often (jittered; 0 = only after a reconnect
    # or a lost durable), so a Fleet whose delete never arrived is dropped.
    refold_period: float = field(
        default=3600.0,
        metadata=flag(
            "--refold-period",
            env="REFOLD_PERIOD",
            kind=Kind.DURATION,
            help="Fold the whole log again this often (jittered), to drop Fleets whose delete "
            "never arrived; 0: only after a reconnect or a lost consumer.",
        ),
    )
    # How often the durable's num_pending is read for the lag gauge; 0: only from what each
    # delivery says (no periodic consumer_info: thousands of idle nodes would pay for it).
    lag_interval: float = field(
        default=0.0,
        metadata=flag(
            "--lag-interval",
            env="LAG_INTERVAL",
            kind=Kind.DURATION,
            help="Also read this node's consumer lag this often (0: only from deliveries).",
        ),
    )
    # The live loop's long poll: the server holds each pull request this long, with an idle
    # heartbeat this often (a poll that saw no heartbeat means the server or durable is gone).
    fetch_expiry: float = field(
        default=30.0,
        metadata=flag(
            "--fetch-expiry",
            env="FETCH_EXPIRY",
            kind=Kind.DURATION,
            help="The server holds each long-poll pull request this long.",
        ),
    )
    fetch_heartbeat: float = field(
        default=5.0,
        metadata=flag(
            "--fetch-heartbeat",
            env="FETCH_HEARTBEAT",
            kind=Kind.DURATION,
            help="Idle heartbeat of a held pull request (below half of --fetch-expiry).",
        ),
    )

    def __post_init__(self) -> None:
        if self.max_ack_pending < 1:
            raise ValueError(f"{flag_of(self, 'max_ack_pending')} must be at least 1")
        if self.lag_interval < 0:
            raise ValueError(
                f"{flag_of(self, 'lag_interval')} must not be negative (0: from deliveries only)"
            )
        # The server refuses a pull request whose heartbeat is not below half its expiry.
        if not 0 < 2 * self.fetch_heartbeat < self.fetch_expiry:
            raise ValueError(
                f"{flag_of(self, 'fetch_heartbeat')} must be positive and below half of "
                f"{flag_of(self, 'fetch_expiry')}"
            )
        if self.refold_period < 0:
            raise ValueError(
                f"{flag_of(self, 'refold_period')} must not be negative (0 turns the timer off)"
            )
