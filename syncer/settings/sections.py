"""The syncer's settings, one small section per concern; each part is handed only its own.

Every field declares its flag and environment twin (:func:`ops.flagfields.flag`), so the CLI
lists no setting again, and each section checks itself when built, naming the flags it refuses.
A section's ``panel`` is the title its flags are shown under in ``syncer --help``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from ops.flagfields import Kind, flag, flag_of, require_positive
from syncer.folding.filtering import FleetFilter
from syncer.folding.references import normalize

__all__ = [
    "DEFAULT_CRI_ENDPOINT",
    "ConsumerSettings",
    "FleetSettings",
    "GateSettings",
    "KeepingSettings",
    "PullSettings",
    "RuntimeSettings",
    "SeedingSettings",
    "StatusReportSettings",
]

DEFAULT_CRI_ENDPOINT = "unix:///run/containerd/containerd.sock"
# A label key, as taint keys are: an optional DNS subdomain prefix and a name of 63 at most.
TAINT_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_HOST = re.compile(r"^\*$|^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?$")
_DURATION = Kind.DURATION


@dataclass(frozen=True)
class RuntimeSettings:
    """The container runtime this node's syncer talks to."""

    panel: ClassVar[str] = "Node and runtime"

    endpoint: str = field(
        default=DEFAULT_CRI_ENDPOINT,
        metadata=flag(
            "--cri-endpoint",
            env="CONN_TARGET",  # Octops image-syncer's name: its DaemonSets keep working
            metavar="URL",
            help="The runtime's CRI socket, e.g. unix:///x.sock.",
        ),
    )
    call_timeout: float = field(
        default=30.0,
        metadata=flag(
            "--cri-call-timeout",
            env="CRI_CALL_TIMEOUT",
            kind=_DURATION,
            help="Deadline of every CRI call but pulls.",
        ),
    )
    # /healthz fails once the runtime has not answered for this long (stale hostPath socket).
    unhealthy_after: float = field(
        default=300.0,
        metadata=flag(
            "--runtime-unhealthy-after",
            env="RUNTIME_UNHEALTHY_AFTER",
            kind=_DURATION,
            help="Fail /healthz once the runtime has been unreachable this long.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "unhealthy_after")


@dataclass(frozen=True)
class PullSettings:
    """How this node pulls: how often it looks, how many at once, how it backs off."""

    panel: ClassVar[str] = "Pulls"

    period: float = field(
        default=15.0,
        metadata=flag(
            "--sync-period",
            env="SYNC_PERIOD",
            kind=_DURATION,
            help="How often to re-check the images (jittered).",
        ),
    )
    max_parallel: int = field(
        default=2,
        metadata=flag(
            "--max-parallel-pulls",
            env="MAX_PARALLEL_PULLS",
            kind=Kind.COUNT,
            low=1,
            high=64,
            help="Pulls running at once.",
        ),
    )
    timeout: float = field(
        default=600.0,
        metadata=flag(
            "--pull-timeout",
            env="PULL_TIMEOUT",
            kind=_DURATION,
            help="Give up on one pull after this long.",
        ),
    )
    backoff_min: float = field(
        default=1.0,
        metadata=flag(
            "--pull-backoff-min",
            env="PULL_BACKOFF_MIN",
            kind=_DURATION,
            help="First wait before retrying a failed image.",
        ),
    )
    backoff_max: float = field(
        default=300.0,
        metadata=flag(
            "--pull-backoff-max",
            env="PULL_BACKOFF_MAX",
            kind=_DURATION,
            help="Longest wait before retrying a failed image.",
        ),
    )
    # Docker config.json files ({"auths": {...}}): a mounted pull Secret, the kubelet's own.
    registry_auth_file: str | None = field(
        default=None,
        metadata=flag(
            "--registry-auth-file",
            env="REGISTRY_AUTH_FILE",
            metavar="PATH",
            help="dockerconfigjson with pull credentials.",
        ),
    )
    kubelet_config_json: str | None = field(
        default=None,
        metadata=flag(
            "--kubelet-config-json",
            env="KUBELET_CONFIG_JSON",
            metavar="PATH",
            help="The kubelet's config.json, if mounted.",
        ),
    )
    # Images every node keeps besides the Fleets' (a log shipper, a game-wide base image).
    extra_images: tuple[str, ...] = field(
        default=(),
        metadata=flag(
            "--extra-image",
            env="EXTRA_IMAGES",
            kind=Kind.LIST,
            metavar="IMAGE",
            help="Image every node keeps besides the Fleets' (repeatable, comma-separated).",
        ),
    )
    # The cluster-wide pull budget: slots per image across all nodes (0 = off), and how long the
    # cluster holds back pulls from a registry that answered 429.
    max_cluster: int = field(
        default=0,
        metadata=flag(
            "--max-cluster-pulls",
            env="MAX_CLUSTER_PULLS",
            kind=Kind.COUNT,
            low=0,
            high=100_000,
            help="At most this many nodes pull one image at a time, cluster-wide; 0: no limit.",
        ),
    )
    registry_backoff: float = field(
        default=60.0,
        metadata=flag(
            "--registry-backoff",
            env="REGISTRY_BACKOFF",
            kind=_DURATION,
            help="With --max-cluster-pulls: hold back every node's pulls from a registry that "
            "answered 429 for this long.",
        ),
    )

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"{flag_of(self, 'max_parallel')} must be at least 1")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError(
                f"{flag_of(self, 'backoff_min')} must be positive and at most "
                f"{flag_of(self, 'backoff_max')}"
            )
        require_positive(self, "period", "timeout", "registry_backoff")
        if self.max_cluster < 0:
            raise ValueError(
                f"{flag_of(self, 'max_cluster')} must not be negative (0 turns the budget off)"
            )
        for image in self.extra_images:
            normalize(image)  # InvalidImageReference (a ValueError) names the bad one


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
            kind=_DURATION,
            help="Redeliver an event not acked (nor kept alive) this long.",
        ),
    )
    inactive_threshold: float = field(
        default=24 * 3600.0,
        metadata=flag(
            "--consumer-inactive-threshold",
            env="CONSUMER_INACTIVE_THRESHOLD",
            kind=_DURATION,
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
            kind=_DURATION,
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
            kind=_DURATION,
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
            kind=_DURATION,
            help="The server holds each long-poll pull request this long.",
        ),
    )
    fetch_heartbeat: float = field(
        default=5.0,
        metadata=flag(
            "--fetch-heartbeat",
            env="FETCH_HEARTBEAT",
            kind=_DURATION,
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


@dataclass(frozen=True)
class StatusReportSettings:
    """The node status this node writes: how often, how long it stands, how it is replicated."""

    panel: ClassVar[str] = "Node status"

    interval: float = field(
        default=5.0,
        metadata=flag(
            "--status-interval",
            env="STATUS_INTERVAL",
            kind=_DURATION,
            help="Write this node's status at most this often.",
        ),
    )
    # How often a node whose status did not change says it is alive (a few dozen bytes).
    heartbeat: float = field(
        default=30.0,
        metadata=flag(
            "--status-heartbeat",
            env="STATUS_HEARTBEAT",
            kind=_DURATION,
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
            kind=_DURATION,
            help="A vanished node's status entry expires after this.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "interval", "ttl", "heartbeat")
        if self.replicas < 1:
            raise ValueError(f"{flag_of(self, 'replicas')} must be at least 1")


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
            kind=_DURATION,
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
            kind=_DURATION,
            help="Remove the startup taint anyway after this long, images or not.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "timeout")
        if self.taint and not TAINT_KEY.match(self.taint):
            raise ValueError(
                f"{flag_of(self, 'taint')} {self.taint!r} is not a taint key ([prefix/]name)"
            )


@dataclass(frozen=True)
class KeepingSettings:
    """What stays on the node and what goes: pins, removal, the disk budget, the GC fight."""

    panel: ClassVar[str] = "Keeping images"

    remove_unused: bool = field(
        default=False,
        metadata=flag(
            "--remove-unused",
            env="REMOVE_UNUSED",
            help="Remove images this syncer pulled once no live Fleet references them.",
        ),
    )
    remove_grace: float = field(
        default=600.0,
        metadata=flag(
            "--remove-grace",
            env="REMOVE_GRACE",
            kind=_DURATION,
            help="How long an image must stay unused before removal.",
        ),
    )
    # The pulled-image and pin ledgers' records expire this long after their node last wrote
    # them (it writes them again every quarter of it): a gone node's records do not stay.
    ledger_ttl: float = field(
        default=720 * 3600.0,
        metadata=flag(
            "--ledger-ttl",
            env="LEDGER_TTL",
            kind=_DURATION,
            help="How long a node's pulled-image and pin records outlive its last renewal "
            "(renewed every quarter of it while the syncer runs).",
        ),
    )
    # Pinning: label what the syncer keeps so the kubelet's image GC skips it (containerd only;
    # off with one log line on other runtimes).
    pin_images: bool = field(
        default=True,
        metadata=flag(
            "--pin-images",
            env="PIN_IMAGES",
            help="Pin the images kept here so the kubelet's image GC skips them (containerd).",
        ),
    )
    # The disk budget: no pull while the image filesystem is this full (a fraction); its capacity
    # is read with statvfs under host_root ("" = the runtime's mount point as is).
    max_image_fs_usage: float = field(
        default=0.80,
        metadata=flag(
            "--max-image-fs-usage",
            env="MAX_IMAGE_FS_USAGE",
            kind=Kind.PERCENT,
            help="Start no pull while the image filesystem is this full.",
        ),
    )
    host_root: str = field(
        default="",
        metadata=flag(
            "--host-root",
            env="HOST_ROOT",
            metavar="PATH",
            help="Where the host's filesystems are mounted (read-only), e.g. /host.",
        ),
    )
    # The GC fight: after removal_backoff_after removals behind the syncer's back within
    # removal_window, an image's re-pull backs off, up to removal_backoff_max.
    removal_backoff_after: int = field(
        default=3,
        metadata=flag(
            "--removal-backoff-after",
            env="REMOVAL_BACKOFF_AFTER",
            kind=Kind.COUNT,
            low=1,
            high=1000,
            help="Back off re-pulling an image removed behind our back this often per window.",
        ),
    )
    removal_window: float = field(
        default=3600.0,
        metadata=flag(
            "--removal-window",
            env="REMOVAL_WINDOW",
            kind=_DURATION,
            help="The window removals are counted in.",
        ),
    )
    removal_backoff_max: float = field(
        default=1800.0,
        metadata=flag(
            "--removal-backoff-max",
            env="REMOVAL_BACKOFF_MAX",
            kind=_DURATION,
            help="Longest wait before re-pulling such an image.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "removal_window", "removal_backoff_max")
        if self.remove_grace < 0:
            raise ValueError(f"{flag_of(self, 'remove_grace')} must not be negative")
        if self.ledger_ttl < 60:
            raise ValueError(
                f"{flag_of(self, 'ledger_ttl')} must be at least 1m (the node renews it every "
                "quarter)"
            )
        if not 0 < self.max_image_fs_usage <= 1:
            raise ValueError(
                f"{flag_of(self, 'max_image_fs_usage')} must be above 0% and at most 100%"
            )
        if self.removal_backoff_after < 1:
            raise ValueError(f"{flag_of(self, 'removal_backoff_after')} must be at least 1")


@dataclass(frozen=True)
class SeedingSettings:
    """Seeding (syncer.pulling.seeding): a few nodes pull a new image from the registry, the
    others then pull it through the mirror they were configured with."""

    panel: ClassVar[str] = "Seeding through a mirror"

    # Registry hosts this node's runtime pulls through a mirror ("*": all; empty: seeding off).
    mirror: tuple[str, ...] = field(
        default=(),
        metadata=flag(
            "--mirror",
            env="MIRROR",
            kind=Kind.LIST,
            metavar="HOST",
            help="Registry host this node's runtime pulls through a mirror or pull-through cache "
            "(hosts.toml; repeatable, comma-separated; '*': all). Turns seeding on for it.",
        ),
    )
    seeds: int = field(
        default=1,
        metadata=flag(
            "--seeds",
            env="SEEDS",
            kind=Kind.NUMBER,
            low=1,
            help="With --mirror: nodes that pull a new image from the registry first, per image "
            "(per --seed-per value); the others wait, then pull from the mirror.",
        ),
    )
    # Seeds are counted per value of this node label ("" = one group).
    per: str = field(
        default="",
        metadata=flag(
            "--seed-per",
            env="SEED_PER",
            metavar="LABEL",
            help="With --mirror: count seeds per value of this node label, e.g. "
            "topology.kubernetes.io/zone (reads this node from the API server); empty: cluster.",
        ),
    )
    # How long a waiting node gives a seed before seeding too.
    timeout: float = field(
        default=600.0,
        metadata=flag(
            "--seed-timeout",
            env="SEED_TIMEOUT",
            kind=_DURATION,
            help="With --mirror: after waiting this long for a seed, a node may seed as well "
            "(one more seed per timeout).",
        ),
    )
    report_ttl: float = field(
        default=3600.0,
        metadata=flag(
            "--seed-report-ttl",
            env="SEED_REPORT_TTL",
            kind=_DURATION,
            help="With --mirror: how long a seed's 'image complete' report stands.",
        ),
    )
    # The cluster-wide slots per image for mirrored pulls (0 = no limit).
    max_mirror_pulls: int = field(
        default=0,
        metadata=flag(
            "--max-mirror-pulls",
            env="MAX_MIRROR_PULLS",
            kind=Kind.NUMBER,
            low=0,
            help="At most this many nodes pull one image from the mirror at a time, "
            "cluster-wide (--max-cluster-pulls counts registry-bound pulls only); 0: no limit.",
        ),
    )

    def __post_init__(self) -> None:
        require_positive(self, "timeout", "report_ttl")
        for host in self.mirror:
            if not _HOST.match(host):
                raise ValueError(
                    f"{flag_of(self, 'mirror')} {host!r} is not a registry host[:port] or '*'"
                )
        if self.seeds < 1:
            raise ValueError(f"{flag_of(self, 'seeds')} must be at least 1")
        if self.max_mirror_pulls < 0:
            raise ValueError(
                f"{flag_of(self, 'max_mirror_pulls')} must not be negative (0 turns the limit off)"
            )
        if self.per and not TAINT_KEY.match(self.per):
            raise ValueError(
                f"{flag_of(self, 'per')} {self.per!r} is not a label key ([prefix/]name)"
            )
