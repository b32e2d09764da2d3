"""No fight with the image garbage collector: notice images that keep vanishing, back off.

The syncer re-pulls whatever desired image is missing, at once: an image deleted by hand comes
back within a sync period, as Octops image-syncer (Go) promised. But when the kubelet's image GC
deletes pre-pulled images because the disk is over its threshold, re-pulling at once only starts a
loop (pull, GC, pull, GC) that burns registry bandwidth and disk I/O and still leaves the node
without the image when a game server arrives.

So every desired image this node held and then lost without the syncer removing it is counted
(``image_syncer_images_removed_externally_total{image=...}``). Once one image vanished
``threshold`` times within ``window``, its re-pull waits, doubling from ``backoff_min`` up to
``backoff_max`` with each further vanishing (the project's jittered :class:`~ops.retry.Backoff`,
so nodes that lost an image together do not all pull it again together), and one warning says
what is likely happening and what to do. A single removal is re-pulled at once as before. An
image that stays put for a whole window starts again from a clean slate.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Collection

from ops.retry import Backoff
from syncer import metrics
from syncer.folding.references import Holding, ImageRef

__all__ = ["RemovalTracker"]

log = logging.getLogger(__name__)

HINT = (
    "likely the kubelet's image garbage collector under disk pressure (or imageMaximumGCAge): "
    "pin images (--pin-images, containerd 1.7+ and Kubernetes 1.29+), free disk or give the "
    "image filesystem more room, and keep --max-image-fs-usage below the kubelet's "
    "imageGCHighThresholdPercent"
)


class RemovalTracker:
    """Per desired image: was it here, is it gone, how often lately, when may it come back."""

    def __init__(
        self,
        *,
        threshold: int = 3,
        window: float = 3600.0,
        backoff_min: float = 60.0,
        backoff_max: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if threshold < 1 or window <= 0 or not 0 < backoff_min <= backoff_max:
            raise ValueError("need threshold >= 1, window > 0 and 0 < backoff_min <= backoff_max")
        self.threshold = threshold
        self.window = window
        self._backoff = Backoff(backoff_min, backoff_max, rng=rng)
        self._clock = clock
        self._held: set[ImageRef] = set()
        self._removals: dict[ImageRef, deque[float]] = {}
        self._not_before: dict[ImageRef, float] = {}
        self._warned: set[ImageRef] = set()
        self._counted: set[ImageRef] = set()  # images with a metric series

    def pulled(self, image: ImageRef) -> None:
        """The syncer's pull of ``image`` succeeded: the node holds it now."""
        self._held.add(image)

    def observe(self, wanted: Collection[ImageRef], present: Holding) -> list[ImageRef]:
        """After each ListImages: count the wanted images that vanished; returns them."""
        now = self._clock()
        vanished = sorted(i for i in self._held if i in wanted and i not in present)
        for image in vanished:
            self._vanished(image, now)
        self._held = {image for image in wanted if image in present}
        for image in [i for i in self._removals if i not in wanted]:
            self._forget(image)
        for image in [i for i in self._counted if i not in wanted]:
            # Bounded label set: a series lives only while its image is desired.
            self._counted.discard(image)
            with contextlib.suppress(KeyError):
                metrics.IMAGES_REMOVED_EXTERNALLY.remove(str(image))
        for image in list(self._removals):
            self._expire(image, now)
        return vanished

    def hold_off(self, image: ImageRef) -> float:
        """Seconds before ``image`` may be pulled again; 0 when it may be now."""
        return max(0.0, self._not_before.get(image, 0.0) - self._clock())

    def backing_off(self) -> frozenset[ImageRef]:
        """Images whose re-pull waits right now."""
        now = self._clock()
        return frozenset(i for i, t in self._not_before.items() if t > now)

    def _vanished(self, image: ImageRef, now: float) -> None:
        metrics.IMAGES_REMOVED_EXTERNALLY.labels(str(image)).inc()
        self._counted.add(image)
        removals = self._removals.setdefault(image, deque())
        removals.append(now)
        self._expire(image, now)
        count = len(removals)
        if count < self.threshold:
            log.info(
                "image removed behind the syncer's back, pulling it again",
                extra={"image": str(image), "removals": count},
            )
            return
        delay = self._backoff.delay(count - self.threshold + 1)
        self._not_before[image] = now + delay
        extra = {
            "image": str(image),
            "removals": count,
            "window": f"{self.window:g}s",
            "retry_in": f"{delay:.0f}s",
        }
        if image in self._warned:
            log.info("image removed again, re-pull backs off further", extra=extra)
            return
        self._warned.add(image)
        log.warning(
            "image keeps being removed behind the syncer's back, re-pulls back off",
            extra={**extra, "cause": HINT},
        )

    def _expire(self, image: ImageRef, now: float) -> None:
        removals = self._removals[image]
        while removals and now - removals[0] > self.window:
            removals.popleft()
        if not removals and self._not_before.get(image, 0.0) <= now:
            # Quiet for a whole window: the next removal is a single one again.
            del self._removals[image]
            self._not_before.pop(image, None)
            self._warned.discard(image)

    def _forget(self, image: ImageRef) -> None:
        del self._removals[image]
        self._not_before.pop(image, None)
        self._warned.discard(image)
