"""The node-wide images and the startup-taint gate, wired to the rest of the syncer in one place.

The runner knows this module through a handful of calls: build it beside the desired state,
:meth:`Gatekeeper.prepare` before the replay, :meth:`Gatekeeper.opened_for_business` once the
replay and the first reconcile are done, :meth:`Gatekeeper.kick` whenever the node's images may
have changed, and :meth:`Gatekeeper.tasks` for what runs beside the loops. What it does:

- puts ``--extra-image`` and the images on the node-images stream (the Agones SDK sidecar) into
  the desired state, where the reconcile re-pulls them and ``--remove-unused`` keeps them;
- runs the startup-taint gate (``--startup-taint``) against everything the desired state wants,
  Fleets and node-wide images alike, resuming a timeout the previous run left running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from nats.js import JetStreamContext

from syncer.folding.desired import DesiredState
from syncer.folding.references import ImageRef
from syncer.following import PushedSubjects
from syncer.node.nodeimages import NodeImageSet
from syncer.node.nodeinfo import NodeWatcher
from syncer.node.startupgate import StartupGate
from syncer.settings import GateSettings, durable_name
from wire.natsconn import RETRYABLE
from wire.nodestatus import GateStatus, StatusSettings, get_status, open_status_bucket

__all__ = ["Gatekeeper"]

log = logging.getLogger(__name__)


class Gatekeeper:
    def __init__(
        self,
        settings: GateSettings,
        desired: DesiredState,
        node_watcher: NodeWatcher | None,
        *,
        extra_images: tuple[str, ...],
        node: str,
        prefix: str,
        is_present: Callable[[ImageRef], bool],
        on_change: Callable[[], None],
        on_status: Callable[[], None] = lambda: None,
        stalled: Callable[[], str] = lambda: "",
    ) -> None:
        """``on_change``: the desired images changed; ``on_status``: the gate's status did;
        ``stalled``: why no missing image can arrive now, or ""; ``extra_images``: what every
        node keeps besides the Fleets'; ``node``, ``prefix``: whose pushed images, whose status."""
        self.node, self.prefix = node, prefix
        self.desired = desired
        self.is_present = is_present
        self.on_change = on_change
        self.images = NodeImageSet(extra_images, on_change=self._images_changed)
        self._pushed: PushedSubjects | None = None
        desired.set_node_images(self.images.sources)
        self._ready = False
        self.gate: StartupGate | None = None
        if settings.taint and node_watcher is not None:
            self.gate = StartupGate(
                settings.taint,
                node_watcher,
                missing=self.missing,
                ready=lambda: self._ready and self.images.loaded,
                stalled=stalled,
                timeout=settings.timeout,
                on_change=on_status,
            )

    @property
    def status(self) -> GateStatus | None:
        return self.gate.status if self.gate is not None else None

    def missing(self) -> list[str]:
        """Every image the node should hold and does not, Fleets' and node-wide, in order."""
        return [str(i) for i in sorted(self.desired.by_image()) if not self.is_present(i)]

    def kick(self) -> None:
        if self.gate is not None:
            self.gate.kick()

    async def prepare(self, js: JetStreamContext, status: StatusSettings | None) -> None:
        """Before the replay: read the node-wide images, and the gate the last run left."""
        self._pushed = self.images.follower(js, self.prefix, durable_name(self.node))
        await self.images.load(self._pushed)
        if self.gate is None or status is None:
            return
        try:
            kv = await open_status_bucket(js, status)
            previous = None if kv is None else await get_status(kv, self.node)
        except (*RETRYABLE, ValueError) as e:
            # Unknown: the timeout starts over, which only delays the opening.
            log.warning("cannot read this node's previous gate", extra={"error": repr(e)})
            return
        if previous is not None:
            self.gate.resume(previous.summary.gate)

    def opened_for_business(self) -> None:
        """The log is replayed and the runtime listed: "nothing missing" now means it."""
        self._ready = True
        self.kick()

    def tasks(
        self, js: JetStreamContext, stopping: asyncio.Event
    ) -> list[Coroutine[Any, Any, None]]:
        if self._pushed is None:
            self._pushed = self.images.follower(js, self.prefix, durable_name(self.node))
        work = [self.images.follow(self._pushed, stopping)]
        if self.gate is not None:
            work.append(self.gate.run(stopping))
        return work

    def _images_changed(self) -> None:
        if self.desired.set_node_images(self.images.sources):
            self.on_change()
        self.kick()
