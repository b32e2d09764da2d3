"""A real syncer (NATS, containerd, registry) untaints its Node, on the fake API server, at the right time.

Also the whole image set: the Agones SDK sidecar followed from the controller Deployment and
``--extra-image`` are pulled, re-pulled, shown in status, never removed as unused, and count
toward the gate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from support import polling
from support.fakekube import FakeKube
from support.fakekube.harness import controller, set_sidecar
from support.gate_harness import GATE, GATE_TAINT, OTHER, gated, node_status, taints, until_gate
from support.syncer_harness import (
    RunningSyncer,
    cli,
    eventually,
    fleet,
    logged,
    metric,
    norm,
    override,
)
from support.syncer_harness import info_logs_fixture as info_logs_fixture
from support.syncer_harness import settings_fixture as settings_fixture
from support.tmpfs import fill_to, tmpfs_containerd

from broadcaster.kubeapi import custom_objects_api
from broadcaster.settings import SidecarSettings
from broadcaster.sidecar import SidecarWatcher
from image_syncer.sandbox.containerd import Containerd
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings, publish_event

pytestmark = [pytest.mark.nats, pytest.mark.cri]

CONCURRENT = {"key": "example.com/maintenance", "effect": "NoSchedule"}
# TaintNodesByCondition: on every new Node until its kubelet reports Ready.
NOT_READY = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}


async def test_the_taint_goes_only_once_the_image_is_there(
    settings: SyncerSettings,
    kube: FakeKube,
    js: JetStreamContext,
    containerd: Containerd,
    push: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = gated(settings, kube)
    image = push()  # pushed now only to learn a fresh name; the Fleet wants a tag not there yet
    late = image.rsplit(":", 1)[0] + ":late"
    await publish_event(
        js, LogSettings(prefix=settings.subject_prefix), "fleet.events.added", fleet("g", late)
    )
    present_at_patch: list[bool] = []
    syncer = await RunningSyncer(settings).start()
    try:
        closed = await until_gate(js, settings, "closed", "the gate closed on the missing image")
        assert closed.missing == [norm(late)]
        code, out, _ = await cli(settings, "status", "--node", settings.node_name)
        assert code == 0
        assert f"startup taint {GATE}: closed" in out and norm(late) in out
        await eventually(
            lambda: logged(caplog, "image pull failed"), "a failed pull of the missing image"
        )
        assert GATE in {t["key"] for t in taints(kube, settings.node_name)}

        # Another writer taints the node between the syncer's read and its patch: 409, re-read.
        def operator_adds_a_taint() -> None:
            present_at_patch.append(late in containerd.image_refs())
            node = kube.get("nodes", "", settings.node_name)
            assert node is not None
            node["spec"]["taints"].append(CONCURRENT)
            kube.update("nodes", node)

        kube.before_next_patch(operator_adds_a_taint)
        conflicts = metric("image_syncer_syncer_gate_errors_total", reason="conflict")
        push(late.split("/", 1)[1].rsplit(":", 1)[0], "late")  # the image arrives
        await eventually(
            lambda: GATE not in {t["key"] for t in taints(kube, settings.node_name)},
            "the taint to be removed",
        )
        assert present_at_patch == [True]
        assert taints(kube, settings.node_name) == [OTHER, CONCURRENT]
        assert metric("image_syncer_syncer_gate_errors_total", reason="conflict") == conflicts + 1
        opened = await until_gate(js, settings, "open", "the status to show the gate open")
        assert opened.opened_at is not None and not opened.by_timeout
        assert metric("image_syncer_syncer_gate_closed") == 0
        code, out, _ = await cli(settings, "status", "--node", settings.node_name)
        assert code == 0
        assert f"startup taint {GATE}: removed" in out and "timeout" not in out
    finally:
        assert await syncer.stop() == 0


async def test_a_new_node_not_ready_yet_keeps_its_gate_closed_until_the_images_are_there(
    settings: SyncerSettings,
    kube: FakeKube,
    js: JetStreamContext,
    containerd: Containerd,
    push: Any,
) -> None:
    """Issue 21: with --respect-scheduling, the not-ready:NoSchedule taint the API server puts on
    every new Node excluded every Fleet, and the gate opened at once on a node with no image."""
    image = push()
    late = image.rsplit(":", 1)[0] + ":late"
    await publish_event(
        js, LogSettings(prefix=settings.subject_prefix), "fleet.events.added", fleet("g", late)
    )
    kube.create(
        "nodes",
        {
            "metadata": {"name": settings.node_name, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"taints": [NOT_READY, GATE_TAINT]},
        },
    )
    settings = override(
        settings,
        startup_taint=GATE,
        kube_api_url=kube.url,
        node_refresh=0.5,
        respect_scheduling=True,
    )
    syncer = await RunningSyncer(settings).start()
    try:
        closed = await until_gate(js, settings, "closed", "the gate closed on the missing image")
        assert closed.missing == [norm(late)]
        assert GATE in {t["key"] for t in taints(kube, settings.node_name)}
        present_at_patch: list[bool] = []
        kube.before_next_patch(lambda: present_at_patch.append(late in containerd.image_refs()))
        push(late.split("/", 1)[1].rsplit(":", 1)[0], "late")  # the image arrives
        await eventually(
            lambda: GATE not in {t["key"] for t in taints(kube, settings.node_name)},
            "the taint to be removed once the image is there",
        )
        assert present_at_patch == [True]
        assert taints(kube, settings.node_name) == [NOT_READY]
    finally:
        assert await syncer.stop() == 0


async def test_timeout_opens_with_a_warning_and_a_restart_resumes_the_clock(
    settings: SyncerSettings,
    kube: FakeKube,
    js: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = "127.0.0.1:1/never/there:1"
    settings = gated(settings, kube, startup_taint_timeout=3600.0)
    await publish_event(
        js, LogSettings(prefix=settings.subject_prefix), "fleet.events.added", fleet("g", missing)
    )
    first = await RunningSyncer(settings).start()
    closed = await until_gate(js, settings, "closed", "the gate closed")
    assert await first.stop() == 0
    assert GATE in {t["key"] for t in taints(kube, settings.node_name)}

    # Restarted with a timeout shorter than the time already spent closed: it opens at once,
    # which proves the clock resumed instead of starting over.
    timeouts = metric("image_syncer_syncer_gate_timeouts_total")
    restarted = override(settings, startup_taint_timeout=0.5)
    caplog.clear()
    second = await RunningSyncer(restarted).start()
    try:
        opened = await until_gate(js, restarted, "open", "the timeout to open the gate")
        assert opened.by_timeout
        assert opened.closed_since == closed.closed_since
        assert taints(kube, settings.node_name) == [OTHER]
        warnings = logged(caplog, "startup taint timeout: opening the node with images missing")
        assert len(warnings) == 1
        assert warnings[0].missing == [norm(missing)]  # type: ignore[attr-defined]
        assert warnings[0].levelno == logging.WARNING
        assert metric("image_syncer_syncer_gate_timeouts_total") == timeouts + 1
    finally:
        assert await second.stop() == 0


@pytest.fixture
def small_containerd(tmp_path: Path) -> Iterator[Containerd]:
    with tmpfs_containerd(tmp_path / "ctrd", size="128m") as runtime:
        yield runtime


async def test_a_node_over_its_disk_budget_opens_at_once_with_a_warning(
    settings: SyncerSettings,
    kube: FakeKube,
    js: JetStreamContext,
    small_containerd: Containerd,
    push: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 23: over budget no pull can start, so nothing the gate waits for can come; it used
    to hold the node out of service for its whole timeout all the same."""
    fill_to(small_containerd.state_dir / "root", 0.9)
    image = push()
    settings = gated(
        settings,
        kube,
        cri_endpoint=small_containerd.endpoint,
        max_image_fs_usage=0.8,
        startup_taint_timeout=3600.0,
    )
    await publish_event(
        js, LogSettings(prefix=settings.subject_prefix), "fleet.events.added", fleet("g", image)
    )
    running = await RunningSyncer(settings).start()
    try:
        opened = await until_gate(js, settings, "open", "the gate to open without its timeout")
        assert opened.by_timeout  # opened with images missing
        assert taints(kube, settings.node_name) == [OTHER]
        (warning,) = logged(
            caplog, "startup gate opened early: the missing images cannot be pulled"
        )
        assert "--max-image-fs-usage" in warning.reason  # type: ignore[attr-defined]
        assert warning.missing == [norm(image)]  # type: ignore[attr-defined]
        assert image not in small_containerd.image_refs()
    finally:
        assert await running.stop() == 0


