"""The syncer's node-wide images: --extra-image, and the sources the broadcaster publishes."""

from __future__ import annotations

import asyncio

import pytest
from nats.js import JetStreamContext
from support.polling import eventually

from syncer.folding.references import normalize
from syncer.node.nodeimages import EXTRA_SOURCE, NodeImageSet
from wire.contract import AGONES_SDK_SOURCE, NodeImages
from wire.eventlog import LogSettings, ensure_node_images_stream, publish_node_images

pytestmark = pytest.mark.nats

SDK_1 = "registry.example/agones-sdk:1.44.0"
SDK_2 = "registry.example/agones-sdk:1.45.0"


async def test_nothing_published_yet_is_loaded_as_nothing(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    images = NodeImageSet(("fluent-bit:3.1",))
    assert await images.load(images.follower(js, log_settings.prefix, "syncer-n1"))
    assert images.loaded
    assert images.images() == {normalize("docker.io/library/fluent-bit:3.1")}
    assert images.by_source() == {EXTRA_SOURCE: ["docker.io/library/fluent-bit:3.1"]}


async def test_published_images_are_loaded_then_followed(
    js: JetStreamContext, log_settings: LogSettings
) -> None:
    await ensure_node_images_stream(js, log_settings)
    await publish_node_images(js, log_settings, NodeImages(AGONES_SDK_SOURCE, [SDK_1]))
    changes: list[int] = []
    images = NodeImageSet(("base:1",), on_change=lambda: changes.append(1))
    pushed = images.follower(js, log_settings.prefix, "syncer-n1")
    assert await images.load(pushed)
    assert images.by_source()[AGONES_SDK_SOURCE] == [SDK_1]
    stopping = asyncio.Event()
    task = asyncio.create_task(images.follow(pushed, stopping))
    try:
        await publish_node_images(js, log_settings, NodeImages(AGONES_SDK_SOURCE, [SDK_2]))
        # The bus cannot take a node's own --extra-image away.
        await publish_node_images(js, log_settings, NodeImages(EXTRA_SOURCE, []))
        await eventually(
            lambda: images.by_source().get(AGONES_SDK_SOURCE) == [SDK_2],
            lambda: f"the bus's image followed; have {images.by_source()}",
        )
        assert images.by_source()[EXTRA_SOURCE] == ["docker.io/library/base:1"]
        assert len(changes) == 2  # the first load, the new sidecar
    finally:
        stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_an_invalid_image_is_refused_at_start() -> None:
    with pytest.raises(ValueError):
        NodeImageSet(("UPPER/case::bad",))
