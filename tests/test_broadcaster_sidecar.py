"""The broadcaster follows the Agones SDK sidecar image onto the node-images stream."""

from __future__ import annotations

from dataclasses import replace

import pytest
from broadcaster_harness import broadcasting, counter
from broadcaster_harness import settings_fixture as settings_fixture
from fakekube import FakeKube
from fakekube.harness import controller, fleet, set_sidecar, wait_converged
from nats.js import JetStreamContext
from polling import eventually

from broadcaster.kubeapi import custom_objects_api
from broadcaster.settings import Settings, SidecarSettings
from broadcaster.sidecar import SIDECAR_ERRORS, SidecarWatcher, sidecar_image
from wire.contract import AGONES_SDK_SOURCE, Kind, NodeImages
from wire.eventlog import LogSettings, read_log, read_node_images, stream_name

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
