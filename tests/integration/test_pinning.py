"""Pinning on a real containerd with the ledger in a real JetStream KV bucket.

Labels are checked through containerd itself (``ctr -n k8s.io images ls``), because Debian's
containerd 1.6 sets the label but does not report ``pinned`` back through CRI.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from support.polling import eventually

from image_syncer.sandbox.containerd import Containerd
from syncer.folding.references import ImageRef, PresentImages, normalize
from syncer.keeping.ledger import record_key
from syncer.keeping.pinledger import BUCKET, PinLedger
from syncer.keeping.pinning import Pinner
from syncer.keeping.pinsupport import pinning_support
from syncer.runtime.containerd_images import PIN_LABEL, PIN_VALUE, ContainerdImages
from syncer.runtime.cri import CriClient, RuntimeUnavailable, RuntimeVersion
from wire.permissions import bucket_for

pytestmark = pytest.mark.cri

PINNED = f"{PIN_LABEL}={PIN_VALUE}"


@pytest.fixture
def node(prefix: str) -> str:
    """This test's node: containerd is shared by the session, and a syncer releases the pins
    of its node that its ledger does not record (a previous test's, under another bucket)."""
    return f"node-a.{prefix}.example"


@pytest.fixture
def make_pinner(
    images: ContainerdImages, js: JetStreamContext, prefix: str, node: str
) -> Callable[..., Pinner]:
    def make(name: str = node) -> Pinner:
        return Pinner(images, js, name, bucket=bucket_for(BUCKET, prefix))

    return make


def labels_by_name(containerd: Containerd) -> dict[str, str]:
    """Each image name in k8s.io -> its LABELS column, as ``ctr images ls`` prints it."""
    rows = containerd.ctr("images", "ls").stdout.splitlines()[1:]
    return {row.split()[0]: row.split()[-1] for row in rows if row.strip()}


def names_of(containerd: Containerd, ref: str) -> set[str]:
    targets = containerd.image_targets()
    return {name for name, target in targets.items() if target == targets[ref]}


def pinned_names(containerd: Containerd, ref: str) -> set[str]:
    labels = labels_by_name(containerd)
    return {name for name in names_of(containerd, ref) if PINNED in labels[name]}


async def present(cri: CriClient) -> PresentImages:
    return PresentImages.of(await cri.list_images())


async def pulled(cri: CriClient, push: Callable[..., str]) -> tuple[str, ImageRef]:
    ref = push()
    await cri.pull_image(ref, timeout=60)
    return ref, normalize(ref)


async def test_a_pulled_image_is_pinned_on_every_name_and_unpinned_when_unwanted(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, image = await pulled(cri, push)
    pinner = make_pinner()

    pinner.on_pulled(image)
    assert await pinner.close(patience=60.0) == []

    assert pinned_names(containerd, ref) == names_of(containerd, ref)
    assert len(names_of(containerd, ref)) == 3  # tag, repo digest, image id
    assert pinner.pinned([image]) == 1

    await pinner.sync(wanted=[], present=await present(cri))

    assert pinned_names(containerd, ref) == set()
    assert pinner.pinned([image]) == 0


async def test_someone_elses_pin_is_kept(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, image = await pulled(cri, push)
    # An operator pinned the tag by hand before the syncer got to it.
    containerd.ctr("images", "label", ref, PINNED)
    pinner = make_pinner()

    await pinner.sync(wanted=[image], present=await present(cri))

    assert pinned_names(containerd, ref) == names_of(containerd, ref)
    assert pinner.pinned([image]) == 1

    await pinner.sync(wanted=[], present=await present(cri))

    assert pinned_names(containerd, ref) == {ref}


async def test_an_image_pinned_entirely_by_someone_else_counts_and_stays(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, image = await pulled(cri, push)
    for name in names_of(containerd, ref):
        containerd.ctr("images", "label", name, PINNED)
    pinner = make_pinner()

    await pinner.sync(wanted=[image], present=await present(cri))
    assert pinner.pinned([image]) == 1
    await pinner.sync(wanted=[], present=await present(cri))

    assert pinned_names(containerd, ref) == names_of(containerd, ref)


async def test_the_ledger_survives_a_restart(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, image = await pulled(cri, push)
    first = make_pinner()
    await first.sync(wanted=[image], present=await present(cri))
    assert pinned_names(containerd, ref) == names_of(containerd, ref)

    restarted = make_pinner()
    await restarted.sync(wanted=[], present=await present(cri))

    assert pinned_names(containerd, ref) == set()


async def test_ledgers_are_per_node(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, image = await pulled(cri, push)
    await make_pinner().sync(wanted=[image], present=await present(cri))

    # Another node's syncer never pinned this image here: it has nothing to unpin.
    await make_pinner("node-b.example").sync(wanted=[], present=await present(cri))

    assert pinned_names(containerd, ref) == names_of(containerd, ref)


async def test_a_tag_and_its_digest_share_names_until_both_are_unwanted(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, tagged = await pulled(cri, push)
    digest_name = next(n for n in names_of(containerd, ref) if "@sha256:" in n)
    by_digest = normalize(digest_name)
    pinner = make_pinner()
    await pinner.sync(wanted=[tagged, by_digest], present=await present(cri))

    await pinner.sync(wanted=[by_digest], present=await present(cri))

    assert pinned_names(containerd, ref) == names_of(containerd, ref)
    await pinner.sync(wanted=[], present=await present(cri))
    assert pinned_names(containerd, ref) == set()


async def test_release_unpins_before_a_removal(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, image = await pulled(cri, push)
    pinner = make_pinner()
    await pinner.sync(wanted=[image], present=await present(cri))

    await pinner.release(ref)

    assert pinned_names(containerd, ref) == set()


async def test_an_image_removed_and_pulled_again_is_pinned_again(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    ref, image = await pulled(cri, push)
    pinner = make_pinner()
    await pinner.sync(wanted=[image], present=await present(cri))
    containerd.remove_image(ref)
    await pinner.sync(wanted=[image], present=await present(cri))
    assert pinner.pinned([image]) == 0

    await cri.pull_image(ref, timeout=60)
    await pinner.sync(wanted=[image], present=await present(cri))

    assert pinned_names(containerd, ref) == names_of(containerd, ref)


async def test_an_image_removed_by_someone_else_is_simply_forgotten(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
    js: JetStreamContext,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    node: str,
) -> None:
    ref, image = await pulled(cri, push)
    pinner = make_pinner()
    await pinner.sync(wanted=[image], present=await present(cri))
    containerd.remove_image(ref)

    await pinner.sync(wanted=[], present=await present(cri))

    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    ledger = await PinLedger.open(js, node, bucket=bucket_for(BUCKET, prefix))
    assert ledger.names == {}


# --- two syncer pods of one node, and the ledger's lifetime -----------------------------------


async def test_two_syncer_pods_of_one_node_never_leave_a_pin_without_a_record(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
) -> None:
    # A DaemonSet rollout: the new pod loaded the (empty) ledger before the old pod pinned.
    ref, image = await pulled(cri, push)
    new = make_pinner()
    await new.sync(wanted=[], present=await present(cri))
    old = make_pinner()
    old.on_pulled(image)
    assert await old.close(patience=60.0) == []
    assert pinned_names(containerd, ref) == names_of(containerd, ref)
    # The new pod meets the names pinned: they are in the record, so they are ours.
    await new.sync(wanted=[image], present=await present(cri))
    # The old pod is gone; the Fleet goes: the new pod must take the pins back.
    await new.sync(wanted=[], present=await present(cri))
    assert pinned_names(containerd, ref) == set(), "a pin of ours stayed with no record"


async def test_a_pod_never_erases_names_another_pod_of_its_node_recorded(
    cri: CriClient,
    containerd: Containerd,
    make_pinner: Callable[..., Pinner],
    push: Callable[..., str],
    js: JetStreamContext,
    prefix: str,
    node: str,
) -> None:
    ref, image = await pulled(cri, push)
    first, second = make_pinner(), make_pinner()
    await first.sync(wanted=[], present=await present(cri))
    await second.sync(wanted=[], present=await present(cri))
    first.on_pulled(image)
    assert await first.close(patience=60.0) == []
    # The image gets one more name, which the second pod pins: its record of the image must
    # keep the names the first pod recorded (its memory knows none of them).
    containerd.ctr("images", "tag", ref, f"{ref}-also")
    containerd.ctr("images", "label", f"{ref}-also", f"{PIN_LABEL}=")  # tag copies labels
    assert pinned_names(containerd, ref) == names_of(containerd, ref) - {f"{ref}-also"}
    second.on_pulled(image)
    assert await second.close(patience=60.0) == []
    assert pinned_names(containerd, ref) == names_of(containerd, ref)
    restarted = await PinLedger.open(js, node, bucket=bucket_for(BUCKET, prefix))
    assert restarted.names[str(image)] == names_of(containerd, ref), "a pod erased the other's"


async def test_pin_records_expire_unless_their_node_renews_them(
    cri: CriClient,
    containerd: Containerd,
    images: ContainerdImages,
    js: JetStreamContext,
    push: Callable[..., str],
) -> None:
    bucket = f"PINNED_TTL_{uuid.uuid4().hex[:8]}"
    _, image = await pulled(cri, push)
    live = Pinner(images, js, "node-live", bucket=bucket, ttl=2.0)
    await live.sync(wanted=[image], present=await present(cri))
    kv = await js.key_value(bucket)
    gone_key = record_key("node-gone", str(image))
    ledger = await PinLedger.open(js, "node-gone", bucket=bucket, ttl=2.0)
    await ledger.record(str(image), {"a-name-of-a-node-that-went-away"})
    live_key = record_key("node-live", str(image))

    async def expired(key: str) -> bool:
        try:
            await kv.get(key)
        except KeyNotFoundError:
            return True
        return False

    # The gone node renews nothing: its record expires (the server's TTL).
    await eventually(lambda: expired(gone_key), "the gone node's pin record to expire")
    # The live node's expired too meanwhile (it synced less often than the TTL here): it
    # writes it again from memory at its next sync, as after a NATS outage longer than the TTL.
    await eventually(lambda: expired(live_key), "the live node's record to expire unrenewed")
    # Watched as it is written, not read afterwards: with a 2s TTL it may be gone again by
    # then on a loaded machine.
    writes = await js._nc.subscribe(f"$KV.{bucket}.{live_key}")
    await live.sync(wanted=[image], present=await present(cri))
    written = await writes.next_msg(timeout=30)
    assert written.data, "a live node's record was not written again"


async def test_pins_whose_record_expired_while_the_node_was_away_are_released(
    cri: CriClient,
    containerd: Containerd,
    images: ContainerdImages,
    js: JetStreamContext,
    push: Callable[..., str],
) -> None:
    bucket = f"PINNED_TTL_{uuid.uuid4().hex[:8]}"
    ref, image = await pulled(cri, push)
    other_ref, _ = await pulled(cri, push)
    containerd.ctr("images", "label", other_ref, PINNED)  # an operator's pin: never ours
    before = Pinner(images, js, "node-away", bucket=bucket, ttl=2.0)
    await before.sync(wanted=[image], present=await present(cri))
    assert pinned_names(containerd, ref) == names_of(containerd, ref)
    # The node is away (down, or cut off from NATS) longer than the TTL: its record expires.
    kv = await js.key_value(bucket)

    async def expired() -> bool:
        try:
            await kv.get(record_key("node-away", str(image)))
        except KeyNotFoundError:
            return True
        return False

    await eventually(expired, "the away node's pin record to expire")
    # Back, with no Fleet wanting the image any more: the pins must not stay unowned.
    # Back with a long TTL: its fresh record must still be there when looked at below, however
    # loaded the machine (2s was outlived once under a full suite).
    back = Pinner(images, js, "node-away", bucket=bucket, ttl=3600.0)
    await back.sync(wanted=[], present=await present(cri))
    assert pinned_names(containerd, ref) == set(), "pins outlived their expired record"
    assert pinned_names(containerd, other_ref) == {other_ref}
    # Still wanted: pinned again, with a fresh record.
    await back.sync(wanted=[image], present=await present(cri))
    assert pinned_names(containerd, ref) == names_of(containerd, ref)
    assert not await expired()


# --- which runtimes pin ---------------------------------------------------------------------


async def test_containerd_whose_images_service_answers_pins(
    cri: CriClient, images: ContainerdImages
) -> None:
    support = await pinning_support(True, await cri.version(), images)

    assert support.enabled
    assert support.describe().startswith("containerd ")


async def test_pinning_can_be_turned_off(cri: CriClient, images: ContainerdImages) -> None:
    support = await pinning_support(False, await cri.version(), images)

    assert not support.enabled
    assert support.describe() == "off: disabled by --pin-images=false"


async def test_crio_points_at_its_configuration_and_others_say_why(
    images: ContainerdImages,
) -> None:
    # CRI-O cannot run here; its Version answer is all this decision reads.
    crio = await pinning_support(True, RuntimeVersion("cri-o", "1.30.2", "v1"), images)
    other = await pinning_support(True, RuntimeVersion("cri-dockerd", "0.3.9", "v1"), images)

    assert not crio.enabled
    assert "crio-pinned-config" in crio.reason
    assert not other.enabled
    assert other.reason == "cri-dockerd 0.3.9 offers no way to pin images"


async def test_a_socket_without_containerds_images_service_turns_pinning_off(
    tmp_path: Path,
) -> None:
    # A gRPC server serving nothing answers UNIMPLEMENTED, as a CRI-only endpoint would.
    server = grpc.aio.server()
    server.add_insecure_port(f"unix://{tmp_path}/cri-only.sock")
    await server.start()
    client = ContainerdImages(f"unix://{tmp_path}/cri-only.sock")
    try:
        support = await pinning_support(True, RuntimeVersion("containerd", "1.7.20", "v1"), client)
    finally:
        await client.close()
        await server.stop(None)

    assert not support.enabled
    assert "images service does not answer" in support.reason
    assert "UNIMPLEMENTED" in support.reason


async def test_an_unreachable_images_service_leaves_the_decision_for_later(
    tmp_path: Path,
) -> None:
    gone = ContainerdImages(f"unix://{tmp_path}/no.sock", call_timeout=2)
    try:
        with pytest.raises(RuntimeUnavailable):
            await pinning_support(True, RuntimeVersion("containerd", "1.7.20", "v1"), gone)
    finally:
        await gone.close()
