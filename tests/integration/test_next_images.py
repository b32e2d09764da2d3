"""Next images staged on a Fleet (``image-syncer.octops.io/next-images``), in a running syncer.

Real nats-server, containerd and docker-registry. The next image reaches the node while the Fleet
still names the current one; ``wait --fleet`` counts both, ``wait --next`` the next alone;
``--remove-unused`` keeps both while staged; moving the Fleet to the next image pulls nothing;
the startup gate counts next images, opt-out and ``--fleet-selector`` apply to them. "Not pulled"
is never proven by waiting: a later event that *is* acted on witnesses the earlier one was folded.
"""

from __future__ import annotations

from typing import Any

import pytest
from nats.js import JetStreamContext
from support import polling
from support.fakekube import FakeKube
from support.gate_harness import GATE, gate_of, gated, taints, until_gate
from support.syncer_harness import (
    RunningSyncer,
    cli,
    eventually,
    fleet,
    logged,
    metric,
    norm,
    override,
    push_tag,
    unpushed,
)
from support.syncer_harness import info_logs_fixture as info_logs_fixture
from support.syncer_harness import settings_fixture as settings_fixture

from image_syncer.sandbox.containerd import Containerd
from ops.logs import fields_of
from syncer.settings import SyncerSettings
from wire.contract import NEXT_IMAGES_ANNOTATION
from wire.eventlog import LogSettings, publish_event

pytestmark = [pytest.mark.nats, pytest.mark.cri]

SUCCESSFUL_PULLS = "image_syncer_syncer_pulls_total"


def staged(name: str, image: str, next_images: str, rv: str = "1", **meta: Any) -> dict[str, Any]:
    """A Fleet running ``image`` whose annotation names ``next_images``."""
    obj = fleet(name, image, rv=rv)
    obj["metadata"]["annotations"] = {NEXT_IMAGES_ANNOTATION: next_images}
    obj["metadata"].update(meta)
    return obj


