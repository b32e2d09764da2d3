"""Everything the node syncer is told, in one typed value built by the CLI (flags + env twins)."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from wire.natsconn import NatsSettings

__all__ = ["SyncerSettings", "durable_name"]

DEFAULT_CRI_ENDPOINT = "unix:///run/containerd/containerd.sock"


@dataclass(frozen=True)
class SyncerSettings:
    node_name: str = field(default_factory=socket.gethostname)
    cri_endpoint: str = DEFAULT_CRI_ENDPOINT
    sync_period: float = 15.0
    max_parallel_pulls: int = 2
    pull_timeout: float = 600.0
    backoff_min: float = 1.0
    backoff_max: float = 300.0
    subject_prefix: str = "agones"
    metrics_addr: str = ":8080"
    max_ack_pending: int = 256
    ack_wait: float = 30.0
    inactive_threshold: float = 24 * 3600.0
    cri_call_timeout: float = 30.0
    # Docker config.json files ({"auths": {...}}): a mounted pull Secret, the kubelet's own.
    registry_auth_file: str | None = None
    kubelet_config_json: str | None = None
    nats: NatsSettings = field(default_factory=NatsSettings)

    def __post_init__(self) -> None:
        if self.max_parallel_pulls < 1:
            raise ValueError("max_parallel_pulls must be at least 1")
        if self.sync_period <= 0 or self.pull_timeout <= 0:
            raise ValueError("sync_period and pull_timeout must be positive")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("backoff bounds must satisfy 0 < min <= max")
        if self.max_ack_pending < 1:
            raise ValueError("max_ack_pending must be at least 1")
        if not self.node_name:
            raise ValueError("node_name must not be empty")

    @property
    def durable(self) -> str:
        return durable_name(self.node_name)


def durable_name(node_name: str) -> str:
    """``syncer-<node>``: JetStream names may not hold ``.``, ``*``, ``>`` or whitespace."""
    return "syncer-" + re.sub(r"[^A-Za-z0-9_-]", "_", node_name)
