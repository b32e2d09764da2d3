"""Keeping pre-pulled images on the node: pinning, the disk budget and no fight with image GC.

The three protections against the kubelet's image garbage collector live in their own modules
(:mod:`syncer.pinning`, :mod:`syncer.diskbudget`, :mod:`syncer.gcfight`); this one puts them
together behind the few hooks the syncer's pull path calls, so the runner wires one object:

- before a pull: :meth:`Keeper.hold_off` (an image that keeps vanishing waits) and
  :meth:`Keeper.refuse` (no pull while the image filesystem is over budget);
- after a pull: :meth:`Keeper.on_pull_result` (pin it, remember the node holds it);
- after each ``ListImages``: :meth:`Keeper.observe` (count what vanished, before the missing
  images are pulled again) and :meth:`Keeper.after_list` (pin and unpin to match the Fleets);
- before ``--remove-unused`` removes an image: :meth:`Keeper.removing` (unpin it first).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Container

from nats.js import JetStreamContext

from syncer.containerd_images import ContainerdImages
from syncer.cri import CriClient, CriError, RuntimeVersion
from syncer.diskbudget import DiskBudget
from syncer.gcfight import RemovalTracker
from syncer.pinning import BUCKET, Pinner, PinningSupport, pinning_support
from syncer.puller import PullResult
from syncer.references import ImageRef
from syncer.settings import SyncerSettings
from wire.permissions import bucket_for

__all__ = ["Keeper"]

log = logging.getLogger(__name__)

Remover = Callable[[str], Awaitable[None]]


class Keeper:
    """Pinning, the disk budget and the removal tracker of one node's syncer."""

    def __init__(self, settings: SyncerSettings, cri: CriClient) -> None:
        self._settings = settings
        self._cri = cri
        self._images = ContainerdImages(
            settings.cri_endpoint, call_timeout=settings.cri_call_timeout
        )
        self.budget = DiskBudget(
            cri.image_fs_info, max_usage=settings.max_image_fs_usage, host_root=settings.host_root
        )
        self.tracker = RemovalTracker(
            threshold=settings.removal_backoff_after,
            window=settings.removal_window,
            backoff_min=min(60.0, settings.removal_backoff_max),
            backoff_max=settings.removal_backoff_max,
        )
        self.support = PinningSupport(False, "not decided yet")
        self.pinner: Pinner | None = None

    async def start(self, js: JetStreamContext) -> None:
        """Decide, once the runtime answers, whether this node pins; one log line says so."""
        version: RuntimeVersion | CriError
        try:
            version = await self._cri.version()
        except CriError as e:
            version = e
        self.support = await pinning_support(self._settings.pin_images, version, self._images)
        if self.support.enabled:
            self.pinner = Pinner(
                self._images,
                js,
                self._settings.node_name,
                bucket=bucket_for(BUCKET, self._settings.subject_prefix),
                replicas=self._settings.status_replicas,
            )
            log.info("images will be pinned", extra={"runtime": self.support.reason})
        else:
            log.info("image pinning off", extra={"reason": self.support.reason})

    # --- before a pull ----------------------------------------------------------------------

    def hold_off(self, image: ImageRef) -> float:
        """Seconds ``image`` must wait before it is pulled again (it keeps vanishing)."""
        return self.tracker.hold_off(image)

    async def refuse(self) -> str:
        """Why no pull may start now (the disk budget), or ""."""
        return await self.budget.refuse()

    # --- after a pull and after each ListImages -----------------------------------------------

    def on_pull_result(self, result: PullResult) -> None:
        if not result.ok:
            return
        self.tracker.pulled(result.image)
        if self.pinner is not None:
            self.pinner.on_pulled(result.image)

    def observe(self, wanted: Collection[ImageRef], present: Container[ImageRef]) -> None:
        """Count the desired images that vanished since the last answer (before re-pulling)."""
        self.tracker.observe(wanted, present)

    async def after_list(self, wanted: Collection[ImageRef], present: Container[ImageRef]) -> None:
        if self.pinner is not None:
            await self.pinner.sync(wanted, present)

    def removing(self, remover: Remover) -> Remover:
        """``remover`` that first unpins what it removes (a failed unpin defers the removal)."""

        async def remove(ref: str) -> None:
            if self.pinner is not None:
                await self.pinner.release(ref)
            await remover(ref)

        return remove

    # --- status -------------------------------------------------------------------------------

    def pinned(self, wanted: Collection[ImageRef]) -> int:
        return self.pinner.pinned(wanted) if self.pinner is not None else 0

    async def close(self) -> None:
        if self.pinner is not None:
            await self.pinner.close()
        await self._images.close()