async def test_next_image_is_staged_then_the_move_pulls_nothing(
    settings: SyncerSettings,
    js: JetStreamContext,
    push: Any,
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log_settings = LogSettings(prefix=settings.subject_prefix)
    current, upcoming = push(), unpushed(push, "next")
    settings = override(settings, remove_unused=True, remove_grace=0.0)
    syncer = await RunningSyncer(settings).start()
    try:
        await publish_event(
            js, log_settings, "fleet.events.added", staged("arena", current, upcoming)
        )
        await eventually(lambda: current in containerd.image_refs(), "the current image pulled")
        await eventually(
            lambda: logged(caplog, "image pull failed", image=norm(upcoming)),
            "the next image's pull to fail while it is not pushed",
        )
        # Not there yet: neither wait passes, and both say which image is missing.
        for extra in ((), ("--next",)):
            code, _, err = await cli(
                settings, "wait", "--fleet", "default/arena", "--timeout", "1s", *extra
            )
            assert code == 1, err
            assert norm(upcoming) in err
        assert norm(current) not in err  # --next does not wait for the current image

        push_tag(push, upcoming)
        await eventually(lambda: upcoming in containerd.image_refs(), "the next image staged")
        code, out, err = await cli(settings, "wait", "--fleet", "default/arena", "--timeout", "1m")
        assert code == 0, err
        assert "all images present on 1 live nodes" in out
        code, out, err = await cli(
            settings, "wait", "--fleet", "default/arena", "--next", "--timeout", "1m"
        )
        assert code == 0, err
        assert "next images present on 1 live nodes" in out

        # --remove-unused runs (a deleted Fleet's image goes) and keeps both while staged.
        gone = push()
        await publish_event(js, log_settings, "fleet.events.added", fleet("gone", gone))
        await eventually(lambda: gone in containerd.image_refs(), "the witness pulled")
        await publish_event(js, log_settings, "fleet.events.deleted", fleet("gone", gone, rv="2"))
        await eventually(lambda: gone not in containerd.image_refs(), "the witness removed")
        assert {current, upcoming} <= containerd.image_refs()

        # The Fleet moves to the staged image: nothing to pull.
        pulls = metric(SUCCESSFUL_PULLS, result="success")
        synced = len(logged(caplog, "fleet synced", fleet="default/arena"))
        await publish_event(
            js, log_settings, "fleet.events.updated", fleet("arena", upcoming, rv="2")
        )
        await eventually(
            lambda: current not in containerd.image_refs(),
            "the old image removed once no Fleet wants it (the move was folded)",
        )
        assert upcoming in containerd.image_refs()
        assert metric(SUCCESSFUL_PULLS, result="success") == pulls
        assert len(logged(caplog, "fleet synced", fleet="default/arena")) == synced
        assert logged(caplog, "image already present", fleet="default/arena", image=norm(upcoming))
    finally:
        assert await syncer.stop() == 0


async def test_a_malformed_entry_is_logged_counted_and_the_rest_pulled(
    settings: SyncerSettings,
    js: JetStreamContext,
    push: Any,
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log_settings = LogSettings(prefix=settings.subject_prefix)
    current, upcoming = push(), push()
    invalid = metric("image_syncer_syncer_invalid_image_references_total", source="next_images")
    syncer = await RunningSyncer(settings).start()
    try:
        annotation = f" Not/A:Valid:Ref , {upcoming},,"
        await publish_event(
            js, log_settings, "fleet.events.added", staged("mixed", current, annotation)
        )
        await eventually(
            lambda: {current, upcoming} <= containerd.image_refs(), "both good images pulled"
        )
        [line] = logged(caplog, "invalid image reference", fleet="default/mixed")
        assert fields_of(line)["container"] == f"annotation {NEXT_IMAGES_ANNOTATION}"
        assert fields_of(line)["image"] == "Not/A:Valid:Ref"
        assert (
            metric("image_syncer_syncer_invalid_image_references_total", source="next_images")
            == invalid + 1
        )
    finally:
        assert await syncer.stop() == 0


async def test_the_gate_holds_a_cold_node_until_the_next_images_are_there_too(
    settings: SyncerSettings,
    kube: FakeKube,
    js: JetStreamContext,
    push: Any,
    containerd: Containerd,
) -> None:
    log_settings = LogSettings(prefix=settings.subject_prefix)
    current, upcoming = push(), unpushed(push, "next")
    # Next images of a Fleet that is not for this node never close its gate: neither an opted
    # out Fleet's nor one outside --fleet-selector (neither is ever pushed).
    never_a, never_b = unpushed(push, "never"), unpushed(push, "never")
    events = [
        staged("arena", current, upcoming, labels={"tier": "game"}),
        staged(
            "quiet",
            current,
            never_a,
            labels={"tier": "game"},
            annotations={NEXT_IMAGES_ANNOTATION: never_a, "image-syncer.octops.io/sync": "false"},
        ),
        staged("tools", current, never_b, labels={"tier": "tools"}),
    ]
    for event in events:
        await publish_event(js, log_settings, "fleet.events.added", event)
    settings = gated(settings, kube, fleet_selector="tier=game")
    syncer = await RunningSyncer(settings).start()
    try:
        closed = await until_gate(js, settings, "closed", "the gate closed on the next image")
        assert norm(upcoming) in closed.missing
        await eventually(lambda: current in containerd.image_refs(), "the current image pulled")

        async def waits_for_the_next_image_alone() -> bool:
            gate = await gate_of(js, settings)
            return gate is not None and gate.state == "closed" and gate.missing == [norm(upcoming)]

        await polling.eventually(waits_for_the_next_image_alone, "the gate to wait for it alone")
        assert GATE in {t["key"] for t in taints(kube, settings.node_name)}

        push_tag(push, upcoming)
        await eventually(
            lambda: GATE not in {t["key"] for t in taints(kube, settings.node_name)},
            "the taint removed once the next image is there",
        )
        assert upcoming in containerd.image_refs()
        assert not {never_a, never_b} & containerd.image_refs()
    finally:
        assert await syncer.stop() == 0
