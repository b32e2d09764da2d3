"""Publishing this node's status to the cluster, without ever getting in the syncer's way.

The reporter asks the syncer for a :class:`~wire.nodestatus.NodeState` (a cheap, synchronous
callable) and writes it to the node's KV entry when it changed, at most once per ``interval``,
and at least once per ``heartbeat`` even when nothing changed, so readers can tell a quiet node
from a dead one. Status is a convenience for operators: a NATS outage must not slow down or stop
pulling, so nothing here raises into the caller; failures are counted and logged once per
transition (failing, recovered), not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from nats.js import JetStreamContext

from wire.nodestatus import (
    NodeState,
    NodeStatus,
    StatusSettings,
    check_node,
    ensure_status_bucket,
    put_status,
)

__all__ = ["StatusReporter", "package_version"]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0
DEFAULT_HEARTBEAT = 30.0


def package_version() -> str:
    try:
        return importlib.metadata.version("image-syncer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class StatusReporter:
    """Keeps ``node.<node>`` in the status bucket in step with ``snapshot()``.

    Run :meth:`run` as a task; call :meth:`poke` after a change for a prompt write (otherwise
    the change is noticed at the next ``interval`` poll). ``writes`` and ``errors`` count
    attempts; ``on_error`` (e.g. a metric's ``inc``) is called for every failed write.
    """

    def __init__(
        self,
        js: JetStreamContext,
        settings: StatusSettings,
        node: str,
        snapshot: Callable[[], NodeState],
        *,
        version: str | None = None,
        interval: float = DEFAULT_INTERVAL,
        heartbeat: float = DEFAULT_HEARTBEAT,
        write_timeout: float = 5.0,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if interval <= 0 or heartbeat < interval:
            raise ValueError("status interval must be positive and at most the heartbeat")
        self._js = js
        self._settings = settings
        self.node = check_node(node)
        self._snapshot = snapshot
        self.version = version or package_version()
        self.interval = interval
        self.heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._on_error = on_error
        self._clock = clock
        self._wall_clock = wall_clock
        self._started_at = wall_clock()
        self._poked = asyncio.Event()
        self._last_attempt: float | None = None
        self._last_success: float | None = None
        self._written: NodeState | None = None
        self._failing = False
        self._bucket_ready = False
        self.writes = 0
        self.errors = 0

    def poke(self) -> None:
        """Something changed: write as soon as the throttle allows."""
        self._poked.set()

    async def tick(self) -> bool:
        """Write if a write is due (changed or heartbeat, and not throttled); True if written."""
        self._poked.clear()
        now = self._clock()
        state = self._take_snapshot()
        if state is None or not self._due(state, now):
            return False
        return await self._write(state, now)

    async def run(self, stopping: asyncio.Event) -> None:
        """Report until ``stopping`` is set."""
        while not stopping.is_set():
            await self.tick()
            await self._sleep(self._delay(), stopping)

    def _due(self, state: NodeState, now: float) -> bool:
        if self._last_attempt is not None and now - self._last_attempt < self.interval:
            return False
        if self._written is None or state != self._written or self._last_success is None:
            return True
        return now - self._last_success >= self.heartbeat

    def _delay(self) -> float:
        if self._last_attempt is None:
            return 0.0
        remaining = self._last_attempt + self.interval - self._clock()
        if self._poked.is_set():
            return max(remaining, 0.0)
        # Without a poke, still look at the snapshot every interval: changes nobody announced.
        return remaining if remaining > 0 else self.interval

    async def _sleep(self, delay: float, stopping: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self._poked.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    def _take_snapshot(self) -> NodeState | None:
        try:
            return self._snapshot()
        except Exception as e:
            # A bug in the snapshot must not take the syncer down with it.
            log.exception("node status snapshot failed", extra={"error": repr(e)})
            return None

    async def _write(self, state: NodeState, now: float) -> bool:
        self._last_attempt = now
        status = NodeStatus(
            node=self.node,
            version=self.version,
            reported_at=self._wall_clock(),
            started_at=self._started_at,
            state=state,
        )
        try:
            if not self._bucket_ready:
                # Lazily, so a NATS outage at start-up is one more failed write, not a crash.
                await ensure_status_bucket(self._js, self._settings)
                self._bucket_ready = True
            await put_status(self._js, self._settings, status, timeout=self._write_timeout)
        except Exception as e:
            self._record_failure(e)
            return False
        self.writes += 1
        self._written = state
        self._last_success = now
        if self._failing:
            self._failing = False
            log.info("node status write recovered", extra={"node": self.node})
        return True

    def _record_failure(self, error: Exception) -> None:
        self.errors += 1
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error(error)
        if not self._failing:
            self._failing = True
            log.warning(
                "node status write failed",
                extra={"node": self.node, "bucket": self._settings.bucket, "error": repr(error)},
            )
