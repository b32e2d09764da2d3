"""Everything the broadcaster can be told, in one typed, immutable value.

The CLI builds it from flags and env vars; tests build it directly. Nothing below the CLI reads
the environment, so a test can run several broadcasters in one process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from wire.contract import Kind
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings

__all__ = ["Settings", "SidecarSettings", "WatchTarget", "default_identity"]


def default_identity() -> str:
    """This replica's name in the lease when none is given: unique per process on a host."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WatchTarget:
    """One list+watch stream: a kind, cluster-wide (namespace None) or in one namespace."""

    kind: Kind
    namespace: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace or '*'}"


@dataclass(frozen=True)
class SidecarSettings:
    """Where the Agones SDK sidecar's image is found (``broadcaster.sidecar``)."""

    # Empty: do not follow the sidecar image.
    namespace: str = "agones-system"
    deployment: str = "agones-controller"
    refresh: float = 60.0
    request_timeout: float = 10.0


@dataclass(frozen=True)
class Settings:
    nats: NatsSettings = field(default_factory=NatsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    # None: in-cluster service account config.
    kubeconfig: str | None = None
    # Empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    label_selector: str = ""
    kinds: tuple[Kind, ...] = (Kind.FLEET,)
    metrics_addr: str = ":8080"
    # Server-side timeout of one watch request; the watch is then resumed where it stopped.
    watch_timeout: float = 300.0
    # Client-side read timeout on top of watch_timeout, to notice a silently dead connection.
    watch_grace: float = 30.0
    publish_timeout: float = 5.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    # A CRD that is not installed (Agones missing) is retried every backoff_max, but said at most
    # this often.
    missing_crd_log_interval: float = 300.0
    # How long SIGTERM waits for queued events to be acked before giving up on them (the next
    # start's catch-up publishes whatever was not).
    drain_timeout: float = 10.0
    # High availability: replicas elect one active through a lease in NATS KV (broadcaster.lease).
    ha: bool = False
    lease_ttl: float = 10.0
    identity: str = field(default_factory=default_identity)
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    # Kubernetes Events on Fleets from the nodes' status (broadcaster.fleetevents).
    fleet_events: bool = True
    fleet_events_interval: float = 30.0
    node_stale_after: float = 60.0

    def targets(self) -> tuple[WatchTarget, ...]:
        namespaces: tuple[str | None, ...] = tuple(dict.fromkeys(self.namespaces)) or (None,)
        return tuple(WatchTarget(kind, ns) for kind in self.kinds for ns in namespaces)
