"""Publishing this node's status to the cluster, without ever getting in the syncer's way.

The reporter asks the syncer for a :class:`~wire.nodestatus.NodeState` (a cheap, synchronous
callable) and writes it to the node's KV entry when it changed, at most once per ``interval``.
"Changed" means changed for a reader: the time of the last reconcile moves every sync period and
rides on the heartbeat instead. When nothing changed it writes only a heartbeat of a few dozen
bytes every ``heartbeat``, so readers can tell a quiet node from a dead one while thousands of
quiet nodes cost the cluster almost nothing; the full entry is rewritten now and then all the
same (``refresh``, a quarter of its TTL) so it never expires under a live node.

Status is a convenience for operators: a NATS outage must not slow down or stop pulling, so
nothing here raises into the caller; failures are counted and logged once per transition
(failing, recovered), not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext

from ops.lifecycle import wait_any
from wire.nodestatus import (
    Heartbeat,
    NodeState,
    NodeStatus,
    StatusSettings,
    check_node,
    ensure_status_bucket,
    put_heartbeat,
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


def _news(state: NodeState, written: NodeState) -> bool:
    """Whether ``state`` tells a reader something ``written`` does not. The last reconcile's
    time alone is no news: it moves every sync period, and the heartbeat carries it."""
    return msgspec.structs.replace(state, last_reconcile=written.last_reconcile) != written


class StatusReporter:
    """Keeps ``node.<node>`` in the status bucket in step with ``snapshot()``.

    Run :meth:`run` as a task; call :meth:`poke` after a change for a prompt write (otherwise
    the change is noticed at the next ``interval`` poll). ``writes`` counts full entries,
    ``beats`` heartbeats, ``errors`` failed attempts of either; ``on_error`` (e.g. a metric's
    ``inc``) is called for every failed write.
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
        self._last_full: float | None = None
        # The full entry is rewritten this often even unchanged, long before its TTL runs out.
        self.refresh = max(heartbeat, settings.node_ttl / 4)
        self._written: NodeState | None = None
        self._failing = False
        self._bucket_ready = False
        self.writes = 0
        self.beats = 0
        self.errors = 0

    def poke(self) -> None:
        """Something changed: write as soon as the throttle allows."""
        self._poked.set()

    async def tick(self) -> bool:
        """Write what is due (the entry if changed, else a heartbeat); True if written."""
        self._poked.clear()
        now = self._clock()
        state = self._take_snapshot()
        if state is None:
            return False
        due = self._due(state, now)
        if due == "full":
            return await self._write(state, now)
        if due == "beat":
            return await self._beat(now)
        return False

    async def last_word(self, timeout: float) -> bool:
        """Write the entry now, whatever the throttle says: the node as it stops (what it holds,
        what it gave up on) must not wait for an ``interval`` the process does not have. At most
        ``timeout`` seconds (NATS may be gone); True if written."""
        state = self._take_snapshot()
        if state is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                return await self._write(state, self._clock(), write_timeout=timeout)
        except TimeoutError as e:
            self._record_failure(e)
            return False

    async def run(self, stopping: asyncio.Event) -> None:
        """Report until ``stopping`` is set."""
        while not stopping.is_set():
            await self.tick()
            await wait_any(self._poked, stopping, timeout=self._delay())

    def _due(self, state: NodeState, now: float) -> str | None:
        if self._last_attempt is not None and now - self._last_attempt < self.interval:
            return None
        if self._written is None or _news(state, self._written) or self._last_full is None:
            return "full"
        if now - self._last_full >= self.refresh:
            return "full"
        if self._last_success is None or now - self._last_success >= self.heartbeat:
            return "beat"
        return None

    def _delay(self) -> float:
        if self._last_attempt is None:
            return 0.0
        remaining = self._last_attempt + self.interval - self._clock()
        if self._poked.is_set():
            return max(remaining, 0.0)
        # Without a poke, still look at the snapshot every interval: changes nobody announced.
        return remaining if remaining > 0 else self.interval

    def _take_snapshot(self) -> NodeState | None:
        try:
            return self._snapshot()
        except Exception as e:
            # A bug in the snapshot must not take the syncer down with it.
            log.exception("node status snapshot failed", extra={"error": repr(e)})
            return None

    async def _write(
        self, state: NodeState, now: float, *, write_timeout: float | None = None
    ) -> bool:
        self._last_attempt = now
        status = NodeStatus(
            node=self.node,
            version=self.version,
            reported_at=self._wall_clock(),
            started_at=self._started_at,
            summary=state,
        )
        try:
            await self._ensure_bucket()
            await put_status(
                self._js, self._settings, status, timeout=write_timeout or self._write_timeout
            )
        except Exception as e:
            self._record_failure(e)
            return False
        self.writes += 1
        self._written = state
        self._last_full = now
        self._succeeded(now)
        return True

    async def _beat(self, now: float) -> bool:
        self._last_attempt = now
        state = self._take_snapshot()
        beat = Heartbeat(
            at=self._wall_clock(), last_reconcile=state.last_reconcile if state else None
        )
        try:
            await self._ensure_bucket()
            await put_heartbeat(
                self._js, self._settings, self.node, beat, timeout=self._write_timeout
            )
        except Exception as e:
            self._record_failure(e)
            return False
        self.beats += 1
        self._succeeded(now)
        return True

    async def _ensure_bucket(self) -> None:
        if not self._bucket_ready:
            # Lazily, so a NATS outage at start-up is one more failed write, not a crash.
            await ensure_status_bucket(self._js, self._settings)
            self._bucket_ready = True

    def _succeeded(self, now: float) -> None:
        self._last_success = now
        if self._failing:
            self._failing = False
            log.info("node status write recovered", extra={"node": self.node})

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
