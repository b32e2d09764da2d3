"""A clock that survives the syncer's restarts and ignores steps of the wall clock.

The startup gate's timeout must continue across a restart of the syncer (its status entry says
since when the gate is closed), but the wall clock cannot measure that: at boot NTP may step it
by hours, and a node whose clock jumped forward would see its timeout expired at once. The
kernel's boot-time clock (``CLOCK_BOOTTIME``: seconds since boot, suspend included, never
stepped) is the same for every process of one boot, containers included; the boot id
(``/proc/sys/kernel/random/boot_id``) says whether two readings belong to the same boot.
Across a reboot nothing can be compared: the caller starts over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BootClock"]

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _read_boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""  # unknown: never equal to a recorded one, so nothing is resumed


def _since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class BootClock:
    """``boot_id`` names this boot ("" when unknown); ``now()`` is seconds since it."""

    boot_id: str = field(default_factory=_read_boot_id)
    now: Callable[[], float] = _since_boot

    def elapsed_since(self, boot_id: str, at: float | None) -> float | None:
        """Seconds since the reading ``at`` of boot ``boot_id``; None if not of this boot."""
        if not self.boot_id or boot_id != self.boot_id or at is None:
            return None
        return max(0.0, self.now() - at)
