"""What this node holds of the images its Fleets want: one owner, one place for its log lines.

The inventory is the node's side of the picture, as :class:`~syncer.folding.desired.DesiredState` is
the log's: which desired images are present (the last ``ListImages`` answer plus the pulls that
succeeded since, minus the images removed since), which are being pulled, which failed and why,
and which (Fleet, image) pairs were already reported present. The event path (the consumer)
and the periodic reconcile both read it and ask it for pulls; every pull's outcome comes back
here, from the puller, so each outcome is recorded and logged once, however many askers
awaited it.

Removals (``--remove-unused``) go through :meth:`Inventory.removal` too: the image counts as
absent from the moment its removal starts, so an event that wants it again meanwhile asks for a
pull instead of being acked "already present", and that pull waits for the removal to be over
(a pull racing a RemoveImage could be undone by it yet reported a success).

The log lines are Octops image-syncer's (Go) two, kept as operators know them:
``image already present`` (fleet, image) and ``fleet synced`` (fleet, image, ref), plus
``image pull failed``. ``image already present`` is info the first time a (Fleet, image) pair
is seen present and debug on every later reconcile, so the line stays visible without repeating
itself every sync period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable

import grpc

from syncer import metrics
from syncer.folding.desired import DesiredState
from syncer.folding.references import ImageRef, InvalidImageReference, PresentImages, normalize
from syncer.pulling.puller import Puller, PullResult
from syncer.runtime.cri import CriError, RuntimeImage

__all__ = ["Inventory"]

log = logging.getLogger(__name__)


class Inventory:
    def __init__(
        self,
        desired: DesiredState,
        puller: Puller,
        *,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._desired = desired
        self._puller = puller
        self._on_change = on_change
        self.present = PresentImages()
        self._images: list[RuntimeImage] = []  # the last ListImages answer
        # Desired images whose last pull failed -> the error (never credentials: CriClient
        # redacts them); cleared by a success or by the image turning up.
        self.failed: dict[ImageRef, str] = {}
        self._reported: set[tuple[str, ImageRef]] = set()
        # Pulls that succeeded, numbered, until a listing begun after them says what it saw:
        # a ListImages answer may be older than a pull that ended while it was in flight.
        self._pulls_done = 0
        self._pulled: dict[ImageRef, int] = {}
        puller.subscribe(self._record_pull)

    # --- reading ----------------------------------------------------------------------------

    def is_present(self, image: ImageRef) -> bool:
        return image in self.present

    def pulling(self) -> frozenset[ImageRef]:
        """Images being pulled or queued for a slot right now."""
        return self._puller.pulling()

    # --- the runtime's answer ---------------------------------------------------------------

    def listing(self) -> int:
        """Call right before ``ListImages``; hand the answer to :meth:`observe` with this."""
        return self._pulls_done

    def observe(self, images: list[RuntimeImage], since: int | None = None) -> PresentImages:
        """Take one ``ListImages`` answer as what the node holds.

        ``since`` (from :meth:`listing`): pulls that succeeded after the call was made count as
        present though the answer lacks them; the answer may have been taken before they ended.
        The cleanup guards the same race (:mod:`syncer.keeping.cleaner`). Without this, such an
        image counted as removed behind the syncer's back and was pulled again at once.
        """
        self._images = images
        self.present = PresentImages.of(images)
        if since is not None:
            self._pulled = {i: n for i, n in self._pulled.items() if n > since}
            for image in self._pulled:
                self.present.add(image)
        return self.present

    def settle(self, wanted: dict[ImageRef, set[str]]) -> list[ImageRef]:
        """After :meth:`observe`: the wanted images that are missing, in order.

        Reports the present ones (info once per Fleet and image, debug later) and forgets the
        failures of images now present or no longer wanted.
        """
        missing = [image for image in sorted(wanted) if image not in self.present]
        seen: set[tuple[str, ImageRef]] = set()
        for image in sorted(set(wanted) - set(missing)):
            for fleet in sorted(wanted[image]):
                level = logging.DEBUG if (fleet, image) in self._reported else logging.INFO
                log.log(level, "image already present", extra={"fleet": fleet, "image": str(image)})
                seen.add((fleet, image))
        self._reported = seen
        for image in [i for i in self.failed if i in self.present or i not in wanted]:
            del self.failed[image]
        self.update_gauges()
        return missing

    def missing_for(self, fleet: str, images: Iterable[ImageRef]) -> list[ImageRef]:
        """The images of one Fleet's event the node lacks; the present ones are reported."""
        missing = []
        for image in sorted(images):
            if self.is_present(image):
                log.info("image already present", extra={"fleet": fleet, "image": str(image)})
                self._reported.add((fleet, image))
            else:
                missing.append(image)
        return missing

    # --- pulls ------------------------------------------------------------------------------

    def pull(self, image: ImageRef) -> asyncio.Future[PullResult]:
        """The pull of ``image`` (shared by every asker); its outcome is recorded here."""
        return self._puller.ensure(image)

    def pull_all(self, images: Collection[ImageRef]) -> list[asyncio.Future[PullResult]]:
        return [self.pull(image) for image in images]

    def _record_pull(self, result: PullResult) -> None:
        """Called once per finished pull: record it and log it for every Fleet that wants it."""
        image = str(result.image)
        fleets = self._desired.fleets_of(result.image)
        if result.ok:
            self._pulls_done += 1
            self._pulled[result.image] = self._pulls_done
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

    # --- removals ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def removal(self, image: ImageRef) -> AsyncIterator[None]:
        """Around the RemoveImage of ``image``: absent from the start, no pull of it meanwhile.

        Every name the runtime lists for the same image goes with it (removing one name removes
        the image). Refused with a CriError while a pull of it runs; if the removal fails the
        image counts as present again.
        """
        if self._puller.busy(image):
            raise CriError(
                f"RemoveImage {image}: a pull of it is under way",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        names = self._names_of(image)
        for name in names:
            self.present.discard(name)
            self._pulled.pop(name, None)
        try:
            async with self._puller.held(names):
                yield
        except BaseException:
            for name in names:
                self.present.add(name)
            raise
        finally:
            self.update_gauges()
            self._on_change()
        self._images = [i for i in self._images if not names & _names(i)]

    def _names_of(self, image: ImageRef) -> set[ImageRef]:
        names = {image}
        for listed in self._images:
            if image in PresentImages.of([listed]):
                names |= _names(listed)
        return names

    # --- gauges -----------------------------------------------------------------------------

    def update_gauges(self) -> None:
        wanted = self._desired.by_image()
        present = sum(1 for image in wanted if image in self.present)
        metrics.IMAGES.labels("desired").set(len(wanted))
        metrics.IMAGES.labels("present").set(present)
        metrics.IMAGES.labels("missing").set(len(wanted) - present)
        metrics.FLEETS.labels("admitted").set(len(self._desired))
        metrics.FLEETS.labels("excluded").set(len(self._desired.excluded()))


def _names(image: RuntimeImage) -> set[ImageRef]:
    found = set()
    for text in (*image.repo_tags, *image.repo_digests):
        with contextlib.suppress(InvalidImageReference):
            found.add(normalize(text))
    return found
