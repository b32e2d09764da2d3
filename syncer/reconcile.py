"""The periodic reconcile: make the runtime hold the desired images, whatever removed them.

Every ``sync_period`` (jittered, so a fleet of nodes does not hit the registry in step) one
``ListImages`` call is compared with the desired set, and every missing image is handed to the
puller. The cost is one runtime call per cycle whatever the number of Fleets (the seed made one
ImageStatus call per Fleet per resync). The answer is also kept as the node's view of what is
present, which the event path consults instead of asking the runtime per event.

The same answer feeds the optional cleanup of unused images (``after_list``), so removal costs
no extra runtime call either. Each successful answer also beats the ``runtime`` liveness check:
with the socket mounted as a hostPath file, a restarted runtime can leave the pod holding a stale
socket that only a pod restart fixes, so /healthz fails after ``runtime_allowance`` without one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime

from ops.serving import Health
from syncer import metrics
from syncer.cri import CriClient, CriError, RuntimeImage, RuntimeUnavailable
from syncer.desired import DesiredState
from syncer.puller import Puller, PullResult
from syncer.references import ImageRef, PresentImages

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


# (desired image refs, the runtime's images) after each ListImages: the cleanup's input.
AfterList = Callable[[Collection[ImageRef], list[RuntimeImage]], Awaitable[None]]

DEFAULT_RUNTIME_ALLOWANCE = 300.0


class Reconciler:
    def __init__(
        self,
        cri: CriClient,
        desired: DesiredState,
        puller: Puller,
        health: Health,
        *,
        runtime_allowance: float = DEFAULT_RUNTIME_ALLOWANCE,
        after_list: AfterList | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._cri = cri
        self._desired = desired
        self._puller = puller
        self._health = health
        self._runtime_allowance = runtime_allowance
        self._after_list = after_list
        self._on_change = on_change
        self.present = PresentImages()
        # Desired images whose last pull failed -> the error (never credentials: CriClient
        # redacts them); cleared by a success or by the image turning up.
        self.failed: dict[ImageRef, str] = {}
        self.last_reconcile: datetime | None = None
        self._kick = asyncio.Event()
        self._reported: set[tuple[str, ImageRef]] = set()
        self._images: list[RuntimeImage] = []
        self.last_answer = 0.0

    def runtime_answered(self) -> None:
        """The runtime answered a call: ready, and alive for another ``runtime_allowance``."""
        self.last_answer = time.monotonic()
        self._health.set("runtime", True)
        self._health.beat("runtime", allowance=self._runtime_allowance)

    async def refresh(self) -> PresentImages:
        """One ListImages; raises RuntimeUnavailable/CriError after marking readiness."""
        try:
            images = await self._cri.list_images()
        except RuntimeUnavailable as e:
            metrics.CRI_ERRORS.labels("ListImages").inc()
            self._health.set("runtime", False, str(e))
            raise
        except CriError:
            metrics.CRI_ERRORS.labels("ListImages").inc()
            raise
        self.runtime_answered()
        self._images = images
        self.present = PresentImages.of(images)
        return self.present

    async def reconcile(self) -> list[asyncio.Future[PullResult]]:
        """One pass: refresh, then start a pull for every missing image (not awaited)."""
        started = time.perf_counter()
        try:
            present = await self.refresh()
            wanted = self._desired.by_image()
            missing = [image for image in sorted(wanted) if image not in present]
            self._report_present(wanted, set(missing))
            for image in [i for i in self.failed if i in present or i not in wanted]:
                del self.failed[image]
            self.update_gauges()
            self.last_reconcile = datetime.now(UTC)
            pulls = [self._puller.ensure(image) for image in missing]
            if self._after_list is not None:
                await self._after_list(wanted.keys(), self._images)
            self._on_change()
            return pulls
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)

    def update_gauges(self) -> None:
        wanted = self._desired.by_image()
        present = sum(1 for image in wanted if image in self.present)
        metrics.IMAGES.labels("desired").set(len(wanted))
        metrics.IMAGES.labels("present").set(present)
        metrics.IMAGES.labels("missing").set(len(wanted) - present)
        metrics.FLEETS.labels("admitted").set(len(self._desired))
        metrics.FLEETS.labels("excluded").set(len(self._desired.excluded()))

    def _report_present(self, wanted: dict[ImageRef, set[str]], missing: set[ImageRef]) -> None:
        # Info once per (Fleet, image) becoming present, debug on every later pass: the seed's
        # line stays visible without repeating itself every sync period.
        seen: set[tuple[str, ImageRef]] = set()
        for image in sorted(set(wanted) - missing):
            for fleet in sorted(wanted[image]):
                level = logging.DEBUG if (fleet, image) in self._reported else logging.INFO
                log.log(level, "image already present", extra={"fleet": fleet, "image": str(image)})
                seen.add((fleet, image))
        self._reported = seen

    def mark_reported(self, fleet: str, image: ImageRef) -> None:
        """The event path logged ``image already present`` itself."""
        self._reported.add((fleet, image))

    def on_pull_result(self, result: PullResult) -> None:
        """Called once per finished pull: record it and log it for every Fleet that wants it."""
        image = str(result.image)
        fleets = self._desired.fleets_of(result.image)
        if result.ok:
            self.runtime_answered()
            self.present.add(result.image)
            self.failed.pop(result.image, None)
            for fleet in fleets:
                self._reported.add((fleet, result.image))
                log.info("fleet synced", extra={"fleet": fleet, "image": image, "ref": result.ref})
            self.update_gauges()
            self._on_change()
            return
        if result.deferred:
            return
        self.failed[result.image] = result.error
        # One line per Fleet, so every line about a Fleet carries fleet=namespace/name.
        for fleet in fleets or [""]:
            extra = {"fleet": fleet} if fleet else {}
            log.warning(
                "image pull failed",
                extra={
                    **extra,
                    "image": image,
                    "fleets": ",".join(fleets),
                    "error": result.error,
                    "retry_in": f"{result.retry_in:.1f}s",
                },
            )
        self._on_change()

    def is_present(self, image: ImageRef) -> bool:
        return image in self.present

    def kick(self) -> None:
        """Reconcile now rather than at the end of the current period."""
        self._kick.set()

    async def run(self, period: float, stopping: asyncio.Event) -> None:
        """Reconcile every ``period`` (+-10% jitter) until ``stopping``; the first after one."""
        while not stopping.is_set():
            self._health.beat("reconcile", allowance=max(60.0, period * 4))
            await self._sleep(period * random.uniform(0.9, 1.1), stopping)
            if stopping.is_set():
                break
            try:
                await self.reconcile()
            except RuntimeUnavailable as e:
                log.warning("runtime unavailable", extra={"error": str(e)})
            except CriError as e:
                log.warning("reconcile failed", extra={"error": str(e)})
        self._health.forget("reconcile")

    async def _sleep(self, seconds: float, stopping: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in (self._kick, stopping)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            self._kick.clear()
