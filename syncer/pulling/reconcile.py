"""The periodic reconcile: make the runtime hold the desired images, whatever removed them.

Every ``sync_period`` (jittered, so a fleet of nodes does not hit the registry in step) one
``ListImages`` call is compared with the desired set, and every missing image is pulled. The cost
is one runtime call per cycle whatever the number of Fleets (Octops image-syncer (Go) made one
ImageStatus call per Fleet per resync). The answer becomes the node's
:class:`~syncer.pulling.inventory.Inventory`, which the event path consults instead of asking the
runtime per event.

The same answer feeds the optional cleanup of unused images (``after_list``), so removal costs
no extra runtime call either; and it counts as the runtime answering
(:class:`~syncer.pulling.runtimehealth.RuntimeHealth`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime

from ops.lifecycle import wait_any
from ops.serving import Health
from syncer import metrics
from syncer.folding.desired import DesiredState
from syncer.folding.references import ImageRef, PresentImages
from syncer.pulling.inventory import Inventory
from syncer.pulling.puller import PullResult
from syncer.pulling.runtimehealth import RuntimeHealth
from syncer.runtime.cri import CriClient, CriError, RuntimeImage, RuntimeUnavailable

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


# (the desired image refs now, the runtime's images) after each ListImages: the cleanup's input.
AfterList = Callable[[Callable[[], Collection[ImageRef]], list[RuntimeImage]], Awaitable[None]]
# (desired image refs, what the node holds) after each ListImages, before any pull starts: the
# removal tracker counts what vanished here, so its backoff applies to this pass's pulls.
Observe = Callable[[Collection[ImageRef], PresentImages], None]


class Reconciler:
    def __init__(
        self,
        cri: CriClient,
        desired: DesiredState,
        inventory: Inventory,
        runtime: RuntimeHealth,
        health: Health,
        *,
        after_list: AfterList | None = None,
        observe: Observe | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._cri = cri
        self._desired = desired
        self._inventory = inventory
        self._runtime = runtime
        self._health = health
        self._after_list = after_list
        self._observe = observe
        self._on_change = on_change
        self.last_reconcile: datetime | None = None
        self._kick = asyncio.Event()

    async def refresh(self) -> list[RuntimeImage]:
        """One ListImages, taken into the inventory; raises RuntimeUnavailable/CriError after
        marking readiness."""
        since = self._inventory.listing()
        try:
            images = await self._cri.list_images()
        except RuntimeUnavailable as e:
            metrics.CRI_ERRORS.labels("ListImages").inc()
            self._runtime.unavailable(str(e))
            raise
        except CriError:
            metrics.CRI_ERRORS.labels("ListImages").inc()
            raise
        self._runtime.answered()
        self._inventory.observe(images, since)
        return images

    async def reconcile(self) -> list[asyncio.Future[PullResult]]:
        """One pass: refresh, then start a pull for every missing image (not awaited)."""
        started = time.perf_counter()
        try:
            images = await self.refresh()
            wanted = self._desired.by_image()
            if self._observe is not None:
                self._observe(wanted.keys(), self._inventory.present)
            missing = self._inventory.settle(wanted)
            self.last_reconcile = datetime.now(UTC)
            pulls = self._inventory.pull_all(missing)
            if self._after_list is not None:
                # The desired images as they are when each removal is decided, not as they were
                # at the ListImages: events keep being folded while the cleanup awaits.
                await self._after_list(self._desired.by_image, images)
            self._on_change()
            return pulls
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)

    def kick(self) -> None:
        """Reconcile now rather than at the end of the current period."""
        self._kick.set()

    async def run(self, period: float, stopping: asyncio.Event) -> None:
        """Reconcile every ``period`` (+-10% jitter) until ``stopping``; the first after one."""
        while not stopping.is_set():
            self._health.beat("reconcile", allowance=max(60.0, period * 4))
            await wait_any(self._kick, stopping, timeout=period * random.uniform(0.9, 1.1))
            self._kick.clear()
            if stopping.is_set():
                break
            try:
                await self.reconcile()
            except RuntimeUnavailable as e:
                log.warning("runtime unavailable", extra={"error": str(e)})
            except CriError as e:
                log.warning("reconcile failed", extra={"error": str(e)})
        self._health.forget("reconcile")
