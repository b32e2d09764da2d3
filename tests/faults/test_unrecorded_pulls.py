"""Pulls the ledger could not record survive a crash as a label on the image in containerd.

The chaos soak's finding: with NATS unreachable at the pull itself, both records of a pull (before
and after it) time out, the syncer is SIGKILLed, and after the restart no record owns the image:
``--remove-unused`` never removes it. Real containerd and NATS; the crashed syncer's ledger is a
closed NATS connection (every write fails), and the crash is the syncer simply abandoned.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

import nats.errors
import pytest
from nats.js import JetStreamContext
from support import polling

from image_syncer.sandbox.images import push_image
from image_syncer.sandbox.registry import Registry
from syncer.folding.references import normalize
from syncer.keeping.cleaner import BUCKET
from syncer.keeping.ledger import record_key
from syncer.keeping.unusedimages import UNRECORDED_LABEL, UnrecordedLabels, UnusedImages
from syncer.pulling.puller import PullResult
from syncer.runtime.containerd_images import ContainerdImages
from syncer.runtime.cri import CriClient
from wire.natsconn import NatsSettings, connect
from wire.permissions import bucket_for

pytestmark = pytest.mark.cri

NODE = "node-a.example"


@pytest.fixture
async def cut_off(nats_settings: NatsSettings) -> JetStreamContext:
    """A JetStream context whose every request fails: the node cannot reach NATS."""
    client = await connect(nats_settings, name="cut off")
    await client.close()
    return client.jetstream()


async def test_a_pull_nats_never_recorded_is_removed_after_a_crash_and_restart(
    cri: CriClient,
    images: ContainerdImages,
    js: JetStreamContext,
    cut_off: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
) -> None:
    def cleanup(ledger: JetStreamContext) -> UnusedImages:
        return UnusedImages(
            ledger,
            NODE,
            cri.remove_image,
            grace=0.0,
            prefix=prefix,
            labels=lambda: UnrecordedLabels(images, NODE),
        )

    ref = push()
    image = normalize(ref)
    crashed = cleanup(cut_off)
    await crashed.before_pull(image)  # fails: NATS unreachable
    image_id = await cri.pull_image(ref, timeout=60)
    crashed.on_pull_result(PullResult(image, ok=True, ref=image_id))

    async def labelled() -> bool:
        record = await images.get(str(image))
        return record is not None and record.labels.get(UNRECORDED_LABEL) == NODE

    await polling.eventually(labelled, f"{image} labelled {UNRECORDED_LABEL}={NODE}")
    # ... and the syncer is killed here: its in-memory record is gone with it.

    restarted = cleanup(js)  # NATS is back; no Fleet wants the image any more

    async def removed() -> bool:
        await restarted.after_list([], await cri.list_images())
        return await images.get(str(image)) is None

    await polling.eventually(removed, f"{image} removed by --remove-unused after the restart")


async def test_a_pull_recorded_in_nats_is_not_labelled(
    cri: CriClient,
    images: ContainerdImages,
    js: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
) -> None:
    unused = UnusedImages(
        js,
        NODE,
        cri.remove_image,
        grace=0.0,
        prefix=prefix,
        labels=lambda: UnrecordedLabels(images, NODE),
    )
    ref = push()
    image = normalize(ref)
    await unused.before_pull(image)
    image_id = await cri.pull_image(ref, timeout=60)
    unused.on_pull_result(PullResult(image, ok=True, ref=image_id))
    await unused.after_list([image], await cri.list_images())
    record = await images.get(str(image))
    assert record is not None
    assert UNRECORDED_LABEL not in record.labels


async def test_an_unrecorded_pull_of_a_tag_and_digest_is_labelled_on_the_name_containerd_keeps(
    cri: CriClient,
    images: ContainerdImages,
    js: JetStreamContext,
    cut_off: JetStreamContext,
    prefix: str,
    registry: Registry,
) -> None:
    # Digest-pinned Fleet images are written "name:tag@sha256:...". containerd 1.6's CRI plugin
    # drops the tag of such a reference (docker.ParseDockerRef) and keeps only "name@digest":
    # a label set on the reference as written finds no record (NOT_FOUND).
    repository = f"test/img-{uuid.uuid4().hex[:12]}"
    digest = push_image(registry.address, repository, "v1")
    name = f"{registry.address}/{repository}"
    image = normalize(f"{name}:v1@{digest}")
    crashed = UnusedImages(
        cut_off,
        NODE,
        cri.remove_image,
        grace=0.0,
        prefix=prefix,
        labels=lambda: UnrecordedLabels(images, NODE),
    )
    await crashed.before_pull(image)  # fails: NATS unreachable
    image_id = await cri.pull_image(str(image), timeout=60)
    assert await images.get(str(image)) is None
    assert await images.get(f"{name}@{digest}") is not None
    crashed.on_pull_result(PullResult(image, ok=True, ref=image_id))

    async def labelled() -> bool:
        record = await images.get(f"{name}@{digest}")
        return record is not None and record.labels.get(UNRECORDED_LABEL) == NODE

    await polling.eventually(labelled, f"{name}@{digest} labelled {UNRECORDED_LABEL}={NODE}")
    # ... the syncer is killed; restarted with NATS back, no Fleet wants the image any more.
    restarted = UnusedImages(
        js,
        NODE,
        cri.remove_image,
        grace=0.0,
        prefix=prefix,
        labels=lambda: UnrecordedLabels(images, NODE),
    )

    async def removed() -> bool:
        await restarted.after_list([], await cri.list_images())
        return await images.get(f"{name}@{digest}") is None

    await polling.eventually(removed, f"{image} removed by --remove-unused after the restart")


async def test_a_record_made_before_a_long_pull_is_kept_while_the_pull_runs(
    cri: CriClient,
    images: ContainerdImages,
    js: JetStreamContext,
    nats_settings: NatsSettings,
    prefix: str,
    push: Callable[..., str],
) -> None:
    # The chaos soak's "image not removed" after syncer kills: a Fleet rolled to another image
    # while the old one's pull ran (a slow link); cleanup cycles saw that image absent and
    # forgot the record made before the pull; the pull then ended with NATS cut off, the syncer
    # was killed, and after its restart no record owned the image.
    def cleanup(ledger: JetStreamContext) -> UnusedImages:
        return UnusedImages(
            ledger,
            NODE,
            cri.remove_image,
            grace=0.0,
            prefix=prefix,
            labels=lambda: UnrecordedLabels(images, NODE),
        )

    client = await connect(nats_settings, name=NODE)
    crashed = cleanup(client.jetstream())
    ref = push()
    image = normalize(ref)
    await crashed.before_pull(image)
    # The Fleet moved on; the pull has not ended: three cycles list the image absent.
    for _ in range(3):
        await crashed.after_list([], await cri.list_images())
    kv = await js.key_value(bucket_for(BUCKET, prefix))
    entry = await kv.get(record_key(NODE, str(image)))
    assert entry.value, "the record of a pull under way was forgotten as gone"
    image_id = await cri.pull_image(ref, timeout=60)
    await client.close()  # NATS cut off as the pull ends
    crashed.on_pull_result(PullResult(image, ok=True, ref=image_id))
    # ... and the syncer is killed. Restarted, NATS back, no Fleet wants the image.
    restarted = cleanup(js)

    async def removed() -> bool:
        await restarted.after_list([], await cri.list_images())
        return await images.get(str(image)) is None

    await polling.eventually(removed, f"{image} removed by --remove-unused after the restart")


class FailingWrites:
    """A JetStream context whose publishes (the ledger's writes) fail while ``down`` is set."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.down = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise nats.errors.TimeoutError
        return await self._js.publish(*args, **kwargs)


async def test_labelled_pulls_left_when_nats_failed_midway_are_adopted_at_the_next_pass(
    cri: CriClient,
    images: ContainerdImages,
    js: JetStreamContext,
    cut_off: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
) -> None:
    # The seed-7 soak after syncer kills: two pulls labelled unrecorded; the restarted syncer
    # adopted the first, NATS timed out on the second, and no later pass adopted it (only a new
    # unrecorded pull of that process would have): never recorded, never removed.
    crashed = UnusedImages(
        cut_off,
        NODE,
        cri.remove_image,
        grace=0.0,
        prefix=prefix,
        labels=lambda: UnrecordedLabels(images, NODE),
    )
    refs = sorted(push() for _ in range(2))
    for ref in refs:
        await crashed.before_pull(normalize(ref))  # fails: NATS unreachable
        image_id = await cri.pull_image(ref, timeout=60)
        crashed.on_pull_result(PullResult(normalize(ref), ok=True, ref=image_id))

    async def labelled(ref: str) -> bool:
        record = await images.get(ref)
        return record is not None and record.labels.get(UNRECORDED_LABEL) == NODE

    for ref in refs:
        await polling.eventually(functools.partial(labelled, ref), f"{ref} labelled")
    # ... the syncer is killed and restarted; NATS fails right after the first adoption.
    writes = FailingWrites(js)
    unmarked: list[str] = []

    class CutAfterFirst(UnrecordedLabels):
        async def unmark(self, name: str) -> None:
            await super().unmark(name)
            unmarked.append(name)
            writes.down = len(unmarked) == 1

    restarted = UnusedImages(
        writes,  # type: ignore[arg-type]
        NODE,
        cri.remove_image,
        grace=0.0,
        prefix=prefix,
        labels=lambda: CutAfterFirst(images, NODE),
    )
    await restarted.after_list([], await cri.list_images())
    assert not await labelled(refs[0]) and await labelled(refs[1])
    writes.down = False  # NATS is back

    async def removed() -> bool:
        await restarted.after_list([], await cri.list_images())
        return all([await images.get(ref) is None for ref in refs])

    await polling.eventually(removed, "both images removed by --remove-unused")
