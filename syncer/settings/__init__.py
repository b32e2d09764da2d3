"""Everything the node syncer is told, in one typed value built by the CLI (flags + env twins).

:class:`SyncerSettings` holds what every part reads (the node's name, the subject prefix) and one
section per concern (``settings.pulls.timeout``, ``settings.status.interval``,
``settings.keeping.remove_unused``...), small frozen dataclasses in the modules beside this one
(``pulling``, ``reading``, ``reporting``, ``fleets``, ``keeping``); :mod:`syncer.assembly` hands
each part only its section. Every field declares its flag and environment twin
(:mod:`ops.flagfields`), the CLI generates the flags from them, and each section checks itself
when built, naming the flags it refuses: a new setting is one field, nothing else. A section's
``panel`` is the title its flags are shown under in ``syncer --help``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import ClassVar

from ops.flagfields import Kind, flag, require_positive
from syncer.settings.fleets import FleetSettings, GateSettings
from syncer.settings.keeping import KeepingSettings
from syncer.settings.pulling import (
    DEFAULT_CRI_ENDPOINT,
    PullSettings,
    RuntimeSettings,
    SeedingSettings,
)
from syncer.settings.reading import ConsumerSettings
from syncer.settings.reporting import StatusReportSettings
from wire.contract import DEFAULT_PREFIX
from wire.natsconn import NatsSettings

# The durable is named where the per-node NATS permissions are: one rule for both.
from wire.permissions import durable_name

__all__ = [
    "CLOSING_BOUND",
    "DEFAULT_CRI_ENDPOINT",
    "ConsumerSettings",
    "FleetSettings",
    "GateSettings",
    "KeepingSettings",
    "PullSettings",
    "RuntimeSettings",
    "SeedingSettings",
    "StatusReportSettings",
    "SyncerSettings",
    "durable_name",
]

# After --stop-timeout, each closing step has a bound of its own (pins, events, the last status,
# background tasks, NATS); together at most this many seconds. See syncer.runner.
CLOSING_BOUND = 7.0


@dataclass(frozen=True)
class SyncerSettings:
    """The root: the node, where it serves, how it stops; then a section per concern, in the
    order ``syncer --help`` shows them."""

    panel: ClassVar[str] = "Node and runtime"

    node_name: str = field(
        default_factory=socket.gethostname,
        metadata=flag(
            "--node-name",
            env="NODE_NAME",
            metavar="NODE",
            help="This node's name; names its durable consumer.",
        ),
    )
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    metrics_addr: str = field(
        default=":8080",
        metadata=flag(
            "--metrics-addr",
            env="METRICS_ADDR",
            metavar="[HOST]:PORT",
            help="[host]:port for /metrics, /healthz, /readyz.",
        ),
    )
    # At stop, pulls in flight get this long to finish before they are cancelled; closing the
    # rest then takes at most CLOSING_BOUND more (the DaemonSet's grace period leaves room).
    stop_timeout: float = field(
        default=10.0,
        metadata=flag(
            "--stop-timeout",
            env="STOP_TIMEOUT",
            kind=Kind.DURATION,
            help=f"On SIGTERM, let pulls in flight run this long, then cancel them; closing "
            f"takes at most {CLOSING_BOUND:g}s more.",
        ),
    )
    pulls: PullSettings = field(default_factory=PullSettings)
    # Every subject, stream and bucket of the node: shown with the log it names first.
    subject_prefix: str = field(
        default=DEFAULT_PREFIX,
        metadata=flag(
            "--subject-prefix",
            env="SUBJECT_PREFIX",
            kind=Kind.PREFIX,
            metavar="PREFIX",
            panel=ConsumerSettings.panel,
            help="First token(s) of every subject; each prefix has its own streams and buckets.",
        ),
    )
    consumer: ConsumerSettings = field(default_factory=ConsumerSettings)
    status: StatusReportSettings = field(default_factory=StatusReportSettings)
    fleets: FleetSettings = field(default_factory=FleetSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    keeping: KeepingSettings = field(default_factory=KeepingSettings)
    seeding: SeedingSettings = field(default_factory=SeedingSettings)
    nats: NatsSettings = field(default_factory=NatsSettings)

    def __post_init__(self) -> None:
        if not self.node_name:
            raise ValueError("--node-name must not be empty")
        require_positive(self, "stop_timeout")

    @property
    def durable(self) -> str:
        return durable_name(self.node_name)
