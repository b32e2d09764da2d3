"""Fleet-aware pre-pulling in a running syncer: opt-out, selector, node targeting, cleanup, auth.

Real nats-server, containerd and docker-registry; the API server is a tiny fake serving the
node's own Node object. "Not pulled" is never proven by waiting: a later Fleet that *is* pulled
witnesses that the earlier event was folded, then the runtime is checked.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from support.fakenodeapi import OpenApiServer
from support.syncer_harness import (  # noqa: F401  (fixtures)
    DEADLINE,
    RunningSyncer,
    eventually,
    fleet,
    info_logs_fixture,
    logged,
    metric,
    norm,
    override,
    settings_fixture,
)

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.registry import Registry
from ops.logs import fields_of
from syncer.runtime.cri import CriClient
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings, publish_event

pytestmark = [pytest.mark.nats, pytest.mark.cri]

EXCLUDED = "fleet excluded, treated as deleted on this node"


def game(name: str, image: str, rv: str = "1", **meta: Any) -> dict[str, Any]:
    """A Fleet with extra metadata (labels, annotations) and pod spec fields (``pod_*``)."""
    obj = fleet(name, image, rv=rv)
    for key, value in meta.items():
        if key.startswith("pod_"):
            obj["spec"]["template"]["spec"]["template"]["spec"][_camel(key[4:])] = value
        else:
            obj["metadata"][key] = value
    return obj


def _camel(snake: str) -> str:
    first, *rest = snake.split("_")
    return first + "".join(part.title() for part in rest)


async def witness(
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
) -> None:
    """Publish an admitted Fleet and wait until it is pulled: everything before it was folded."""
    image = push()
    await publish_event(
        js, log_settings, "fleet.events.added", fleet(f"w-{uuid.uuid4().hex[:8]}", image)
    )
    await eventually(lambda: image in containerd.image_refs(), "witness pulled")


async def test_opt_out_annotation_then_opt_back_in(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = push()
    running = await RunningSyncer(settings).start()
    try:
        opted_out = game("quiet", image, annotations={"image-syncer.octops.io/sync": "false"})
        await publish_event(js, log_settings, "fleet.events.added", opted_out)
        await witness(js, log_settings, push, containerd)
        assert image not in containerd.image_refs()
        [line] = logged(caplog, EXCLUDED, fleet="default/quiet")
        assert "image-syncer.octops.io/sync" in fields_of(line)["reason"]

        back = game("quiet", image, rv="2", annotations={"image-syncer.octops.io/sync": "true"})
        await publish_event(js, log_settings, "fleet.events.updated", back)
        await eventually(lambda: image in containerd.image_refs(), "pulled once opted back in")
        assert len(logged(caplog, "fleet included", fleet="default/quiet")) == 1
        assert len(logged(caplog, EXCLUDED, fleet="default/quiet")) == 1
    finally:
        assert await running.stop() == 0


async def test_fleet_selector_keeps_only_matching_fleets(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chosen, other = push(), push()
    running = await RunningSyncer(
        override(settings, fleet_selector="tier in (game),!canary")
    ).start()
    try:
        await publish_event(
            js, log_settings, "fleet.events.added", game("tools", other, labels={"tier": "tools"})
        )
        await publish_event(
            js, log_settings, "fleet.events.added", game("arena", chosen, labels={"tier": "game"})
        )
        await eventually(lambda: chosen in containerd.image_refs(), "selected Fleet pulled")
        assert other not in containerd.image_refs()
        [line] = logged(caplog, EXCLUDED, fleet="default/tools")
        assert "fleet selector" in fields_of(line)["reason"]
        # Relabelled into the selection: treated as added.
        relabelled = game("tools", other, rv="2", labels={"tier": "game"})
        await publish_event(js, log_settings, "fleet.events.updated", relabelled)
        await eventually(lambda: other in containerd.image_refs(), "relabelled Fleet pulled")
    finally:
        assert await running.stop() == 0


@pytest.fixture
def api(settings: SyncerSettings) -> Iterator[OpenApiServer]:
    node = {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": settings.node_name, "labels": {"pool": "system"}},
        "spec": {"taints": [{"key": "dedicated", "value": "system", "effect": "NoSchedule"}]},
    }
    with OpenApiServer(node, token="unused") as server:
        yield server


async def test_respect_scheduling_follows_the_nodes_taints_and_labels(
    settings: SyncerSettings,
    api: OpenApiServer,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    untolerating, tolerating, selecting = push(), push(), push()
    running = await RunningSyncer(
        override(settings, respect_scheduling=True, kube_api_url=api.url, node_refresh=0.3)
    ).start()
    try:
        toleration = [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
        await publish_event(js, log_settings, "fleet.events.added", game("plain", untolerating))
        await publish_event(
            js,
            log_settings,
            "fleet.events.added",
            game(
                "games-pool",
                selecting,
                pod_tolerations=toleration,
                pod_node_selector={"pool": "games"},
            ),
        )
        await publish_event(
            js,
            log_settings,
            "fleet.events.added",
            game("tolerant", tolerating, pod_tolerations=toleration),
        )
        await eventually(lambda: tolerating in containerd.image_refs(), "tolerating Fleet pulled")
        assert untolerating not in containerd.image_refs()
        assert selecting not in containerd.image_refs()
        assert (
            "dedicated" in fields_of(logged(caplog, EXCLUDED, fleet="default/plain")[0])["reason"]
        )

        # The node joins the games pool: its label changes, the API server says so.
        node = copy.deepcopy(api.nodes[settings.node_name])
        node["metadata"]["labels"]["pool"] = "games"
        api.nodes[settings.node_name] = node
        await eventually(lambda: selecting in containerd.image_refs(), "pulled after relabel")
        assert logged(caplog, "fleet included", fleet="default/games-pool")
        # Untainted: the plain Fleet may land here now.
        node = copy.deepcopy(node)
        node["spec"]["taints"] = []
        api.nodes[settings.node_name] = node
        await eventually(lambda: untolerating in containerd.image_refs(), "pulled after untaint")
    finally:
        assert await running.stop() == 0


async def test_deleted_fleets_image_is_removed_after_grace_but_not_others(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours, theirs = push(), push()
    async with CriClient(containerd.endpoint) as cri:
        await cri.pull_image(theirs, timeout=30)  # on the node, but not pulled by the syncer
    removed_before = metric("image_syncer_syncer_images_removed_total", outcome="removed")
    running = await RunningSyncer(override(settings, remove_unused=True, remove_grace=1.0)).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("old", ours))
        await publish_event(js, log_settings, "fleet.events.added", fleet("kubelets", theirs))
        await eventually(lambda: ours in containerd.image_refs(), "pulled by the syncer")
        await eventually(
            lambda: logged(caplog, "image already present", image=theirs), "theirs seen present"
        )
        await publish_event(js, log_settings, "fleet.events.deleted", fleet("old", ours, rv="2"))
        await publish_event(
            js, log_settings, "fleet.events.deleted", fleet("kubelets", theirs, rv="2")
        )
        await eventually(lambda: ours not in containerd.image_refs(), "our unused image removed")
        # Logged once the record is forgotten too, a moment after containerd dropped the image.
        await eventually(
            lambda: logged(caplog, "unused image removed", image=norm(ours)), "removal logged"
        )
        after = metric("image_syncer_syncer_images_removed_total", outcome="removed")
        assert after - removed_before == 1
        # Three more cleanup cycles (one per reconcile), past the grace: still never touched.
        count = "image_syncer_syncer_reconcile_duration_seconds_count"
        cycles = metric(count)
        await eventually(lambda: metric(count) >= cycles + 3, "three more reconciles")
        assert theirs in containerd.image_refs()
        assert not logged(caplog, "image unused, removal scheduled", image=norm(theirs))
    finally:
        assert await running.stop() == 0


async def test_fleet_recreated_inside_the_grace_keeps_its_image(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    containerd: Containerd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = push()
    running = await RunningSyncer(
        override(settings, remove_unused=True, remove_grace=3600.0)
    ).start()
    try:
        await publish_event(js, log_settings, "fleet.events.added", fleet("phoenix", image))
        await eventually(lambda: image in containerd.image_refs(), "pulled")
        await publish_event(
            js, log_settings, "fleet.events.deleted", fleet("phoenix", image, rv="2")
        )
        await eventually(
            lambda: logged(caplog, "image unused, removal scheduled", image=norm(image)),
            "removal scheduled",
        )
        await publish_event(js, log_settings, "fleet.events.added", fleet("phoenix", image, rv="3"))
        await eventually(
            lambda: logged(
                caplog, "image removal cancelled, a fleet uses it again", image=norm(image)
            ),
            "removal cancelled",
        )
        assert image in containerd.image_refs()
        assert not logged(caplog, "unused image removed", image=norm(image))
    finally:
        assert await running.stop() == 0


async def test_private_registry_pull_through_the_cli_leaks_no_secret(
    settings: SyncerSettings,
    js: JetStreamContext,
    log_settings: LogSettings,
    push: Callable[..., str],
    auth_registry: Registry,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    user, password = auth_registry.credentials  # type: ignore[misc]
    good, wrong = tmp_path / "good.json", tmp_path / "wrong.json"
    good.write_text(
        json.dumps({"auths": {auth_registry.address: {"username": user, "password": password}}})
    )
    wrong_password = "not-the-right-one-42"
    wrong.write_text(
        json.dumps(
            {"auths": {auth_registry.address: {"username": user, "password": wrong_password}}}
        )
    )
    image, refused = push(into=auth_registry), push(into=auth_registry)
    outputs = []
    for auth_file, node, ref in ((good, "auth-good", image), (wrong, "auth-wrong", refused)):
        log_path = tmp_path / f"{node}.log"
        env = {
            **os.environ,
            "NODE_NAME": node,
            "CONN_TARGET": containerd.endpoint,
            "NATS_URL": settings.nats.servers[0],
            "SUBJECT_PREFIX": log_settings.prefix,
            "SYNC_PERIOD": "1s",
            # An empty METRICS_ADDR reads as unset (click), i.e. :8080, which may be taken.
            "METRICS_ADDR": "127.0.0.1:0",
            "LOG_LEVEL": "debug",
            "REGISTRY_AUTH_FILE": str(auth_file),
        }
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "image_syncer", "syncer", env=env, stdout=log, stderr=log
            )
        try:
            await publish_event(js, log_settings, "fleet.events.added", fleet(node, ref))
            if auth_file is good:
                await eventually(partial(_has_image, containerd, ref), "private image pulled")
            else:
                await eventually(partial(_refusal_logged, log_path), "refusal logged")
        finally:
            process.terminate()
            async with asyncio.timeout(DEADLINE):
                assert await process.wait() == 0
        outputs.append(log_path.read_text())
    assert refused not in containerd.image_refs()
    for text in outputs:
        assert password not in text and wrong_password not in text


def _has_image(containerd: Containerd, ref: str) -> bool:
    return ref in containerd.image_refs()


def _refusal_logged(log_path: Path) -> bool:
    text = log_path.read_text()
    return "image pull failed" in text and "401 Unauthorized" in text
