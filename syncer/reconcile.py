"""The periodic reconcile: make the runtime hold the desired images, whatever removed them.

Every ``sync_period`` (jittered, so a fleet of nodes does not hit the registry in step) one
``ListImages`` call is compared with the desired set, and every missing image is handed to the
puller. The cost is one runtime call per cycle whatever the number of Fleets (the seed made one
ImageStatus call per Fleet per resync). The answer is also kept as the node's view of what is
present, which the event path consults instead of asking the runtime per event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from ops.serving import Health
from syncer import metrics
from syncer.cri import CriClient, CriError, RuntimeUnavailable
from syncer.desired import DesiredState
from syncer.puller import Puller, PullResult
from syncer.references import ImageRef, PresentImages

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self, cri: CriClient, desired: DesiredState, puller: Puller, health: Health
    ) -> None:
        self._cri = cri
        self._desired = desired
        self._puller = puller
        self._health = health
        self.present = PresentImages()
        self._kick = asyncio.Event()
        self._reported: set[tuple[str, ImageRef]] = set()

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
        self._health.set("runtime", True)
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
            metrics.IMAGES.labels("desired").set(len(wanted))
            metrics.IMAGES.labels("present").set(len(wanted) - len(missing))
            metrics.IMAGES.labels("missing").set(len(missing))
            return [self._puller.ensure(image) for image in missing]
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)

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
            self.present.add(result.image)
            for fleet in fleets:
                self._reported.add((fleet, result.image))
                log.info("fleet synced", extra={"fleet": fleet, "image": image, "ref": result.ref})
            return
        if not result.deferred:
            log.warning(
                "image pull failed",
                extra={
                    "image": image,
                    "fleets": ",".join(fleets),
                    "error": result.error,
                    "retry_in": f"{result.retry_in:.1f}s",
                },
            )

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
