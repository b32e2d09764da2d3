"""Keeping pre-pulled images on a real node: pinning, the disk budget and no fight with GC.

Real nats-server, containerd and docker-registry; the syncer runs in-process. Pins are checked
through containerd itself (``ctr -n k8s.io images ls`` shows the label), because Debian's
containerd 1.6 stores the label but does not report ``pinned`` back through CRI.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from support import polling
from support.syncer_harness import (  # noqa: F401  (fixtures)
    RunningSyncer,
    cli,
    eventually,
    fleet,
    info_logs_fixture,
    logged,
    metric,
    norm,
    override,
    settings_fixture,
)
from support.tmpfs import fill_to, tmpfs_containerd

from image_syncer.sandbox.containerd import Containerd
from syncer.runtime.containerd_images import PIN_LABEL, PIN_VALUE
from syncer.runtime.cri import CriClient, RuntimeImage
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings, publish_event
from wire.nodestatus import (
    NodeState,
    StatusSettings,
    beat_key,
    decode_heartbeat,
    get_status,
    open_status_bucket,
)

pytestmark = [pytest.mark.nats, pytest.mark.cri]

PINNED = f"{PIN_LABEL}={PIN_VALUE}"


def names_of(containerd: Containerd, ref: str) -> set[str]:
    targets = containerd.image_targets()
    if ref not in targets:
        return set()
    return {name for name, target in targets.items() if target == targets[ref]}


def pinned_names(containerd: Containerd, ref: str) -> set[str]:
    rows = containerd.ctr("images", "ls").stdout.splitlines()[1:]
    labels = {row.split()[0]: row.split()[-1] for row in rows if row.strip()}
    return {name for name in names_of(containerd, ref) if PINNED in labels.get(name, "")}


def fully_pinned(containerd: Containerd, ref: str) -> bool:
    names = names_of(containerd, ref)
    return bool(names) and pinned_names(containerd, ref) == names


async def node_state(js: JetStreamContext, settings: SyncerSettings) -> NodeState | None:
    # None until the syncer's first status write created the bucket.
    kv = await open_status_bucket(js, StatusSettings(prefix=settings.subject_prefix))
    status = await get_status(kv, settings.node_name) if kv is not None else None
    if kv is None or status is None:
        return None
    # The last reconcile's time rides on the heartbeat (the entry is written only on news):
    # read the newer of the two, as every status reader does.
    try:
        beat = decode_heartbeat((await kv.get(beat_key(settings.node_name))).value or b"")
    except nats.js.errors.KeyNotFoundError:
        return status.summary
    seen = status.summary.last_reconcile
    if beat.last_reconcile is not None and (seen is None or beat.last_reconcile > seen):
        return msgspec.structs.replace(status.summary, last_reconcile=beat.last_reconcile)
    return status.summary


async def until_state(
    js: JetStreamContext,
    settings: SyncerSettings,
    check: Callable[[NodeState], bool],
    what: str,
) -> NodeState:
    last: NodeState | None = None

    async def holds() -> bool:
        nonlocal last
        last = await node_state(js, settings)
        return last is not None and check(last)

    await polling.eventually(holds, lambda: f"{what}; last state: {last}")
    assert last is not None
    return last


def opted_out(body: dict[str, Any]) -> dict[str, Any]:
    body["metadata"]["annotations"] = {"image-syncer.octops.io/sync": "false"}
    body["metadata"]["resourceVersion"] = "2"
    return body


# --- pinning --------------------------------------------------------------------------------


async def test_pins_follow_the_fleets_and_someone_elses_pin_stays(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
) -> None:
    deleted, updated_from, updated_to, excluded, hand_pinned = (push() for _ in range(5))
    # The kubelet pulled this one, and an operator pinned its tag by hand, before the syncer ran.
    async with CriClient(containerd.endpoint) as kubelet:
        await kubelet.pull_image(hand_pinned, timeout=60)
    await asyncio.to_thread(containerd.ctr, "images", "label", hand_pinned, PINNED)
    running = await RunningSyncer(override(settings, status_interval=0.2)).start()
    try:
        for name, image in (
            ("deleted", deleted),
            ("updated", updated_from),
            ("excluded", excluded),
            ("hand", hand_pinned),
        ):
            await publish_event(js, log_settings, "fleet.events.added", fleet(name, image))
        for image in (deleted, updated_from, excluded):
            await eventually(partial(fully_pinned, containerd, image), f"{image} pinned")
        await eventually(lambda: fully_pinned(containerd, hand_pinned), "hand-pinned image pinned")
        await until_state(
            js, settings, lambda s: s.pins is not None and s.pins.pinned == 4, "4 pinned"
        )

        await publish_event(js, log_settings, "fleet.events.deleted", fleet("deleted", deleted))
        await publish_event(
            js, log_settings, "fleet.events.updated", fleet("updated", updated_to, rv="2")
        )
        await publish_event(
            js, log_settings, "fleet.events.updated", opted_out(fleet("excluded", excluded))
        )
        await publish_event(js, log_settings, "fleet.events.deleted", fleet("hand", hand_pinned))

        for image in (deleted, updated_from, excluded):
            await eventually(partial(_unpinned, containerd, image), f"{image} unpinned")
        await eventually(lambda: fully_pinned(containerd, updated_to), "the new image pinned")
        # Still on the node (no --remove-unused), just no longer pinned by the syncer...
        assert names_of(containerd, deleted)
        # ...while the operator's own pin outlives the Fleet.
        await eventually(
            lambda: pinned_names(containerd, hand_pinned) == {hand_pinned},
            "only the syncer's labels removed from the hand-pinned image",
        )
        state = await until_state(
            js, settings, lambda s: s.pins is not None and s.pins.pinned == 1, "1 pinned"
        )
        assert state.pins is not None
        assert state.pins.enabled and state.pins.runtime.startswith("containerd ")
        code, out, err = await cli(settings, "status", "--node", settings.node_name)
        assert code == 0, err
        assert "pinning: 1/1 images pinned, containerd " in out
        code, out, err = await cli(settings, "status")
        assert code == 0, err
        assert "Pinned" in out and "1/1" in out
    finally:
        assert await running.stop() == 0


def labelled(containerd: Containerd) -> set[str]:
    rows = containerd.ctr("images", "ls").stdout.splitlines()[1:]
    return {row.split()[0] for row in rows if row.strip() and PINNED in row.split()[-1]}


async def test_a_tag_that_moves_takes_its_pin_along(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
) -> None:
    """Issue 23: a mutable tag moved to new content (here a kubelet's pull, as with
    imagePullPolicy Always); the old content's digest name and id stayed pinned until the Fleet
    went (out of the kubelet GC's reach), and the new content was never pinned."""
    repository = f"test/moving-{uuid.uuid4().hex[:8]}"
    image = push(repository, "live")
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("moving", image))
        await eventually(lambda: fully_pinned(containerd, image), "pinned")
        old_names = names_of(containerd, image) - {image}
        assert len(old_names) == 2  # repo digest and image id

        push(repository, "live")  # new content under the same tag
        async with CriClient(containerd.endpoint) as kubelet:
            await kubelet.pull_image(image, timeout=60)
        assert not names_of(containerd, image) & old_names  # the tag moved

        await eventually(lambda: fully_pinned(containerd, image), "the new content pinned")
        await eventually(
            lambda: not labelled(containerd) & old_names, "the old content's names unpinned"
        )
    finally:
        assert await running.stop() == 0


