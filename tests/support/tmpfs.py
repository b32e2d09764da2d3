"""A containerd whose root lives on a small tmpfs: a full image filesystem on demand.

Root can mount a size-limited tmpfs; the tests fill it past a threshold with a file and free it
again. The mount is always undone in teardown, even when the test failed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from image_syncer.sandbox.containerd import Containerd

__all__ = ["fill_to", "tmpfs", "tmpfs_containerd"]


@contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise RuntimeError("mounting a tmpfs needs root: run the disk-budget tests as root")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@contextmanager
def tmpfs_containerd(state_dir: Path, size: str = "128m") -> Iterator[Containerd]:
    """A containerd with ``root`` (content store and snapshots) on a tmpfs of ``size``."""
    with tmpfs(state_dir / "root", size), Containerd(state_dir) as runtime:
        yield runtime


def fill_to(directory: Path, ratio: float, name: str = "ballast") -> Path:
    """Write a file into ``directory`` until its filesystem is ``ratio`` full; returns the file."""
    stat = os.statvfs(directory)
    capacity = stat.f_blocks * stat.f_frsize
    used = capacity - stat.f_bavail * stat.f_frsize
    needed = int(capacity * ratio) - used
    path = directory / name
    with path.open("wb") as f:
        if needed > 0:
            os.posix_fallocate(f.fileno(), 0, needed)
    return path
