"""Whether the container runtime answers: readiness, liveness, and the wait for it at start.

Every answer of the runtime (a ``ListImages``, a successful pull, a direct check) makes the
syncer ready and alive for another ``allowance``. With the socket mounted as a hostPath file, a
restarted runtime can leave the pod holding a stale socket that only a pod restart fixes, so
/healthz fails once the runtime has not answered for ``allowance``. When nothing else asked the
runtime for a while (during a long replay, say) :meth:`RuntimeHealth.watch` asks it directly.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ops.lifecycle import sleep_unless_stopping
from ops.retry import Backoff, retry
from ops.serving import Health
from syncer import metrics
from syncer.pulling.puller import PullResult
from syncer.runtime.cri import CriClient, CriError

__all__ = ["DEFAULT_ALLOWANCE", "RuntimeHealth"]

log = logging.getLogger(__name__)

DEFAULT_ALLOWANCE = 300.0


class RuntimeHealth:
    def __init__(
        self, cri: CriClient, health: Health, *, allowance: float = DEFAULT_ALLOWANCE
    ) -> None:
        self._cri = cri
        self._health = health
        self.allowance = allowance
        self.last_answer = 0.0

    def answered(self) -> None:
        """The runtime answered a call: ready, and alive for another ``allowance``."""
        self.last_answer = time.monotonic()
        self._health.set("runtime", True)
        self._health.beat("runtime", allowance=self.allowance)

    def unavailable(self, reason: str) -> None:
        """The runtime could not be reached: not ready (alive until the allowance runs out)."""
        self._health.set("runtime", False, reason)

    def on_pull_result(self, result: PullResult) -> None:
        if result.ok:
            self.answered()

    async def wait_until_reachable(self, stopping: asyncio.Event) -> bool:
        """Check the runtime until it answers (True) or the syncer stops (False)."""
        self._health.beat("runtime", allowance=self.allowance)

        async def check() -> bool:
            await self._cri.check()
            return True

        def report(error: BaseException, delay: float) -> None:
            metrics.CRI_ERRORS.labels("ImageFsInfo").inc()
            self.unavailable(str(error))
            log.warning("runtime unavailable", extra={"error": str(error), "retry_in": delay})

        reachable = await retry(
            check,
            retry_on=(CriError,),
            backoff=Backoff(0.5, 10.0, jitter=False),
            on_retry=report,
            stopping=stopping,
        )
        if not reachable:
            return False
        self.answered()
        log.info("runtime reachable")
        return True

    async def watch(self, period: float, stopping: asyncio.Event) -> None:
        """Ask the runtime directly when nothing else did for ``period``, until stopping."""
        while not await sleep_unless_stopping(stopping, period):
            if time.monotonic() - self.last_answer < period:
                continue
            try:
                await self._cri.check()
                self.answered()
            except CriError as e:
                self.unavailable(str(e))
