"""What stays on the node and what goes: pins, removal, the disk budget, the GC fight."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ops.flagfields import Kind, flag, flag_of, require_positive

__all__ = ["KeepingSettings"]


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
            kind=Kind.DURATION,
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
            kind=Kind.DURATION,
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
            kind=Kind.DURATION,
            help="The window removals are counted in.",
        ),
    )
    removal_backoff_max: float = field(
        default=1800.0,
        metadata=flag(
            "--removal-backoff-max",
            env="REMOVAL_BACKOFF_MAX",
            kind=Kind.DURATION,
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
