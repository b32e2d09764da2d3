"""The disk budget reads a real containerd's image filesystem (root on a small tmpfs)."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from support.tmpfs import fill_to, tmpfs, tmpfs_containerd

from image_syncer.sandbox.containerd import Containerd
from syncer.folding.references import normalize
from syncer.keeping.diskbudget import DiskBudget, parse_percent
from syncer.runtime.cri import CriClient, ImageFilesystem

pytestmark = pytest.mark.cri

# containerd's content store directory under its root (containerd's plugin id, not ours).
CONTENT_STORE = "io.containerd.content.v1.content"


@pytest.fixture
def small_containerd(tmp_path: Path) -> Iterator[Containerd]:
    with tmpfs_containerd(tmp_path / "ctrd") as runtime:
        yield runtime


@pytest.fixture
async def cri(small_containerd: Containerd) -> AsyncIterator[CriClient]:
    client = CriClient(small_containerd.endpoint)
    yield client
    await client.close()


def always_fresh() -> itertools.count[float]:
    # Each call is a second later: every refuse() takes a new reading.
    return itertools.count(0.0, 10.0)


def skipped() -> float:
    value = REGISTRY.get_sample_value(
        "image_syncer_syncer_pulls_skipped_total", {"reason": "disk_budget"}
    )
    return value or 0.0


async def test_usage_is_that_of_the_filesystem_the_runtime_names(
    cri: CriClient, small_containerd: Containerd
) -> None:
    budget = DiskBudget(cri.image_fs_info, max_usage=0.8)

    assert await budget.refuse() == ""

    assert budget.usage is not None
    assert budget.usage.mountpoint.startswith(str(small_containerd.state_dir / "root"))
    assert budget.usage.capacity == 128 * 1024 * 1024
    assert budget.usage.ratio < 0.8


async def test_pulls_are_refused_at_the_threshold_and_allowed_once_space_frees(
    cri: CriClient, small_containerd: Containerd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="syncer.keeping.diskbudget")
    clock = always_fresh()
    budget = DiskBudget(cri.image_fs_info, max_usage=0.8, clock=lambda: next(clock))
    ballast = fill_to(small_containerd.state_dir / "root", 0.9)
    before = skipped()

    first = await budget.refuse()
    second = await budget.refuse()

    assert "at or above --max-image-fs-usage 80%" in first
    assert second == first
    assert skipped() == before + 2
    paused = [r for r in caplog.records if r.getMessage().startswith("pulls paused")]
    assert len(paused) == 1  # once per transition, not once per pull

    os.remove(ballast)

    assert await budget.refuse() == ""
    assert [r for r in caplog.records if r.getMessage().startswith("pulls resume")]
    assert REGISTRY.get_sample_value("image_syncer_syncer_disk_budget_exceeded") == 0


async def test_a_content_store_on_its_own_filesystem_counts_too(
    tmp_path: Path, push: Callable[..., str]
) -> None:
    # Snapshots on one filesystem, the content store (where a node-local cache such as Spegel
    # serves kept layers from) on another: ImageFsInfo names only the first.
    root = tmp_path / "ctrd" / "root"
    with (
        tmpfs(root, "128m"),
        tmpfs(root / CONTENT_STORE, "32m"),
        Containerd(tmp_path / "ctrd") as runtime,
    ):
        client = CriClient(runtime.endpoint)
        try:
            await client.pull_image(push(layer_bytes=1024 * 1024), timeout=60)
            clock = always_fresh()
            budget = DiskBudget(client.image_fs_info, max_usage=0.8, clock=lambda: next(clock))
            assert await budget.refuse() == ""
            (snapshots,) = [fs.mountpoint for fs in await client.image_fs_info()]
            assert not snapshots.startswith(str(root / CONTENT_STORE))
            ballast = fill_to(root / CONTENT_STORE, 0.9)

            refused = await budget.refuse()

            assert CONTENT_STORE in refused and "at or above" in refused
            os.remove(ballast)
            assert await budget.refuse() == ""
        finally:
            await client.close()


async def test_host_root_maps_the_runtimes_mount_point_into_this_container(
    cri: CriClient, tmp_path: Path
) -> None:
    (mountpoint,) = [fs.mountpoint for fs in await cri.image_fs_info()]
    # /host/<mount point> as a DaemonSet's read-only hostPath mount would show it.
    host_root = tmp_path / "host"
    seen = host_root / mountpoint.lstrip("/")
    seen.parent.mkdir(parents=True)
    seen.symlink_to(mountpoint)
    direct = DiskBudget(cri.image_fs_info)
    mapped = DiskBudget(cri.image_fs_info, host_root=str(host_root))

    await direct.refuse()
    await mapped.refuse()

    assert mapped.host_path(mountpoint) == seen
    assert mapped.usage is not None
    assert direct.usage is not None
    assert mapped.usage.capacity == direct.usage.capacity


async def test_an_unreadable_filesystem_does_not_block_pulls_and_is_logged_once(
    cri: CriClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = always_fresh()
    budget = DiskBudget(
        cri.image_fs_info, host_root=str(tmp_path / "no-host"), clock=lambda: next(clock)
    )

    assert await budget.refuse() == ""
    assert await budget.refuse() == ""

    unknown = [r for r in caplog.records if r.getMessage().startswith("disk budget not enforced")]
    assert len(unknown) == 1
    assert "cannot statvfs" in unknown[0].reason  # type: ignore[attr-defined]


async def test_one_unreadable_filesystem_does_not_lift_the_budget_of_the_others(
    cri: CriClient, small_containerd: Containerd, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23: the first filesystem that could not be read made the whole budget fail open."""
    ballast = fill_to(small_containerd.state_dir / "root", 0.9)

    async def with_a_vanished_one() -> list[ImageFilesystem]:
        gone = ImageFilesystem("/nonexistent/image-fs", 0, 0, 0)
        return [gone, *await cri.image_fs_info()]

    clock = always_fresh()
    budget = DiskBudget(with_a_vanished_one, max_usage=0.8, clock=lambda: next(clock))

    assert "at or above --max-image-fs-usage 80%" in await budget.refuse()
    assert "at or above --max-image-fs-usage 80%" in await budget.refuse()
    warned = [r for r in caplog.records if r.getMessage().startswith("image filesystem unreadable")]
    assert len(warned) == 1 and "/nonexistent/image-fs" in warned[0].reason  # type: ignore[attr-defined]

    os.remove(ballast)
    assert await budget.refuse() == ""


