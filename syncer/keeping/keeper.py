"""Keeping pre-pulled images on the node: pinning, the disk budget and no fight with image GC.

The three protections against the kubelet's image garbage collector live in their own modules
(:mod:`syncer.keeping.pinning`, :mod:`syncer.keeping.diskbudget`, :mod:`syncer.keeping.gcfight`);
this one puts them together behind the few hooks the syncer's pull path calls, so the runner wires
one object:

- before a pull: :meth:`Keeper.hold_off` (an image that keeps vanishing waits) and the disk
  budget: :meth:`Keeper.precheck` before it queues, :meth:`Keeper.admit` when it really starts
  (charged with its size from the manifest), :meth:`Keeper.release` when it ends;
- after a pull: :meth:`Keeper.on_pull_result` (pin it, remember the node holds it);
- after each ``ListImages``: :meth:`Keeper.observe` (count what vanished, before the missing
  images are pulled again) and :meth:`Keeper.after_list` (the disk budget looks at the disk
  again, pins and unpins follow the Fleets);
- before ``--remove-unused`` removes an image: :meth:`Keeper.removing` (unpin it first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

from nats.js import JetStreamContext

from syncer.folding.references import Holding, ImageRef, InvalidImageReference, normalize
from syncer.keeping.diskbudget import DiskBudget
from syncer.keeping.gcfight import RemovalTracker
from syncer.keeping.manifestsize import ManifestSizes
from syncer.keeping.pinledger import BUCKET
from syncer.keeping.pinning import Pinner
from syncer.keeping.pinsupport import PinningSupport, pinning_support
from syncer.pulling.puller import PullResult
from syncer.runtime.containerd_images import ContainerdImages
from syncer.runtime.cri import (
    CriClient,
    CriError,
    RegistryAuth,
    RuntimeImage,
    RuntimeUnavailable,
    RuntimeVersion,
)
from syncer.settings import KeepingSettings, RuntimeSettings
from wire.nodestatus import DiskSummary, PinSummary
from wire.permissions import bucket_for

__all__ = ["Keeper"]

log = logging.getLogger(__name__)

# Closing containerd's images client: a channel close, bounded all the same.
_CLOSE_PATIENCE = 0.5

Remover = Callable[[str], Awaitable[None]]


class Keeper:
    """Pinning, the disk budget and the removal tracker of one node's syncer."""

    def __init__(
        self,
        settings: KeepingSettings,
        runtime: RuntimeSettings,
        cri: CriClient,
        *,
        node: str,
        prefix: str,
        replicas: int,
        auth_for: Callable[[ImageRef], Sequence[RegistryAuth]] = lambda _: (),
    ) -> None:
        """``node``, ``prefix``, ``replicas``: whose pins, in which bucket, how replicated."""
        self._settings = settings
        self._node, self._prefix, self._replicas = node, prefix, replicas
        self._cri = cri
        self.images = ContainerdImages(runtime.endpoint, call_timeout=runtime.call_timeout)
        self.budget = DiskBudget(
            cri.image_fs_info, max_usage=settings.max_image_fs_usage, host_root=settings.host_root
        )
        self.sizes = ManifestSizes(auth_for)
        self.tracker = RemovalTracker(
            threshold=settings.removal_backoff_after,
            window=settings.removal_window,
            backoff_min=min(60.0, settings.removal_backoff_max),
            backoff_max=settings.removal_backoff_max,
        )
        self.support = PinningSupport(False, "not decided yet")
        self.pinner: Pinner | None = None
        self._decided = False
        self._js: JetStreamContext | None = None

    async def start(self, js: JetStreamContext) -> None:
        """Decide, once the runtime answers, whether this node pins; one log line says so."""
        self._js = js
        await self._decide(js)

    async def _decide(self, js: JetStreamContext) -> None:
        try:
            self.support = await self._support()
        except RuntimeUnavailable as e:
            # Not an answer: decided at a later reconcile, once the runtime is back.
            if not self.support.reason.startswith("undecided"):
                log.info(
                    "image pinning undecided: the runtime does not answer", extra={"error": str(e)}
                )
            self.support = PinningSupport(False, f"undecided: {e}")
            return
        self._decided = True
        if self.support.enabled:
            self.pinner = Pinner(
                self.images,
                js,
                self._node,
                bucket=bucket_for(BUCKET, self._prefix),
                replicas=self._replicas,
                ttl=self._settings.ledger_ttl,
            )
            log.info("images will be pinned", extra={"runtime": self.support.reason})
        else:
            log.info("image pinning off", extra={"reason": self.support.reason})

    async def _support(self) -> PinningSupport:
        if not self._settings.pin_images:
            return await pinning_support(False, RuntimeVersion("", "", ""), self.images)
        version: RuntimeVersion | CriError
        try:
            version = await self._cri.version()
        except RuntimeUnavailable:
            raise
        except CriError as e:  # e.g. UNIMPLEMENTED: a runtime that does not say which it is
            version = e
        return await pinning_support(True, version, self.images)

    # --- before a pull ----------------------------------------------------------------------

    def labels(self) -> ContainerdImages | None:
        """containerd's images client when this node pins (its runtime takes labels), else None."""
        return self.images if self.support.enabled else None

    def hold_off(self, image: ImageRef) -> float:
        """Seconds ``image`` must wait before it is pulled again (it keeps vanishing)."""
        return self.tracker.hold_off(image)

    async def precheck(self, image: ImageRef) -> str:
        """Before ``image``'s pull queues: why it cannot start now (the disk budget), or "".
        Its size is asked of the registry here when it will count, so the pull does not hold
        its slots for it."""
        refused = await self.budget.refuse()
        if not refused and self.budget.room_is_short():
            await self.sizes.of(image)
        return refused

    async def admit(self, image: ImageRef) -> str:
        """Holding its slots: why ``image``'s pull must not start (the disk with the pulls in
        flight and this one), or "" and it is charged until :meth:`release`."""
        return await self.budget.admit(image, lambda: self.sizes.of(image))

    def release(self, image: ImageRef) -> None:
        self.budget.release(image)

    # --- after a pull and after each ListImages -----------------------------------------------

    def on_pull_result(self, result: PullResult) -> None:
        if not result.ok:
            return
        self.tracker.pulled(result.image)
        if self.pinner is not None:
            self.pinner.on_pulled(result.image)

    def observe(self, wanted: Collection[ImageRef], present: Holding) -> None:
        """Count the desired images that vanished since the last answer (before re-pulling)."""
        self.tracker.observe(wanted, present)

    async def after_list(
        self,
        wanted: Collection[ImageRef],
        present: Holding,
        images: Iterable[RuntimeImage] = (),
    ) -> None:
        """``images``: the ListImages answer (which content each tag names now)."""
        # The paused state follows the disk, whether or not a pull asks.
        await self.budget.reevaluate(image for image in wanted if image not in present)
        if not self._decided and self._js is not None:
            await self._decide(self._js)
        if self.pinner is not None:
            await self.pinner.sync(wanted, present, _ids_by_tag(images))

    def removing(self, remover: Remover) -> Remover:
        """``remover`` that first unpins what it removes (a failed unpin defers the removal)."""

        async def remove(ref: str) -> None:
            if self.pinner is not None:
                await self.pinner.release(ref)
            await remover(ref)

        return remove

    # --- status -------------------------------------------------------------------------------

    def held(self, missing: Iterable[ImageRef]) -> dict[str, str]:
        """Why each of the ``missing`` images is not being pulled on purpose now, if it is not."""
        reasons = {}
        for image in missing:
            wait = self.tracker.hold_off(image)
            if wait > 0:
                reasons[str(image)] = (
                    "removed repeatedly behind the syncer's back (image GC?): "
                    f"re-pull in {wait:.0f}s"
                )
            elif self.budget.blocked:
                reasons[str(image)] = self.budget.blocked
        return reasons

    def pin_summary(self, present: Collection[ImageRef]) -> PinSummary:
        """Pinning on this node; ``present`` are the desired images the node holds."""
        pinned = self.pinner.pinned(present) if self.pinner is not None else 0
        return PinSummary(
            enabled=self.support.enabled,
            runtime=self.support.describe(),
            images=len(present) if self.support.enabled else 0,
            pinned=pinned,
        )

    def disk_summary(self) -> DiskSummary:
        usage = self.budget.usage
        return DiskSummary(
            # Whole percents, rounded down (a reading at 79.9% does not read as the 80%
            # threshold): a busy node's disk moves by megabytes all the time, and every
            # change of this number rewrites the node's status entry.
            usage=math.floor(usage.ratio * 100) / 100 if usage is not None else None,
            max_usage=self.budget.max_usage,
            paused=self.budget.blocked,
            gc_backoff=tuple(sorted(str(i) for i in self.tracker.backing_off())),
        )

    async def close(self, patience: float) -> list[ImageRef]:
        """Bounded: pins still waiting after ``patience`` seconds are cancelled; returns their
        images (pinned at the next start)."""
        unpinned = await self.pinner.close(patience) if self.pinner is not None else []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_PATIENCE):
                await self.images.close()
        return unpinned


def _ids_by_tag(images: Iterable[RuntimeImage]) -> dict[ImageRef, str]:
    ids = {}
    for image in images:
        for tag in image.repo_tags:
            with contextlib.suppress(InvalidImageReference):
                ids[normalize(tag)] = image.id
    return ids