async def test_an_extra_image_is_pinned_though_no_fleet_wants_it(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
) -> None:
    extra, fleets = push(), push()
    running = await RunningSyncer(override(settings, extra_image=(extra,))).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("brief", fleets))
        await eventually(lambda: fully_pinned(containerd, extra), "the extra image pinned")
        await eventually(lambda: fully_pinned(containerd, fleets), "the Fleet's image pinned")
        await publish_event(js, log_settings, "fleet.events.deleted", fleet("brief", fleets))

        await eventually(lambda: not pinned_names(containerd, fleets), "the Fleet's unpinned")
        assert fully_pinned(containerd, extra)
    finally:
        assert await running.stop() == 0


async def test_remove_unused_unpins_before_it_removes(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
) -> None:
    image = push()
    running = await RunningSyncer(override(settings, remove_unused=True, remove_grace=0.0)).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("gone", image))
        await eventually(lambda: fully_pinned(containerd, image), "pinned")
        await publish_event(js, log_settings, "fleet.events.deleted", fleet("gone", image))
        await eventually(lambda: not names_of(containerd, image), "removed")
        assert metric("image_syncer_syncer_pins_total", action="unpinned") >= 1
    finally:
        assert await running.stop() == 0


async def test_without_pinning_nothing_is_labelled(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
) -> None:
    image = push()
    running = await RunningSyncer(override(settings, pin_images=False)).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("plain", image))
        await eventually(lambda: image in containerd.image_refs(), "the image arrives")
        state = await until_state(
            js, settings, lambda s: "default/plain" in s.fleets and not s.gaps, "ready"
        )
        assert state.pins is not None
        assert state.pins.runtime == "off: disabled by --pin-images=false"
        assert not state.pins.enabled and state.pins.pinned == 0
        assert not pinned_names(containerd, image)
    finally:
        assert await running.stop() == 0