async def test_a_pull_is_charged_until_it_ends(
    cri: CriClient, small_containerd: Containerd
) -> None:
    """What a pull will add counts from its start: two pulls admitted together cannot both
    take the last room (the disk shows neither until it is done)."""
    fill_to(small_containerd.state_dir / "root", 0.6)
    budget = DiskBudget(cri.image_fs_info, max_usage=0.8)
    await budget.refuse()
    assert budget.usage is not None
    room = int((0.8 - budget.usage.ratio) * budget.usage.capacity)
    # containerd's content store and snapshots share the tmpfs: a size is charged twice.
    size = room // 2 - 1024 * 1024
    first, second = (normalize(f"registry.example/img{i}:v1") for i in range(2))

    async def size_of() -> int:
        return size

    assert budget.room_is_short()  # 20% left under the threshold: sizes count
    assert await budget.admit(first, size_of) == ""
    assert "with the pulls in flight and this one" in await budget.admit(second, size_of)

    budget.release(first)  # it failed: nothing of it on the disk
    assert await budget.admit(second, size_of) == ""


@pytest.mark.parametrize(("text", "ratio"), [("80%", 0.8), ("80", 0.8), (" 95.5% ", 0.955)])
def test_percentages_parse(text: str, ratio: float) -> None:
    assert parse_percent(text) == pytest.approx(ratio)


@pytest.mark.parametrize("text", ["0%", "101%", "eighty", ""])
def test_bad_percentages_are_refused_with_the_value(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace("(", r"\(")):
        parse_percent(text)


def test_the_flag_refuses_a_bad_percentage_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "image_syncer", "syncer"],
        env={**os.environ, "MAX_IMAGE_FS_USAGE": "101%", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "'101%' must be above 0% and at most 100%" in result.stderr
    assert result.stderr.count("\n") == 1
