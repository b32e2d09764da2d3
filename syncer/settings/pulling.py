"""How this node pulls: the runtime it talks to, the pulls themselves, seeding through a mirror."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from ops.flagfields import Kind, flag, flag_of, require_positive
from syncer.folding.references import normalize
from syncer.settings.fleets import LABEL_KEY

__all__ = ["DEFAULT_CRI_ENDPOINT", "PullSettings", "RuntimeSettings", "SeedingSettings"]

DEFAULT_CRI_ENDPOINT = "unix:///run/containerd/containerd.sock"
_HOST = re.compile(r"^\*$|^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?$")


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
            kind=Kind.DURATION,
            help="Deadline of every CRI call but pulls.",
        ),
    )
    # /healthz fails once the runtime has not answered for this long (stale hostPath socket).
    unhealthy_after: float = field(
        default=300.0,
        metadata=flag(
            "--runtime-unhealthy-after",
            env="RUNTIME_UNHEALTHY_AFTER",
            kind=Kind.DURATION,
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
            kind=Kind.DURATION,
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
            kind=Kind.DURATION,
            help="Give up on one pull after this long.",
        ),
    )
    backoff_min: float = field(
        default=1.0,
        metadata=flag(
            "--pull-backoff-min",
            env="PULL_BACKOFF_MIN",
            kind=Kind.DURATION,
            help="First wait before retrying a failed image.",
        ),
    )
    backoff_max: float = field(
        default=300.0,
        metadata=flag(
            "--pull-backoff-max",
            env="PULL_BACKOFF_MAX",
            kind=Kind.DURATION,
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
            kind=Kind.DURATION,
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
            kind=Kind.DURATION,
            help="With --mirror: after waiting this long for a seed, a node may seed as well "
            "(one more seed per timeout).",
        ),
    )
    report_ttl: float = field(
        default=3600.0,
        metadata=flag(
            "--seed-report-ttl",
            env="SEED_REPORT_TTL",
            kind=Kind.DURATION,
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
        if self.per and not LABEL_KEY.match(self.per):
            raise ValueError(
                f"{flag_of(self, 'per')} {self.per!r} is not a label key ([prefix/]name)"
            )
