"""Images this node keeps besides the Fleets': ``--extra-image`` and what the broadcaster publishes.

Two sources, one treatment: the images named with ``--extra-image`` (a log shipper, a game-wide
base image) and the images on the node-images stream (the Agones SDK sidecar, which runs in every
GameServer pod). Both are pulled like a Fleet's images, re-pulled by the reconcile when deleted,
never removed by ``--remove-unused``, and count toward the startup-taint gate.

The stream holds one message per source, so :meth:`NodeImageSet.load` reads it whole at start
(before the gate may open) through the node's named push consumer (:mod:`syncer.following`), and
:meth:`NodeImageSet.follow` keeps it: an Agones upgrade reaches every node as one message, and
an idle node costs the cluster nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ops.logs import describe_error
from syncer import metrics
from syncer.folding.references import ImageRef, InvalidImageReference, normalize
from syncer.following import ConsumerBusy, ConsumerLost, PushedSubjects, follow
from wire.contract import ContractError, NodeImages, decode_node_images, node_images_filter
from wire.eventlog import node_images_stream_name
from wire.natsconn import RETRYABLE
from wire.permissions import IMAGES_CONSUMER_SUFFIX

__all__ = ["CONSUMER_SUFFIX", "EXTRA_SOURCE", "NodeImageSet"]

log = logging.getLogger(__name__)

EXTRA_SOURCE = "extra"
# The node's push consumer on the node-images stream: ``<durable>-images``.
CONSUMER_SUFFIX = IMAGES_CONSUMER_SUFFIX


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

    def follower(self, js: JetStreamContext, prefix: str, durable: str) -> PushedSubjects:
        """The push consumer ``<durable>-images`` over every source of the node-images stream."""
        return PushedSubjects(
            js,
            node_images_stream_name(prefix),
            node_images_filter(prefix),
            f"{durable}{CONSUMER_SUFFIX}",
        )

    async def load(self, pushed: PushedSubjects, *, timeout: float = 10.0) -> bool:
        """Open ``pushed`` and apply what the stream holds now; False (and not loaded) when NATS
        failed. A stream nobody created yet holds nothing: loaded, and followed later."""
        try:
            await pushed.open()
            deadline = asyncio.get_running_loop().time() + timeout
            while not pushed.caught_up:
                left = deadline - asyncio.get_running_loop().time()
                msg = await pushed.next(timeout=left) if left > 0 else None
                if msg is None:
                    raise TimeoutError("the node images did not arrive")
                self._take(msg.data)
        except nats.js.errors.NotFoundError:
            await pushed.close()
        except (*RETRYABLE, ConsumerLost, ConsumerBusy) as e:
            await pushed.close()
            metrics.NATS_ERRORS.labels("node_images").inc()
            log.warning("cannot read the node images yet", extra={"error": describe_error(e)})
            return False
        self._loaded()
        return True

    async def follow(self, pushed: PushedSubjects, stopping: asyncio.Event) -> None:
        """Apply every new message until ``stopping``; loads first if :meth:`load` failed."""

        async def take(msg: Msg) -> None:
            if self._take(msg.data) and self.on_change is not None:
                self.on_change()

        await follow(
            pushed,
            take,
            stopping,
            what="node images",
            on_caught_up=self._loaded,
            opened=pushed.is_open,
        )

    def _loaded(self) -> None:
        first, self.loaded = not self.loaded, True
        # The first load is news even without a change: the gate may have waited for it.
        if first and self.on_change is not None:
            self.on_change()

    def _take(self, data: bytes) -> bool:
        try:
            message = decode_node_images(data)
        except ContractError as e:
            metrics.TERMINATED.labels("invalid_node_images").inc()
            log.warning("node-images message skipped", extra={"error": str(e)})
            return False
        return self.apply(message)
