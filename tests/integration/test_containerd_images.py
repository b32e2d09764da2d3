"""containerd's native images service against a real containerd: names of an image, its labels."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from image_syncer.sandbox.containerd import Containerd
from syncer.runtime.containerd_images import PIN_LABEL, PIN_VALUE, ContainerdImages
from syncer.runtime.cri import CriClient

pytestmark = pytest.mark.cri


def ctr_labels(containerd: Containerd, name: str) -> str:
    """The LABELS column of ``ctr -n k8s.io images ls`` for ``name``, as an operator sees it."""
    for row in containerd.ctr("images", "ls", f"name=={name}").stdout.splitlines()[1:]:
        if row.split()[0] == name:
            return row.split()[-1]
    raise AssertionError(f"ctr does not list {name}")


async def test_every_name_of_a_pulled_image_points_at_one_target(
    cri: CriClient, images: ContainerdImages, push: Callable[..., str]
) -> None:
    ref = push()
    image_id = await cri.pull_image(ref, timeout=60)

    records = await images.names_of(ref)

    names = {r.name for r in records}
    assert ref in names
    assert image_id in names
    assert any("@sha256:" in name for name in names)
    assert len({r.digest for r in records}) == 1


async def test_a_label_set_and_removed_shows_in_ctr_and_keeps_other_labels(
    cri: CriClient, images: ContainerdImages, containerd: Containerd, push: Callable[..., str]
) -> None:
    ref = push()
    await cri.pull_image(ref, timeout=60)
    before = await images.get(ref)
    assert before is not None
    assert not before.pinned

    await images.set_label(ref, PIN_LABEL, PIN_VALUE)

    pinned = await images.get(ref)
    assert pinned is not None
    assert pinned.pinned
    # CRI's own label (the managed marker) survives the masked update.
    assert set(before.labels) <= set(pinned.labels)
    assert f"{PIN_LABEL}={PIN_VALUE}" in ctr_labels(containerd, ref)

    await images.remove_label(ref, PIN_LABEL)

    after = await images.get(ref)
    assert after is not None
    assert dict(after.labels) == dict(before.labels)
    assert PIN_LABEL not in ctr_labels(containerd, ref)


async def test_an_absent_image_has_no_record_and_no_names(images: ContainerdImages) -> None:
    assert await images.get("127.0.0.1:1/never/pulled:v1") is None
    assert await images.names_of("127.0.0.1:1/never/pulled:v1") == []
