"""The disk budget: never pull an image into the kubelet's image garbage collector.

The kubelet deletes unused images once its image filesystem passes ``imageGCHighThresholdPercent``
(85% by default). A pre-pull that pushes the disk past it gets deleted again (or evicts an image
a game server is about to need), so before each pull the syncer reads the image filesystem's
usage and skips the pull while it is at or above ``--max-image-fs-usage`` (80% by default). A
skipped pull is not a failure: it is retried by the next reconcile, and goes ahead once space frees.

Where the numbers come from: CRI ``ImageFsInfo`` names the filesystem that holds images (its
mount point, e.g. ``/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs``) and the bytes
images use, but not its size. The size and free space come from ``statvfs`` of that mount point,
seen through a read-only host mount (``--host-root``, e.g. ``/host`` when the DaemonSet mounts the
host's ``/var/lib/containerd`` at ``/host/var/lib/containerd``). Usage is computed as the kubelet
does: (capacity - available) / capacity.

containerd keeps an image twice: compressed in its content store
(``<root>/io.containerd.content.v1.content``) and unpacked in the snapshotter's directory, which
is all ImageFsInfo names. Where a node-local cache serves peers from the content store (Spegel
needs ``discard_unpacked_layers = false``, so the compressed layers stay), that store is part of
what images cost; when it lies on another filesystem than the snapshots (a separate disk for
the snapshotter), it is measured too, and the fuller of the two counts.

When the usage cannot be known (no such path in the container, the runtime does not answer
ImageFsInfo) the budget does not block: it is a safety net, not a reason to stop pre-pulling.
Every change of state (over budget, within budget, unknown) is one log line, not one per pull.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from syncer import metrics
from syncer.cri import CriError, ImageFilesystem

__all__ = ["CONTENT_STORE", "DEFAULT_MAX_USAGE", "DiskBudget", "FsUsage", "parse_percent"]

log = logging.getLogger(__name__)

DEFAULT_MAX_USAGE = 0.80
# containerd's content store, next to its snapshotters' directories under its root.
CONTENT_STORE = "io.containerd.content.v1.content"
_SNAPSHOTTER = "io.containerd.snapshotter.v1."
# Many pulls start at once after a reconcile: they share one reading this young.
_MAX_AGE = 1.0

FsInfo = Callable[[], Awaitable[list[ImageFilesystem]]]
Statvfs = Callable[[str], os.statvfs_result]


def parse_percent(text: str) -> float:
    """``80%`` (or ``80``) -> 0.8; a usage threshold must lie in (0%, 100%]."""
    value = text.strip().removesuffix("%").strip()
    try:
        percent = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage (e.g. 80%)") from None
    if not 0 < percent <= 100:
        raise ValueError(f"{text!r} must be above 0% and at most 100%")
    return percent / 100


@dataclass(frozen=True)
class FsUsage:
    """One image filesystem: CRI's view (mount point, bytes images use) and statvfs's."""

    mountpoint: str
    images_bytes: int
    capacity: int
    available: int

    @property
    def ratio(self) -> float:
        return (self.capacity - self.available) / self.capacity

    def describe(self) -> str:
        return f"{self.mountpoint} {self.ratio:.0%} used"


class DiskBudget:
    """Answers "may a pull start now?" from a recent reading of the image filesystem."""

    def __init__(
        self,
        fs_info: FsInfo,
        *,
        max_usage: float = DEFAULT_MAX_USAGE,
        host_root: str = "",
        statvfs: Statvfs = os.statvfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fs_info = fs_info
        self.max_usage = max_usage
        self._host_root = host_root
        self._statvfs = statvfs
        self._clock = clock
        self._lock = asyncio.Lock()
        self._read_at: float | None = None
        self.usage: FsUsage | None = None  # the fullest image filesystem at the last reading
        self.blocked = ""  # why pulls are skipped now; empty while they may run
        self._unknown = ""

    async def refuse(self) -> str:
        """Why a pull must not start now, or "" if it may (also when usage is unknown)."""
        async with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= _MAX_AGE:
                self._read_at = now
                await self._read()
        if self.blocked:
            metrics.PULLS_SKIPPED.labels("disk_budget").inc()
        return self.blocked

    def host_path(self, mountpoint: str) -> Path:
        """Where the host's ``mountpoint`` is seen from this process."""
        if not self._host_root:
            return Path(mountpoint)
        return Path(self._host_root) / mountpoint.lstrip("/")

    async def _read(self) -> None:
        try:
            filesystems = await self._fs_info()
        except CriError as e:
            metrics.CRI_ERRORS.labels("ImageFsInfo").inc()
            self._set_unknown(f"CRI ImageFsInfo failed: {e}")
            return
        readings = []
        for fs in filesystems:
            usage = self._measure(fs)
            if usage is None:
                return
            readings.append(usage)
            kept = self._content_store(fs)
            if kept is not None:
                readings.append(kept)
        if not readings:
            self._set_unknown("the runtime reports no image filesystem")
            return
        fullest = max(readings, key=lambda u: u.ratio)
        self.usage = fullest
        metrics.IMAGE_FS_USAGE.set(fullest.ratio)
        self._set_known(fullest)

    def _content_store(self, fs: ImageFilesystem) -> FsUsage | None:
        """containerd's content store beside the snapshots ``fs`` names, if it has one here."""
        snapshots = Path(fs.mountpoint)
        if not snapshots.name.startswith(_SNAPSHOTTER):
            return None
        store = snapshots.parent / CONTENT_STORE
        if not self.host_path(str(store)).is_dir():
            return None
        return self._measure(
            ImageFilesystem(str(store), used_bytes=0, inodes_used=0, timestamp_ns=0)
        )

    def _measure(self, fs: ImageFilesystem) -> FsUsage | None:
        path = self.host_path(fs.mountpoint)
        try:
            stat = self._statvfs(str(path))
        except OSError as e:
            hint = "" if self._host_root else " (set --host-root to a read-only host mount)"
            self._set_unknown(f"cannot statvfs {path}: {e.strerror or e}{hint}")
            return None
        capacity = stat.f_blocks * stat.f_frsize
        if capacity <= 0:
            self._set_unknown(f"{path} reports no capacity")
            return None
        return FsUsage(
            mountpoint=fs.mountpoint,
            images_bytes=fs.used_bytes,
            capacity=capacity,
            available=stat.f_bavail * stat.f_frsize,
        )

    def _set_known(self, usage: FsUsage) -> None:
        if self._unknown:
            self._unknown = ""
            log.info("image filesystem usage known again", extra={"usage": usage.describe()})
        over = usage.ratio >= self.max_usage
        metrics.DISK_BUDGET_EXCEEDED.set(1 if over else 0)
        if over:
            reason = (
                f"image filesystem {usage.describe()}, at or above --max-image-fs-usage "
                f"{self.max_usage:.0%}: pulls wait for free space"
            )
            if not self.blocked:
                log.warning(
                    "pulls paused: image filesystem over budget",
                    extra={
                        "mountpoint": usage.mountpoint,
                        "usage": f"{usage.ratio:.1%}",
                        "max_usage": f"{self.max_usage:.0%}",
                        "images_bytes": usage.images_bytes,
                    },
                )
            self.blocked = reason
        elif self.blocked:
            self.blocked = ""
            log.info(
                "pulls resume: image filesystem within budget",
                extra={"usage": f"{usage.ratio:.1%}", "max_usage": f"{self.max_usage:.0%}"},
            )

    def _set_unknown(self, reason: str) -> None:
        # Fail open: without a reading, pulls go ahead (a paused state from before is lifted).
        self.usage = None
        metrics.DISK_BUDGET_EXCEEDED.set(0)
        if self.blocked:
            self.blocked = ""
        if not self._unknown:
            log.warning("disk budget not enforced: usage unknown", extra={"reason": reason})
        self._unknown = reason
