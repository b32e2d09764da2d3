"""Images this node keeps besides the Fleets': ``--extra-image`` and what the broadcaster publishes.

Two sources, one treatment: the images named with ``--extra-image`` (a log shipper, a game-wide
base image) and the images on the node-images stream (the Agones SDK sidecar, which runs in every
GameServer pod). Both are pulled like a Fleet's images, re-pulled by the reconcile when deleted,
never removed by ``--remove-unused``, and count toward the startup-taint gate.

The stream holds one message per source, so :meth:`NodeImageSet.load` reads it whole at start
(before the gate may open) and :meth:`NodeImageSet.follow` then keeps one ordered consumer on it:
an Agones upgrade reaches every node as one message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.js.errors
from nats.js import JetStreamContext

from ops.lifecycle import sleep_unless_stopping
from ops.logs import describe_error
from syncer import metrics
from syncer.references import ImageRef, InvalidImageReference, normalize
from wire.contract import ContractError, NodeImages, decode_node_images
from wire.eventlog import node_images_stream_name, read_log, read_node_images
from wire.natsconn import RETRYABLE

__all__ = ["EXTRA_SOURCE", "NodeImageSet"]

log = logging.getLogger(__name__)

EXTRA_SOURCE = "extra"
_RETRY = 5.0


class NodeImageSet:
    """The node-wide images by source, normalized; ``loaded`` once the stream was read."""

    def __init__(self, extra: tuple[str, ...] = (), *, on_change: Callable[[], None] | None = None):
        self.sources: dict[str, tuple[ImageRef, ...]] = {}
        if extra:
            self.sources[EXTRA_SOURCE] = tuple(dict.fromkeys(normalize(i) for i in extra))
        self.on_change = on_change
        self.loaded = False

    def images(self) -> frozenset[ImageRef]:
        return frozenset(i for images in self.sources.values() for i in images)

    def by_source(self) -> dict[str, list[str]]:
        return {source: [str(i) for i in images] for source, images in self.sources.items()}

    def apply(self, message: NodeImages) -> bool:
        """Take one published source's images; True if they changed."""
        if message.source == EXTRA_SOURCE:
            return False  # the node's own flag is not the bus's to override
        images: list[ImageRef] = []
        for text in message.images:
            try:
                images.append(normalize(text))
            except InvalidImageReference as e:
                metrics.TERMINATED.labels("invalid_node_image").inc()
                log.warning("node image skipped", extra={"source": message.source, "error": str(e)})
        new = tuple(dict.fromkeys(images))
        if self.sources.get(message.source) == new:
            return False
        old = self.sources.get(message.source, ())
        self.sources[message.source] = new
        log.info(
            "node images updated",
            extra={
                "source": message.source,
                "origin": message.origin,
                "images": [str(i) for i in new],
                "previous": [str(i) for i in old],
            },
        )
        return True

    async def load(self, js: JetStreamContext, prefix: str) -> bool:
        """Read every source once; False (and not loaded) when NATS failed."""
        try:
            found = await read_node_images(js, prefix)
        except RETRYABLE as e:
            metrics.NATS_ERRORS.labels("node_images").inc()
            log.warning("cannot read the node images yet", extra={"error": describe_error(e)})
            return False
        changed = [self.apply(message) for message in found.values()]
        first, self.loaded = not self.loaded, True
        # The first load is news even without a change: the gate may have waited for it.
        if (any(changed) or first) and self.on_change is not None:
            self.on_change()
        return True

    async def follow(self, js: JetStreamContext, prefix: str, stopping: asyncio.Event) -> None:
        """Apply every new message until ``stopping``; loads first if :meth:`load` failed."""
        stream = node_images_stream_name(prefix)
        while not stopping.is_set():
            if not self.loaded and not await self.load(js, prefix):
                await sleep_unless_stopping(stopping, _RETRY)
                continue
            try:
                async for stored in read_log(js, stream, follow=True):
                    if stopping.is_set():
                        return
                    try:
                        message = decode_node_images(stored.data)
                    except ContractError as e:
                        metrics.TERMINATED.labels("invalid_node_images").inc()
                        log.warning("node-images message skipped", extra={"error": str(e)})
                        continue
                    if self.apply(message) and self.on_change is not None:
                        self.on_change()
            except nats.js.errors.NotFoundError:
                pass  # no broadcaster has published any yet; look again later
            except RETRYABLE as e:
                metrics.NATS_ERRORS.labels("node_images").inc()
                log.warning("following the node images failed, retrying", extra={"error": repr(e)})
            await sleep_unless_stopping(stopping, _RETRY)
