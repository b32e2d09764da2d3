"""The broadcaster follows the Agones SDK sidecar image onto the node-images stream."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from nats.js import JetStreamContext
from support.broadcaster_harness import broadcasting, counter
from support.broadcaster_harness import settings_fixture as settings_fixture
from support.fakekube import FakeKube
from support.fakekube.harness import controller, fleet, set_sidecar, wait_converged
from support.polling import eventually

from broadcaster.kubeapi import custom_objects_api
from broadcaster.settings import Settings, SidecarSettings
from broadcaster.sidecar import (
    SIDECAR_ERRORS,
    SIDECAR_SUPERSEDED,
    SidecarWatcher,
    sidecar_image,
)
from wire.contract import AGONES_SDK_SOURCE, Kind, NodeImages
from wire.eventlog import (
    LogSettings,
    node_images_stream_name,
    read_log,
    read_node_images,
    stream_name,
)

pytestmark = pytest.mark.nats

SDK_1 = "us-docker.pkg.dev/agones-images/release/agones-sdk:1.44.0"
SDK_2 = "us-docker.pkg.dev/agones-images/release/agones-sdk:1.45.0"


def test_sidecar_image_is_read_from_the_env_of_any_container() -> None:
    assert sidecar_image(controller(SDK_1)) == SDK_1
    assert sidecar_image(controller(None)) is None
    assert sidecar_image({"spec": {}}) is None


async def test_published_once_and_followed(
    kube: FakeKube, js: JetStreamContext, log_settings: LogSettings
) -> None:
    kube.create("deployments", controller(SDK_1))
    api = custom_objects_api(str(kube.kubeconfig))
    watcher = SidecarWatcher(api.api_client, js, log_settings, SidecarSettings())
    try:
        assert await watcher.refresh_once()
        assert await watcher.refresh_once()  # unchanged: not published again
        found = await read_node_images(js, log_settings.prefix)
        assert found[AGONES_SDK_SOURCE].images == [SDK_1]
        assert found[AGONES_SDK_SOURCE].origin == "agones-system/agones-controller"
        set_sidecar(kube, SDK_2)  # an Agones upgrade
        assert await watcher.refresh_once()
        found = await read_node_images(js, log_settings.prefix)
        assert found[AGONES_SDK_SOURCE].images == [SDK_2]
    finally:
        api.api_client.close()
    # The Fleet stream never sees it.
    assert not [m async for m in read_log(js, stream_name(log_settings.prefix, Kind.FLEET))]


async def test_a_missing_deployment_or_variable_publishes_nothing(
    kube: FakeKube, js: JetStreamContext, log_settings: LogSettings
) -> None:
    api = custom_objects_api(str(kube.kubeconfig))
    watcher = SidecarWatcher(api.api_client, js, log_settings, SidecarSettings())
    not_found = counter(SIDECAR_ERRORS, reason="not_found")
    no_variable = counter(SIDECAR_ERRORS, reason="no_variable")
    try:
        assert not await watcher.refresh_once()
        assert counter(SIDECAR_ERRORS, reason="not_found") == not_found + 1
        kube.create("deployments", controller(None))
        assert not await watcher.refresh_once()
        assert counter(SIDECAR_ERRORS, reason="no_variable") == no_variable + 1
        assert await read_node_images(js, log_settings.prefix) == {}
        set_sidecar(kube, SDK_1)
        assert await watcher.refresh_once()  # recovers
    finally:
        api.api_client.close()


async def test_the_broadcaster_follows_the_sidecar_beside_the_fleets(
    kube: FakeKube, js: JetStreamContext, settings: Settings
) -> None:
    settings = replace(settings, sidecar=SidecarSettings(refresh=0.1))
    kube.create("deployments", controller(SDK_1))
    game = kube.create("fleets", fleet("game"))
    async with broadcasting(settings):
        await wait_converged(js, settings.log.prefix, [game])
        await until_images(js, settings.log.prefix, [SDK_1])
        set_sidecar(kube, SDK_2)
        await until_images(js, settings.log.prefix, [SDK_2])


async def until_images(js: JetStreamContext, prefix: str, images: list[str]) -> None:
    found: dict[str, NodeImages] = {}

    async def published() -> bool:
        nonlocal found
        found = await read_node_images(js, prefix)
        return AGONES_SDK_SOURCE in found and found[AGONES_SDK_SOURCE].images == images

    await eventually(published, lambda: f"the bus has {found}, wanted {images}")


async def test_a_lost_node_images_stream_is_published_again_at_the_next_refresh(
    kube: FakeKube, js: JetStreamContext, log_settings: LogSettings
) -> None:
    # What the bus holds decides, not what this process published last: a stream lost (a
    # server that lost its store) and re-created empty must not stay empty.
    kube.create("deployments", controller(SDK_1))
    api = custom_objects_api(str(kube.kubeconfig))
    watcher = SidecarWatcher(api.api_client, js, log_settings, SidecarSettings())
    try:
        assert await watcher.refresh_once()
        await js.delete_stream(node_images_stream_name(log_settings.prefix))
        assert await watcher.refresh_once()
    finally:
        api.api_client.close()
    found = await read_node_images(js, log_settings.prefix)
    assert AGONES_SDK_SOURCE in found, "the node-images stream stayed empty after its loss"
    assert found[AGONES_SDK_SOURCE].images == [SDK_1]


async def test_the_node_images_stream_is_recreated_with_the_fleet_stream(
    kube: FakeKube, js: JetStreamContext, settings: Settings
) -> None:
    # A refresh an hour away: only the re-creation of the streams can bring the image back.
    settings = replace(settings, sidecar=SidecarSettings(refresh=3600.0))
    kube.create("deployments", controller(SDK_1))
    async with broadcasting(settings):
        await until_images(js, settings.log.prefix, [SDK_1])
        # The server loses its store: every stream is gone.
        await js.delete_stream(node_images_stream_name(settings.log.prefix))
        await js.delete_stream(stream_name(settings.log.prefix, Kind.FLEET))
        game = kube.create("fleets", fleet("game"))
        await wait_converged(js, settings.log.prefix, [game])
        await until_images(js, settings.log.prefix, [SDK_1])


class HeldPublishes:
    """A JetStream context whose publishes wait for a go-ahead: a deposed leader's publish,
    computed before a new leader's and delivered after it."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        self.reached.set()
        await self.go.wait()
        return await self._js.publish(*args, **kwargs)