# --- the disk budget ------------------------------------------------------------------------


@pytest.fixture
def small_containerd(tmp_path: Path) -> Iterator[Containerd]:
    with tmpfs_containerd(tmp_path / "ctrd", size="128m") as runtime:
        yield runtime


async def test_a_full_image_filesystem_pauses_pulls_until_space_frees(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    small_containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = override(settings, cri_endpoint=small_containerd.endpoint, max_image_fs_usage=0.8)
    ballast = fill_to(small_containerd.state_dir / "root", 0.9)
    image = push()
    skipped_before = metric("image_syncer_syncer_pulls_skipped_total", reason="disk_budget")
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("big", image))

        state = await until_state(
            js,
            settings,
            lambda s: s.disk is not None and bool(s.disk.paused) and norm(image) in s.missing,
            "status says pulls are paused",
        )
        assert state.disk is not None
        assert "at or above --max-image-fs-usage 80%" in state.disk.paused
        assert state.disk.usage is not None and state.disk.usage >= 0.8
        # The image is missing, pending, with the reason.
        assert state.missing[norm(image)].state == "pending"
        assert state.missing[norm(image)].error == state.disk.paused
        assert image not in small_containerd.image_refs()
        assert (
            metric("image_syncer_syncer_pulls_skipped_total", reason="disk_budget") > skipped_before
        )
        assert len(logged(caplog, "pulls paused: image filesystem over budget")) == 1

        os.remove(ballast)

        await eventually(lambda: image in small_containerd.image_refs(), "the image arrives")
        await until_state(
            js, settings, lambda s: s.disk is not None and not s.disk.paused, "pulls resumed"
        )
        assert logged(caplog, "pulls resume: image filesystem within budget")
    finally:
        assert await running.stop() == 0


def fs_usage(directory: Path) -> float:
    stat = os.statvfs(directory)
    return 1 - stat.f_bavail / stat.f_blocks


async def test_a_burst_of_queued_pulls_cannot_fill_the_disk(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    small_containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 23 fault 8: three pulls queued behind one slot, each ~23% of the disk once pulled
    (its compressed layer in the content store, unpacked in the snapshotter), at 50%: one fits,
    a second would take the disk to ~96%. Before, all three passed one look at the disk taken
    before they queued, and the tmpfs ran out."""
    settings = override(
        settings,
        cri_endpoint=small_containerd.endpoint,
        max_image_fs_usage=0.8,
        max_parallel_pulls=1,
    )
    root = small_containerd.state_dir / "root"
    layer = int(128 * 1024 * 1024 * 0.115)
    images = [push(layer_bytes=layer) for _ in range(3)]
    fill_to(root, 0.5)
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("burst", *images))

        def pulled() -> set[str]:
            return set(images) & small_containerd.image_refs()

        await eventually(lambda: pulled(), "the first image arrives")
        state = await until_state(
            js,
            settings,
            lambda s: (
                s.disk is not None
                and bool(s.disk.paused)
                and len([i for i in images if norm(i) in s.missing]) == 2
            ),
            "status says pulls are paused, two images missing",
        )
        assert state.disk is not None and "with the pulls in flight" in state.disk.paused
        # A few reconciles later: still one image, the disk within budget, no pull failed.
        for _ in range(3):
            seen = state.last_reconcile
            state = await until_state(
                js, settings, partial(_reconciled_since, seen), "a later reconcile"
            )
        assert len(pulled()) == 1
        assert fs_usage(root) < 0.8
        assert not logged(caplog, "image pull failed")
        assert len(logged(caplog, "pulls paused: image filesystem over budget")) == 1
    finally:
        assert await running.stop() == 0


async def test_paused_clears_on_its_own_once_the_refused_image_is_not_wanted(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    small_containerd: Containerd,
    push: Callable[..., str],
) -> None:
    """Issue 23 fault 10: the budget was read only when a pull asked; once the refused image was
    no longer wanted nothing asked, and "paused", the alert's gauge and the usage gauge stayed."""
    settings = override(settings, cri_endpoint=small_containerd.endpoint, max_image_fs_usage=0.8)
    ballast = fill_to(small_containerd.state_dir / "root", 0.9)
    image = push()
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("big", image))
        await until_state(
            js, settings, lambda s: s.disk is not None and bool(s.disk.paused), "paused"
        )
        assert metric("image_syncer_syncer_disk_budget_exceeded") == 1

        await publish_event(js, log_settings, "fleet.events.deleted", fleet("big", image))
        os.remove(ballast)

        state = await until_state(
            js,
            settings,
            lambda s: (
                s.disk is not None
                and not s.disk.paused
                and s.disk.usage is not None
                and s.disk.usage < 0.8
            ),
            "paused cleared and the usage follows the disk",
        )
        assert state.disk is not None and not state.disk.paused
        assert metric("image_syncer_syncer_disk_budget_exceeded") == 0
        assert metric("image_syncer_syncer_image_fs_usage_ratio") < 0.8
        assert image not in small_containerd.image_refs()
    finally:
        assert await running.stop() == 0