async def test_sidecar_and_extra_images_are_kept_shown_and_gate_the_node(
    settings: SyncerSettings,
    kube: FakeKube,
    js: JetStreamContext,
    containerd: Containerd,
    push: Any,
) -> None:
    sdk_1, sdk_2, extra, game = push(tag="sdk-1"), push(tag="sdk-2"), push(), push()
    kube.create("deployments", controller(sdk_1))
    api = custom_objects_api(str(kube.kubeconfig))
    log_settings = LogSettings(prefix=settings.subject_prefix)
    sidecar = SidecarWatcher(api.api_client, js, log_settings, SidecarSettings())
    assert await sidecar.refresh_once()
    await publish_event(js, log_settings, "fleet.events.added", fleet("g", game))
    settings = gated(settings, kube, extra_image=(extra,), remove_unused=True, remove_grace=0.0)
    other_node = override(settings, node_name="other-" + settings.node_name)
    syncers = [await RunningSyncer(settings).start(), await RunningSyncer(other_node).start()]
    try:
        await eventually(
            lambda: GATE not in {t["key"] for t in taints(kube, settings.node_name)},
            "the gate to open once the Fleet, sidecar and extra images are there",
        )
        assert {sdk_1, extra, game} <= containerd.image_refs()
        status = await node_status(js, settings)
        assert status is not None
        assert status.summary.node_images == {"agones-sdk": [norm(sdk_1)], "extra": [norm(extra)]}
        code, out, _ = await cli(settings, "status", "--node", settings.node_name)
        assert code == 0
        assert f"node images (agones-sdk): {norm(sdk_1)} (present)" in out

        # An Agones upgrade reaches every syncer.
        set_sidecar(kube, sdk_2)
        assert await sidecar.refresh_once()
        for node in (settings, other_node):

            async def upgraded(node: SyncerSettings = node) -> bool:
                status = await node_status(js, node)
                return status is not None and status.summary.node_images.get("agones-sdk") == [
                    norm(sdk_2)
                ]

            await polling.eventually(upgraded, f"{node.node_name} to follow the new sidecar")
        await eventually(lambda: sdk_2 in containerd.image_refs(), "the new sidecar pulled")

        # Re-pulled by the reconcile when deleted behind the syncer's back...
        containerd.remove_image(extra)
        await eventually(lambda: extra in containerd.image_refs(), "the extra image back")
        # ...and never removed as unused, while a deleted Fleet's image is.
        await publish_event(js, log_settings, "fleet.events.deleted", fleet("g", game, rv="2"))
        await eventually(lambda: game not in containerd.image_refs(), "the Fleet image removed")
        assert {sdk_2, extra} <= containerd.image_refs()
    finally:
        api.api_client.close()
        for syncer in syncers:
            assert await syncer.stop() == 0