async def test_an_old_leaders_delayed_publish_never_replaces_a_newer_deployment_version(
    kube: FakeKube, js: JetStreamContext, log_settings: LogSettings
) -> None:
    kube.create("deployments", controller(SDK_1))
    api = custom_objects_api(str(kube.kubeconfig))
    held = HeldPublishes(js)
    old_leader = SidecarWatcher(api.api_client, held, log_settings, SidecarSettings())  # type: ignore[arg-type]
    new_leader = SidecarWatcher(api.api_client, js, log_settings, SidecarSettings())
    superseded = counter(SIDECAR_SUPERSEDED)
    try:
        # The old leader read the Deployment (sdk 1.44) and the bus; its publish is delayed.
        delayed = asyncio.create_task(old_leader.refresh_once())
        await asyncio.wait_for(held.reached.wait(), 60)
        set_sidecar(kube, SDK_2)  # Agones upgraded: a newer resourceVersion
        assert await new_leader.refresh_once()
        await until_images(js, log_settings.prefix, [SDK_2])
        held.go.set()
        assert await asyncio.wait_for(delayed, 60)
    finally:
        api.api_client.close()
    found = await read_node_images(js, log_settings.prefix)
    assert found[AGONES_SDK_SOURCE].images == [SDK_2], "an older version replaced a newer one"
    assert counter(SIDECAR_SUPERSEDED) == superseded + 1
