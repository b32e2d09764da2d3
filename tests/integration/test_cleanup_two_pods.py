"""``--remove-unused`` across the two syncer pods of one node (a DaemonSet rollout).

Both pods run for a moment, each with the node's pulled-image records it loaded in memory. The
new pod loaded before the old pod's last pull: the record of that pull is written to the bucket,
never to the new pod's memory, and once the old pod is gone the new pod alone decides what goes.
Real NATS, containerd and registry; each pod is the syncer's own cleanup wiring, fed the
runtime's ListImages as a reconcile feeds it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nats.js import JetStreamContext

from syncer.folding.references import ImageRef, normalize
from syncer.keeping.cleaner import BUCKET
from syncer.keeping.ledger import FENCE
from syncer.keeping.unusedimages import UnrecordedLabels, UnusedImages
from syncer.pulling.puller import PullResult
from syncer.runtime.containerd_images import ContainerdImages
from syncer.runtime.cri import CriClient
from wire.permissions import bucket_for

pytestmark = pytest.mark.cri


@pytest.fixture
def node(prefix: str) -> str:
    # The containerd is shared by the session: a node of its own keeps the records apart.
    return f"node-{prefix.lower()}.example"


@pytest.fixture
def pod(
    js: JetStreamContext, prefix: str, node: str, cri: CriClient, images: ContainerdImages
) -> Callable[[], UnusedImages]:
    def make() -> UnusedImages:
        return UnusedImages(
            js,
            node,
            cri.remove_image,
            grace=0.0,
            prefix=prefix,
            labels=lambda: UnrecordedLabels(images, node),
        )

    return make


async def pull_as(pod: UnusedImages, cri: CriClient, ref: str) -> ImageRef:
    """What the syncer does for a missing image: record, pull, record again."""
    image = normalize(ref)
    await pod.before_pull(image)
    image_id = await cri.pull_image(ref, timeout=60)
    pod.on_pull_result(PullResult(image, ok=True, ref=image_id))
    return image


async def test_an_image_the_old_pod_pulled_after_the_new_pod_loaded_is_removed_by_the_new_pod(
    pod: Callable[[], UnusedImages],
    cri: CriClient,
    images: ContainerdImages,
    push: Callable[..., str],
) -> None:
    x, y, foreign = push(), push(), push()
    # On the node, pulled by no syncer (the kubelet, an operator): never ours to remove.
    await cri.pull_image(foreign, timeout=60)
    new, old = pod(), pod()
    # The new pod starts and loads the node's records: X is not among them yet.
    await new.after_list([], await cri.list_images())
    # The old pod, in its last moments, pulls X for the Fleet and records it; then it stops.
    image_x = await pull_as(old, cri, x)
    await old.after_list([image_x], await cri.list_images())
    # The new pod meets X present and wanted: nothing to pull, so it writes no record of it.
    await new.after_list([image_x], await cri.list_images())
    assert await images.get(str(image_x)) is not None
    # The Fleet rolls to Y (the new pod pulls it); X is wanted by no Fleet any more.
    image_y = await pull_as(new, cri, y)
    await new.after_list([image_y], await cri.list_images())

    assert await images.get(str(image_x)) is None, "X pulled by the old pod is left on the node"
    assert await images.get(str(image_y)) is not None
    assert await images.get(str(normalize(foreign))) is not None, "an image no syncer pulled"


async def test_an_idle_node_reads_its_records_again_only_when_an_image_becomes_unwanted(
    js: JetStreamContext,
    prefix: str,
    node: str,
    pod: Callable[[], UnusedImages],
    cri: CriClient,
    push: Callable[..., str],
) -> None:
    async def fence() -> int:
        # Each read of the node's records writes its fence key first: its revision counts them.
        kv = await js.key_value(bucket_for(BUCKET, prefix))
        return (await kv.get(f"{node}.{FENCE}")).revision or 0

    x, foreign = push(), push()
    await cri.pull_image(foreign, timeout=60)  # unwanted and not ours, on every pass below
    syncer = pod()
    image_x = await pull_as(syncer, cri, x)
    await syncer.after_list([image_x], await cri.list_images())
    await syncer.after_list([image_x], await cri.list_images())
    idle = await fence()
    for _ in range(5):
        await syncer.after_list([image_x], await cri.list_images())
    assert await fence() == idle, "an idle node read its records again"
    # X becomes unwanted: ours, so removed without reading anything again.
    await syncer.after_list([], await cri.list_images())
    assert await cri.image_status(x) is None
    assert await fence() == idle
