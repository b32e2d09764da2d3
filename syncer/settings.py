"""Everything the node syncer is told, in one typed value built by the CLI (flags + env twins)."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from syncer.folding.filtering import FleetFilter
from syncer.folding.references import normalize
from wire.contract import DEFAULT_PREFIX
from wire.natsconn import NatsSettings

# The durable is named where the per-node NATS permissions are: one rule for both.
from wire.permissions import durable_name

__all__ = ["CLOSING_BOUND", "SyncerSettings", "durable_name"]

# After --stop-timeout, each closing step has a bound of its own (pins, events, the last status,
# background tasks, NATS); together at most this many seconds. See syncer.runner.
CLOSING_BOUND = 7.0
DEFAULT_CRI_ENDPOINT = "unix:///run/containerd/containerd.sock"
# A label key, as taint keys are: an optional DNS subdomain prefix and a name of 63 at most.
_HOST = re.compile(r"^\*$|^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?$")
_TAINT_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


@dataclass(frozen=True)
class SyncerSettings:
    node_name: str = field(default_factory=socket.gethostname)
    cri_endpoint: str = DEFAULT_CRI_ENDPOINT
    sync_period: float = 15.0
    max_parallel_pulls: int = 2
    pull_timeout: float = 600.0
    # At stop, pulls in flight get this long to finish before they are cancelled; closing the
    # rest then takes at most CLOSING_BOUND more (the DaemonSet's grace period leaves room).
    stop_timeout: float = 10.0
    backoff_min: float = 1.0
    backoff_max: float = 300.0
    subject_prefix: str = DEFAULT_PREFIX
    metrics_addr: str = ":8080"
    max_ack_pending: int = 256
    ack_wait: float = 30.0
    inactive_threshold: float = 24 * 3600.0
    # Per-node NATS identities: the node's durable is created at its login (the auth callout),
    # never by the node, which binds to it and skips what its replay already folded.
    consumer_provisioned: bool = False
    cri_call_timeout: float = 30.0
    # Docker config.json files ({"auths": {...}}): a mounted pull Secret, the kubelet's own.
    registry_auth_file: str | None = None
    kubelet_config_json: str | None = None
    # Node status: written at most every status_interval, aged out after status_ttl.
    status_interval: float = 5.0
    status_replicas: int = 1
    status_ttl: float = 3600.0
    # How often a node whose status did not change says it is alive (a few dozen bytes).
    status_heartbeat: float = 30.0
    # How often the durable's num_pending is read for the lag gauge; 0: only from what each
    # delivery says (no periodic consumer_info: thousands of idle nodes would pay for it).
    lag_interval: float = 0.0
    # The live loop's long poll: the server holds each pull request this long, with an idle
    # heartbeat this often (a poll that saw no heartbeat means the server or durable is gone).
    fetch_expiry: float = 30.0
    fetch_heartbeat: float = 5.0
    # Anti-entropy: fold the whole log again this often (jittered; 0 = only after a reconnect
    # or a lost durable), so a Fleet whose delete never arrived is dropped.
    refold_period: float = 3600.0
    # /healthz fails once the runtime has not answered for this long (stale hostPath socket).
    runtime_unhealthy_after: float = 300.0
    # Which Fleets: a label selector on Fleet labels; empty selects all.
    fleet_selector: str = ""
    respect_scheduling: bool = False
    kube_api_url: str | None = None
    node_refresh: float = 60.0
    remove_unused: bool = False
    remove_grace: float = 600.0
    # The pulled-image and pin ledgers' records expire this long after their node last wrote
    # them (it writes them again every quarter of it): a gone node's records do not stay.
    ledger_ttl: float = 720 * 3600.0
    # The startup-taint gate: the taint key to remove once the node's images are here ("" = off),
    # and how long to wait for them at most.
    startup_taint: str = ""
    startup_taint_timeout: float = 900.0
    # Images every node keeps besides the Fleets' (a log shipper, a game-wide base image).
    extra_images: tuple[str, ...] = ()
    # The cluster-wide pull budget: slots per image across all nodes (0 = off), and how long the
    # cluster holds back pulls from a registry that answered 429.
    max_cluster_pulls: int = 0
    registry_backoff: float = 60.0
    # Seeding (syncer.pulling.seeding): registry hosts this node's runtime pulls through a mirror
    # ("*": all; empty: seeding off), seeds per image (per value of the node label seed_per,
    # "" = one group), how long a waiting node gives a seed before seeding too, how long a
    # seed's report stands; and the cluster-wide slots per image for mirrored pulls (0 = none).
    mirror: tuple[str, ...] = ()
    seeds: int = 1
    seed_per: str = ""
    seed_timeout: float = 600.0
    seed_report_ttl: float = 3600.0
    max_mirror_pulls: int = 0
    # Pinning: label what the syncer keeps so the kubelet's image GC skips it (containerd only;
    # off with one log line on other runtimes).
    pin_images: bool = True
    # The disk budget: no pull while the image filesystem is this full (a fraction); its capacity
    # is read with statvfs under host_root ("" = the runtime's mount point as is).
    max_image_fs_usage: float = 0.80
    host_root: str = ""
    # The GC fight: after removal_backoff_after removals behind the syncer's back within
    # removal_window, an image's re-pull backs off, up to removal_backoff_max.
    removal_backoff_after: int = 3
    removal_window: float = 3600.0
    removal_backoff_max: float = 1800.0
    nats: NatsSettings = field(default_factory=NatsSettings)

    def __post_init__(self) -> None:
        if self.max_parallel_pulls < 1:
            raise ValueError("max_parallel_pulls must be at least 1")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("backoff_min must be positive and at most backoff_max")
        if self.max_ack_pending < 1:
            raise ValueError("max_ack_pending must be at least 1")
        if not self.node_name:
            raise ValueError("node_name must not be empty")
        positive = {
            "sync_period": self.sync_period,
            "pull_timeout": self.pull_timeout,
            "status_interval": self.status_interval,
            "stop_timeout": self.stop_timeout,
            "status_ttl": self.status_ttl,
            "status_heartbeat": self.status_heartbeat,
            "runtime_unhealthy_after": self.runtime_unhealthy_after,
            "node_refresh": self.node_refresh,
            "startup_taint_timeout": self.startup_taint_timeout,
            "removal_window": self.removal_window,
            "removal_backoff_max": self.removal_backoff_max,
            "seed_timeout": self.seed_timeout,
            "seed_report_ttl": self.seed_report_ttl,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.lag_interval < 0:
            raise ValueError("lag_interval must not be negative (0: from deliveries only)")
        # The server refuses a pull request whose heartbeat is not below half its expiry.
        if not 0 < 2 * self.fetch_heartbeat < self.fetch_expiry:
            raise ValueError("fetch_heartbeat must be positive and below half of fetch_expiry")
        if self.remove_grace < 0:
            raise ValueError("remove_grace must not be negative")
        if self.ledger_ttl < 60:
            raise ValueError("ledger_ttl must be at least 1m (the node renews it every quarter)")
        if self.refold_period < 0:
            raise ValueError("refold_period must not be negative (0 turns the timer off)")
        if self.max_cluster_pulls < 0:
            raise ValueError("max_cluster_pulls must not be negative (0 turns the budget off)")
        self._check_seeding()
        if self.registry_backoff <= 0:
            raise ValueError("registry_backoff must be positive")
        if self.status_replicas < 1:
            raise ValueError("status_replicas must be at least 1")
        if not 0 < self.max_image_fs_usage <= 1:
            raise ValueError("max_image_fs_usage must be above 0% and at most 100%")
        if self.removal_backoff_after < 1:
            raise ValueError("removal_backoff_after must be at least 1")
        if self.startup_taint and not _TAINT_KEY.match(self.startup_taint):
            raise ValueError(
                f"startup taint {self.startup_taint!r} is not a taint key ([prefix/]name)"
            )
        for image in self.extra_images:
            normalize(image)  # InvalidImageReference (a ValueError) names the bad one
        FleetFilter.parse(self.fleet_selector)  # SelectorError (a ValueError) names the problem

    def _check_seeding(self) -> None:
        for host in self.mirror:
            if not _HOST.match(host):
                raise ValueError(f"mirror {host!r} is not a registry host[:port] or '*'")
        if self.seeds < 1:
            raise ValueError("seeds must be at least 1")
        if self.max_mirror_pulls < 0:
            raise ValueError("max_mirror_pulls must not be negative (0 turns the limit off)")
        if self.seed_per and not _TAINT_KEY.match(self.seed_per):
            raise ValueError(f"seed-per {self.seed_per!r} is not a label key ([prefix/]name)")

    @property
    def durable(self) -> str:
        return durable_name(self.node_name)
