"""Pulling images: a bounded pool, a timeout per pull, backoff per image, one pull per image.

Octops image-syncer (Go) pulled one image at a time with no timeout, so one slow registry stalled
every Fleet. Here each image is pulled by its own task: at most ``max_parallel`` run at once, each
is cut off after ``pull_timeout``, and an image that failed waits out an exponential, jittered
backoff before it is tried again while the others carry on. However many Fleets, events and
reconcile passes ask for an image at the same time, it is pulled once and every asker awaits the
same result.

Outcomes are handed once per pull to every subscriber (:meth:`Puller.subscribe`; the node's
:class:`~syncer.pulling.inventory.Inventory` records and logs them), so a pull awaited by three
askers is logged once, not three times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from ops.lifecycle import cancel_and_wait
from ops.retry import Backoff
from syncer import metrics
from syncer.folding.references import ImageRef
from syncer.pulling.pullbudget import PullBudget
from syncer.pulling.seeding import Seeding, SeedTurn
from syncer.runtime.cri import CriClient, CriError, RegistryAuth, RuntimeUnavailable
from wire.pullfailures import PullFailure, classify

__all__ = ["Admission", "PullResult", "Puller"]

log = logging.getLogger(__name__)

# How long a cancelled pull gets to wind down at stop (the runtime call is cancelled at once).
_CANCEL_PATIENCE = 0.5


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Admission(Protocol):
    """Whether a pull may start (the disk budget): :class:`syncer.keeping.keeper.Keeper`."""

    async def precheck(self, image: ImageRef) -> str:
        """Before the pull queues for its slots: why it cannot start now, or ""."""
        ...

    async def admit(self, image: ImageRef) -> str:
        """Holding its slots, right before the runtime pulls: why not, or "" (then
        :meth:`release` follows once it ends)."""
        ...

    def release(self, image: ImageRef) -> None: ...


@dataclass(frozen=True)
class PullResult:
    image: ImageRef
    ok: bool
    ref: str = ""  # the image id/ref the runtime answered with
    error: str = ""
    # The runtime itself was unreachable: not the image's fault, so no backoff is charged.
    transient: bool = False
    # Not attempted: the image is waiting out its backoff, or the syncer is stopping.
    deferred: bool = False
    retry_in: float = 0.0


class Puller:
    def __init__(
        self,
        cri: CriClient,
        *,
        max_parallel: int,
        pull_timeout: float,
        backoff: Backoff,
        auth_for: Callable[[ImageRef], Sequence[RegistryAuth]] = lambda _: (),
        on_result: Callable[[PullResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        budget: PullBudget | None = None,
        hold: Callable[[ImageRef], float] = lambda _: 0.0,
        admission: Admission | None = None,
        before: Callable[[ImageRef], Awaitable[None]] | None = None,
        seeding: Seeding | None = None,
    ) -> None:
        self._cri = cri
        # Before a pull: how long an image must still wait (it keeps vanishing: GC backoff), and
        # why it may not start now (the disk budget). Neither counts as a failure.
        self._hold = hold
        self._admission = admission
        # Right before the runtime pulls (the cleanup records the pull it is about to own).
        self._before = before
        # The cluster-wide pull budget (--max-cluster-pulls), taken before the node's own slot;
        # before that, with a mirror, the image's seed (--mirror): which slots the pull takes.
        self._budget = budget
        self._seeding = seeding
        self._slots = asyncio.Semaphore(max_parallel)
        self._timeout = pull_timeout
        self._backoff = backoff
        self._auth_for = auth_for
        self._subscribers: list[Callable[[PullResult], None]] = []
        if on_result is not None:
            self.subscribe(on_result)
        self._clock = clock
        self._inflight: dict[ImageRef, asyncio.Task[PullResult]] = {}
        # The runtime call of each pull that holds its slots: what a stop cancels.
        self._attempts: dict[ImageRef, asyncio.Task[PullResult]] = {}
        self._failures: dict[ImageRef, int] = {}
        self._not_before: dict[ImageRef, float] = {}
        self._closing = False
        # Images a removal is under way for -> set once it is over; their pulls wait for it.
        self._held: dict[ImageRef, asyncio.Event] = {}

    def subscribe(self, on_result: Callable[[PullResult], None]) -> None:
        """Call ``on_result`` with every pull's outcome, in subscription order."""
        self._subscribers.append(on_result)

    def ensure(self, image: ImageRef) -> asyncio.Future[PullResult]:
        """The pull of ``image``: the one already running, a new one, or a deferred result."""
        running = self._inflight.get(image)
        if running is not None:
            return running
        wait = self.backoff_left(image)
        held = self._hold(image)
        if wait > 0 or held > 0 or self._closing:
            done: asyncio.Future[PullResult] = asyncio.get_running_loop().create_future()
            reason = "stopping" if self._closing else "in backoff after a failure"
            if held > wait and not self._closing:
                metrics.PULLS_SKIPPED.labels("gc_backoff").inc()
                reason, wait = "removed repeatedly behind the syncer's back", held
            done.set_result(PullResult(image, False, error=reason, deferred=True, retry_in=wait))
            return done
        task = asyncio.create_task(self._pull(image), name=f"pull {image}")
        self._inflight[image] = task
        task.add_done_callback(lambda _: self._inflight.pop(image, None))
        return task

    def backoff_left(self, image: ImageRef) -> float:
        return max(0.0, self._not_before.get(image, 0.0) - self._clock())

    def busy(self, image: ImageRef) -> bool:
        return image in self._inflight

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def pulling(self) -> frozenset[ImageRef]:
        """Images being pulled or queued for a slot right now."""
        return frozenset(self._inflight)

    @contextlib.asynccontextmanager
    async def held(self, images: Collection[ImageRef]) -> AsyncIterator[None]:
        """No pull of ``images`` starts while held: a removal of them is under way, and a pull
        racing it could be undone by it yet reported a success."""
        over = asyncio.Event()
        for image in images:
            self._held[image] = over
        try:
            yield
        finally:
            for image in images:
                if self._held.get(image) is over:
                    del self._held[image]
            over.set()

    async def close(self, patience: float) -> list[ImageRef]:
        """Start no new pulls (queued ones give up); let running ones finish for ``patience``
        seconds, then cancel them. Returns the images whose pull was cancelled.

        A cancelled pull ends as deferred ("stopping"), like a queued one: its event is handed
        back to NATS for redelivery, and the next start pulls the image again.
        """
        self._closing = True
        if self._budget is not None:
            self._budget.stop()
        if self._seeding is not None:
            self._seeding.stop()
        pulls = dict(self._inflight)
        if not pulls:
            return []
        if patience > 0:
            await asyncio.wait(pulls.values(), timeout=patience)
        abandoned = {image for image, attempt in self._attempts.items() if not attempt.done()}
        for attempt in list(self._attempts.values()):
            attempt.cancel()
        # The others end on their own once the cancelled ones free their slots (they see
        # ``_closing``); one waiting for something else (a removal) is cancelled too.
        late = [task for task in pulls.values() if not task.done()]
        if late:
            await asyncio.wait(late, timeout=_CANCEL_PATIENCE)
            await cancel_and_wait(late, patience=_CANCEL_PATIENCE)
        abandoned |= {image for image, task in pulls.items() if task.cancelled()}
        return sorted(abandoned)

    async def _pull(self, image: ImageRef) -> PullResult:
        while (removal := self._held.get(image)) is not None:
            await removal.wait()
        admission = self._admission
        if admission is not None:
            refused = await admission.precheck(image)
            if refused:
                # Not a failure of the image: no backoff, no result; the next reconcile retries.
                return PullResult(image, False, error=refused, deferred=True)
        async with self._turn(image) as turn:
            result = await self._pull_in_turn(image, turn)
        if result.deferred:  # stopping while it waited: not attempted
            return result
        if self._budget is not None and not result.ok:
            await self._budget.observe(image, result.error, mirrored=turn.mirrored)
        result = self._account(result)
        for on_result in self._subscribers:
            try:
                on_result(result)
            except Exception:
                log.exception("pull result handler failed", extra={"image": str(image)})
        return result

    def _turn(self, image: ImageRef) -> contextlib.AbstractAsyncContextManager[SeedTurn]:
        if self._seeding is None:
            return contextlib.nullcontext(SeedTurn(mirrored=False))
        return self._seeding.turn(image)

    async def _pull_in_turn(self, image: ImageRef, turn: SeedTurn) -> PullResult:
        budget, admission = self._budget, self._admission
        cluster_slot = (
            budget.slot(image, mirrored=turn.mirrored)
            if budget is not None
            else contextlib.nullcontext()
        )
        async with cluster_slot, self._slots:
            if self._closing:
                return PullResult(image, False, error="stopping", deferred=True)
            # Checked again now that it really starts: the pulls it queued behind may have
            # filled the disk, and pulls starting together must not share one look at it.
            refused = await admission.admit(image) if admission is not None else ""
            if refused:
                return PullResult(image, False, error=refused, deferred=True)
            try:
                result = await self._run_attempt(image)
            finally:
                if admission is not None:
                    admission.release(image)
        turn.pulled = result.ok
        return result

    async def _run_attempt(self, image: ImageRef) -> PullResult:
        """The runtime's pull, as a task of its own that a stop may cancel (deferred then)."""
        if self._before is not None:
            try:
                await self._before(image)
            except Exception:
                log.exception("before-pull hook failed", extra={"image": str(image)})
        started = self._clock()
        attempt = asyncio.create_task(self._attempt(image), name=f"pull attempt {image}")
        self._attempts[image] = attempt
        try:
            result = await attempt
        except asyncio.CancelledError:
            if _cancelling():
                raise  # this pull itself was cancelled
            # Only the runtime call was: the stop gave up on it.
            return PullResult(image, False, error="stopping", deferred=True)
        finally:
            self._attempts.pop(image, None)
        metrics.PULL_DURATION.observe(max(0.0, self._clock() - started))
        return result

    async def _attempt(self, image: ImageRef) -> PullResult:
        try:
            async with asyncio.timeout(self._timeout):
                ref = await self._pull_with_credentials(image)
        except TimeoutError:
            metrics.PULLS.labels("timeout").inc()
            metrics.PULL_FAILURES.labels(PullFailure.TIMEOUT).inc()
            return PullResult(image, False, error=f"pull timed out after {self._timeout:g}s")
        except RuntimeUnavailable as e:
            metrics.PULLS.labels("unavailable").inc()
            metrics.PULL_FAILURES.labels(PullFailure.RUNTIME_UNAVAILABLE).inc()
            metrics.CRI_ERRORS.labels("PullImage").inc()
            return PullResult(image, False, error=str(e), transient=True)
        except CriError as e:
            metrics.PULLS.labels("failure").inc()
            metrics.PULL_FAILURES.labels(classify(str(e))).inc()
            metrics.CRI_ERRORS.labels("PullImage").inc()
            return PullResult(image, False, error=str(e))
        metrics.PULLS.labels("success").inc()
        return PullResult(image, True, ref=ref)

    async def _pull_with_credentials(self, image: ImageRef) -> str:
        # As the kubelet: try each matching credential in turn, anonymous when there is none.
        auths: Sequence[RegistryAuth | None] = self._auth_for(image) or (None,)
        for auth in auths[:-1]:
            try:
                return await self._cri.pull_image(str(image), auth, timeout=self._timeout)
            except RuntimeUnavailable:
                raise
            except CriError:
                continue
        return await self._cri.pull_image(str(image), auths[-1], timeout=self._timeout)

    def _account(self, result: PullResult) -> PullResult:
        image = result.image
        if result.ok:
            self._failures.pop(image, None)
            self._not_before.pop(image, None)
            return result
        if result.transient:
            return result
        failures = self._failures.get(image, 0) + 1
        self._failures[image] = failures
        delay = self._backoff.delay(failures)
        self._not_before[image] = self._clock() + delay
        return PullResult(image, False, error=result.error, retry_in=delay)