# --- no fight with GC -----------------------------------------------------------------------


async def test_one_removal_is_pulled_again_at_once_repeated_ones_back_off_with_a_warning(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = override(
        settings, removal_backoff_after=2, removal_window=3600.0, removal_backoff_max=3600.0
    )
    image = push()
    running = await RunningSyncer(settings).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("gc", image))
        await eventually(lambda: image in containerd.image_refs(), "first pull")
        await eventually(lambda: fully_pinned(containerd, image), "pinned")

        containerd.remove_image(image)

        await eventually(lambda: image in containerd.image_refs(), "one removal: pulled again")
        assert metric("image_syncer_images_removed_externally_total", image=norm(image)) == 1
        assert not [
            r for r in caplog.records if r.levelname == "WARNING" and "behind" in r.getMessage()
        ]

        containerd.remove_image(image)

        await eventually(
            lambda: logged(
                caplog,
                "image keeps being removed behind the syncer's back, re-pulls back off",
                image=norm(image),
            ),
            "the warning",
        )
        state = await until_state(
            js,
            settings,
            lambda s: s.disk is not None and norm(image) in s.disk.gc_backoff,
            "status shows the backoff",
        )
        assert "re-pull in" in state.missing[norm(image)].error
        # Two more reconciles pass, and the image stays away.
        for _ in range(2):
            seen = state.last_reconcile
            state = await until_state(
                js, settings, partial(_reconciled_since, seen), "a later reconcile"
            )
        assert image not in containerd.image_refs()
        assert metric("image_syncer_images_removed_externally_total", image=norm(image)) == 2
        assert metric("image_syncer_syncer_pulls_skipped_total", reason="gc_backoff") >= 1
        warnings = logged(
            caplog, "image keeps being removed behind the syncer's back, re-pulls back off"
        )
        assert len(warnings) == 1
        assert "kubelet's image garbage collector" in warnings[0].cause  # type: ignore[attr-defined]
    finally:
        assert await running.stop() == 0


def _unpinned(containerd: Containerd, ref: str) -> bool:
    return not pinned_names(containerd, ref)


def _reconciled_since(seen: object, state: NodeState) -> bool:
    return state.last_reconcile != seen


async def test_a_pull_that_ends_during_list_images_is_not_counted_as_removed(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 23 fault 12: the reconcile's ListImages is answered before a pull ends and read
    after it (here: the answer is held until the pull is recorded, which makes the race
    certain). The older answer replaced what the node holds: the image counted as removed
    behind the syncer's back and was pulled again."""
    image = push()
    holding, held = asyncio.Event(), asyncio.Event()
    real = CriClient.list_images

    async def answered_before_the_pull_ends(self: CriClient) -> list[RuntimeImage]:
        answer = await real(self)
        if holding.is_set() and not held.is_set():
            held.set()
            await polling.eventually(
                lambda: logged(caplog, "fleet synced", image=norm(image)), "the pull recorded"
            )
        return answer

    monkeypatch.setattr(CriClient, "list_images", answered_before_the_pull_ends)
    running = await RunningSyncer(settings).start()
    try:
        # Started to the end (the status reporter runs after the start's own reconcile): the
        # listing held is one of the periodic reconcile's, while the consumer takes events.
        await until_state(js, settings, lambda s: True, "the first status write")
        holding.set()
        await asyncio.wait_for(held.wait(), 60)  # a listing without the image, held
        await publish_event(js, log_settings, "fleet.events.added", fleet("race", image))
        state = await until_state(
            js, settings, lambda s: "default/race" in s.fleets and not s.missing, "synced"
        )
        for _ in range(2):  # the held listing is read, and one more after it
            seen = state.last_reconcile
            state = await until_state(
                js, settings, partial(_reconciled_since, seen), "a later reconcile"
            )

        assert metric("image_syncer_images_removed_externally_total", image=norm(image)) == 0
        assert not logged(caplog, "image removed behind the syncer's back, pulling it again")
        assert len(logged(caplog, "fleet synced", image=norm(image))) == 1  # pulled once
    finally:
        assert await running.stop() == 0
