"""How full the image filesystems are: what the disk budget (:mod:`syncer.keeping.diskbudget`)
judges.

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
the snapshotter), it is measured too, and the fuller of the two counts. On one filesystem, a
pull is charged for both.

A reading never raises: a runtime that does not answer, or paths this process cannot see, come
back as reasons (:class:`Reading`), and the budget decides what they mean.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from syncer import metrics
from syncer.runtime.cri import CriError, ImageFilesystem

__all__ = ["CONTENT_STORE", "FsInfo", "FsUsage", "ImageFs", "Reading", "Statvfs"]

FsInfo = Callable[[], Awaitable[list[ImageFilesystem]]]
Statvfs = Callable[[str], os.statvfs_result]

# containerd's content store, next to its snapshotters' directories under its root.
CONTENT_STORE = "io.containerd.content.v1.content"
_SNAPSHOTTER = "io.containerd.snapshotter.v1."


@dataclass(frozen=True)
class FsUsage:
    """One image filesystem: CRI's view (mount point, bytes images use) and statvfs's.

    ``stores``: how many of the places a pull writes to (the snapshotter's unpacked layers,
    containerd's content store) are on this filesystem: a pull's size is charged that often.
    """

    mountpoint: str
    images_bytes: int
    capacity: int
    available: int
    stores: int = 1
    device: int = 0  # st_dev: two paths on one filesystem share it

    @property
    def ratio(self) -> float:
        return (self.capacity - self.available) / self.capacity

    def describe(self) -> str:
        return f"{self.mountpoint} {self.ratio:.0%} used"

    def ratio_with(self, charged: int) -> float:
        """The usage once ``charged`` more compressed bytes are written to each store here."""
        return (self.capacity - self.available + charged * self.stores) / self.capacity


@dataclass(frozen=True)
class Reading:
    """One look at the image filesystems: each one read (once, however many stores it holds),
    why others could not be read, and, when none could, why."""

    usages: list[FsUsage]
    unreadable: list[str]
    failed: str = ""


class ImageFs:
    """Reads the runtime's image filesystems: CRI ``ImageFsInfo``, then ``statvfs`` of each
    (and of containerd's content store beside it) through ``host_root``."""

    def __init__(self, fs_info: FsInfo, *, host_root: str = "", statvfs: Statvfs = os.statvfs):
        self._fs_info = fs_info
        self._host_root = host_root
        self._statvfs = statvfs

    def host_path(self, mountpoint: str) -> Path:
        """Where the host's ``mountpoint`` is seen from this process."""
        if not self._host_root:
            return Path(mountpoint)
        return Path(self._host_root) / mountpoint.lstrip("/")

    async def read(self) -> Reading:
        try:
            filesystems = await self._fs_info()
        except CriError as e:
            metrics.CRI_ERRORS.labels("ImageFsInfo").inc()
            return Reading([], [], f"CRI ImageFsInfo failed: {e}")
        readings: dict[int, FsUsage] = {}
        unreadable = []
        for fs in filesystems:
            for mountpoint in (fs.mountpoint, *_content_store(fs.mountpoint)):
                usage = self._measure(mountpoint, fs.used_bytes)
                if isinstance(usage, str):
                    if mountpoint == fs.mountpoint:  # a content store may simply not exist
                        unreadable.append(usage)
                    continue
                seen = readings.get(usage.device)
                if seen is None:
                    readings[usage.device] = usage
                elif seen.mountpoint != usage.mountpoint:
                    readings[usage.device] = dataclasses.replace(seen, stores=seen.stores + 1)
        if readings:
            return Reading(list(readings.values()), unreadable)
        failed = unreadable[0] if unreadable else "the runtime reports no image filesystem"
        return Reading([], unreadable, failed)

    def _measure(self, mountpoint: str, images_bytes: int) -> FsUsage | str:
        path = self.host_path(mountpoint)
        try:
            stat = self._statvfs(str(path))
            device = os.stat(path).st_dev
        except OSError as e:
            hint = "" if self._host_root else " (set --host-root to a read-only host mount)"
            return f"cannot statvfs {path}: {e.strerror or e}{hint}"
        capacity = stat.f_blocks * stat.f_frsize
        if capacity <= 0:
            return f"{path} reports no capacity"
        return FsUsage(
            mountpoint=mountpoint,
            images_bytes=images_bytes,
            capacity=capacity,
            available=stat.f_bavail * stat.f_frsize,
            device=device,
        )


def _content_store(mountpoint: str) -> tuple[str, ...]:
    """containerd's content store when ``mountpoint`` is one of its snapshotters' directories."""
    path = Path(mountpoint)
    if path.name.startswith(_SNAPSHOTTER):
        return (str(path.parent / CONTENT_STORE),)
    return ()
