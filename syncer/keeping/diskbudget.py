"""The disk budget: never pull an image into the kubelet's image garbage collector.

The kubelet deletes unused images once its image filesystem passes ``imageGCHighThresholdPercent``
(85% by default). A pre-pull that pushes the disk past it gets deleted again (or evicts an image
a game server is about to need), so a pull starts only if the image filesystem stays within
``--max-image-fs-usage`` (80% by default) once it is done. A skipped pull is not a failure: it is
retried by the next reconcile, and goes ahead once space frees.

When. The check that counts is made when a pull really starts, once it holds its node and
cluster slots (:meth:`DiskBudget.admit`): a check made while it queued would let a burst of queued
pulls all pass on the same reading. A cheap check before the queue (:meth:`DiskBudget.refuse`)
only spares a slot to a pull that cannot start anyway.

How much. A reading of the disk shows a pull only once it is done, so every admitted pull is
charged until it ends (then the disk is read again) with what it will add: its compressed size
from the registry's manifest (:mod:`syncer.keeping.manifestsize`), once for each of the content
store (compressed blobs) and the snapshotter (unpacked layers, at least as large) that live on that
filesystem. The manifest is read only once the room under the threshold is short (below a
quarter of the filesystem, :meth:`DiskBudget.room_is_short`): a registry may count the read
against its rate limit. A pull whose size is unknown is charged nothing of its own, and is
refused only when the disk with the pulls in flight is already at the threshold.

Paused. A refused pull pauses pulls (one ``pulls paused`` line). The state is re-evaluated on
its own at every reconcile (:meth:`DiskBudget.reevaluate`), not only when a pull asks: the disk
is read again, refusals of images no longer wanted or that fit now are dropped, and the status,
``disk_budget_exceeded`` and ``image_fs_usage_ratio`` follow the disk.

How full the disk is: :mod:`syncer.keeping.imagefs` (CRI ``ImageFsInfo`` and ``statvfs``).

When no usage can be known (no such path in the container, the runtime does not answer
ImageFsInfo) the budget does not block: it is a safety net, not a reason to stop pre-pulling.
One filesystem that cannot be read while another can does not lift the budget: the readable
ones are judged, and the unreadable one is named in one warning. Every change of state (over
budget, within budget, unknown) is one log line, not one per pull.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from syncer import metrics
from syncer.folding.references import ImageRef
from syncer.keeping.imagefs import FsInfo, FsUsage, ImageFs, Statvfs

__all__ = ["DEFAULT_MAX_USAGE", "DiskBudget", "FsUsage", "parse_percent"]

log = logging.getLogger(__name__)

DEFAULT_MAX_USAGE = 0.80
# Many pulls start at once after a reconcile: they share one reading this young.
_MAX_AGE = 1.0
# Below this much room under the threshold (a fraction of the filesystem), pulls are charged
# with their manifest size.
_SIZES_BELOW_ROOM = 0.25

# The compressed bytes a pull will write (from its manifest), None if unknown.
SizeOf = Callable[[], Awaitable[int | None]]


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


class DiskBudget:
    """Answers "may this pull start now?" from a recent reading and the pulls in flight."""

    def __init__(
        self,
        fs_info: FsInfo,
        *,
        max_usage: float = DEFAULT_MAX_USAGE,
        host_root: str = "",
        statvfs: Statvfs = os.statvfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fs = ImageFs(fs_info, host_root=host_root, statvfs=statvfs)
        self.max_usage = max_usage
        self._clock = clock
        self._lock = asyncio.Lock()
        self._read_at: float | None = None
        self.usage: FsUsage | None = None  # the fullest image filesystem at the last reading
        self._readings: list[FsUsage] = []
        self.blocked = ""  # why pulls are skipped now; empty while they may run
        self._unknown = ""
        self._unreadable: set[str] = set()  # paths warned about, while they stay unreadable
        # Admitted pulls not yet ended -> compressed bytes (0: size unknown).
        self._in_flight: dict[ImageRef, int] = {}
        # Images refused at their last admission -> their size, until they fit or go.
        self._refused: dict[ImageRef, int | None] = {}

    async def refuse(self) -> str:
        """Before a pull queues: why it cannot start now (the disk, with the pulls in flight,
        is at the threshold already), or "". The real check is :meth:`admit`."""
        async with self._lock:
            await self._recent_reading()
            reason = self._over(0)
        if reason:
            metrics.PULLS_SKIPPED.labels("disk_budget").inc()
            self._pause(reason)
        elif not self._refused:
            self._resume()
        return reason

    async def admit(self, image: ImageRef, size_of: SizeOf) -> str:
        """When a pull really starts: why it must not (the disk with the pulls in flight and
        its own size would pass the threshold), or "" and the pull is charged until
        :meth:`release`. ``size_of`` is asked only when the room is short."""
        async with self._lock:
            await self._recent_reading()
            size = await size_of() if self.room_is_short() else None
            reason = self._over(size or 0)
            if not reason:
                self._in_flight[image] = size or 0
                self._refused.pop(image, None)
        if reason:
            metrics.PULLS_SKIPPED.labels("disk_budget").inc()
            self._refused[image] = size
            self._pause(reason, image)
        elif not self._refused and not self._over(0):
            self._resume()
        return reason

    def room_is_short(self) -> bool:
        """Whether pulls should be charged with their size from the manifest: the room left
        under the threshold (with the pulls in flight) is less than a quarter of a filesystem.

        With more room than that, the few pulls that run at once cannot fill it (each is judged
        on the disk the ones before it left), and a manifest read is spared to the registry:
        Docker Hub counts every manifest GET against its pull rate limit."""
        charged = sum(self._in_flight.values())
        return any(
            self.max_usage - usage.ratio_with(charged) < _SIZES_BELOW_ROOM
            for usage in self._readings
        )

    def release(self, image: ImageRef) -> None:
        """An admitted pull ended: its bytes are on the disk (or not at all); read it again."""
        if self._in_flight.pop(image, None) is not None:
            self._read_at = None

    async def reevaluate(self, missing: Iterable[ImageRef]) -> None:
        """Every reconcile: read the disk again and decide the paused state from it, whether or
        not a pull asks. ``missing``: the desired images the node lacks; a refusal of any other
        image is forgotten, and so is one that fits now (its next pull is admitted)."""
        wanted = set(missing)
        async with self._lock:
            self._read_at = None
            await self._recent_reading()
            for image, size in list(self._refused.items()):
                if image not in wanted or not self._over(size or 0):
                    del self._refused[image]
            reason = self._over(0)
            if not reason and self._refused:
                image, size = next(iter(self._refused.items()))
                reason = self._over(size or 0)
        if reason:
            self._pause(reason)
        else:
            self._resume()

    def host_path(self, mountpoint: str) -> Path:
        """Where the host's ``mountpoint`` is seen from this process."""
        return self._fs.host_path(mountpoint)

    def _over(self, size: int) -> str:
        """Why the disk, with the pulls in flight and ``size`` more, is over budget; or ""."""
        if not self._readings:
            return ""  # unknown: fail open
        charged = sum(self._in_flight.values())
        for usage in self._readings:
            now = usage.ratio_with(charged)
            after = usage.ratio_with(charged + size)
            if now >= self.max_usage or (size and after > self.max_usage):
                return (
                    f"image filesystem {usage.describe()}, {after:.0%} with the pulls in "
                    f"flight{' and this one' if size else ''}: at or above "
                    f"--max-image-fs-usage {self.max_usage:.0%}: pulls wait for free space"
                )
        return ""

    async def _recent_reading(self) -> None:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= _MAX_AGE:
            self._read_at = now
            await self._read()

    async def _read(self) -> None:
        reading = await self._fs.read()
        self._warn_unreadable(reading.unreadable, bool(reading.usages))
        if not reading.usages:
            self._set_unknown(reading.failed)
            return
        self._readings = reading.usages
        fullest = max(self._readings, key=lambda u: u.ratio)
        self.usage = fullest
        metrics.IMAGE_FS_USAGE.set(fullest.ratio)
        if self._unknown:
            self._unknown = ""
            log.info("image filesystem usage known again", extra={"usage": fullest.describe()})

    def _warn_unreadable(self, reasons: list[str], others: bool) -> None:
        if others:
            for reason in sorted(set(reasons) - self._unreadable):
                log.warning(
                    "image filesystem unreadable, the budget judges the others",
                    extra={"reason": reason},
                )
        self._unreadable = set(reasons)

    def _pause(self, reason: str, image: ImageRef | None = None) -> None:
        metrics.DISK_BUDGET_EXCEEDED.set(1)
        if not self.blocked:
            usage = self.usage
            log.warning(
                "pulls paused: image filesystem over budget",
                extra={
                    "mountpoint": usage.mountpoint if usage else "",
                    "usage": f"{usage.ratio:.1%}" if usage else "",
                    "max_usage": f"{self.max_usage:.0%}",
                    "in_flight": len(self._in_flight),
                    "image": str(image) if image else "",
                    "images_bytes": usage.images_bytes if usage else 0,
                },
            )
        self.blocked = reason

    def _resume(self) -> None:
        metrics.DISK_BUDGET_EXCEEDED.set(0)
        if self.blocked:
            self.blocked = ""
            usage = self.usage
            log.info(
                "pulls resume: image filesystem within budget",
                extra={
                    "usage": f"{usage.ratio:.1%}" if usage else "unknown",
                    "max_usage": f"{self.max_usage:.0%}",
                },
            )

    def _set_unknown(self, reason: str) -> None:
        # Fail open: without a reading, pulls go ahead (a paused state from before is lifted).
        self.usage = None
        self._readings = []
        self._refused.clear()
        self._resume()
        if not self._unknown:
            log.warning("disk budget not enforced: usage unknown", extra={"reason": reason})
        self._unknown = reason
