"""The startup-taint gate: a node takes no game server before the images they need are there.

A node that joins a cluster is schedulable at once, and the first game servers placed on it wait
for the very pulls this project exists to avoid. With ``--startup-taint KEY`` the node registers
with a taint of that key (kubelet ``--register-with-taints``, Karpenter ``startupTaints``, a
managed node pool's taints) and the syncer removes it once every image this node must hold is
present: the images of every Fleet admitted here, the Agones SDK sidecar and ``--extra-image``.

The gate is evaluated whenever the node's images change (a pull finished, a reconcile ran, a
Fleet came or went) and whenever the node's taints change; while the node carries no taint it
costs nothing but the periodic Node read. A taint added again later, by an operator, closes the
gate again and is handled the same way.

A node over its disk budget (:mod:`syncer.keeping.diskbudget`) with no pull in flight opens at once,
with one warning: no missing image can arrive until space is freed, which the kubelet's image
GC does only under the load of scheduled pods, so waiting out the timeout would keep the node
out of service for nothing. Its game servers then pull what they need, as without the gate.

The timeout (``--startup-taint-timeout``, default 15m) bounds how long a broken registry can keep
a node out of service: past it the taint goes anyway, with one warning naming the missing images
and a metric. Its clock starts when this syncer first saw the taint, or earlier when the node's
previous status entry says the gate was already closed (a syncer restarted mid-gate resumes its
clock instead of starting over). The time already spent closed is measured on the kernel's
boot-time clock (:mod:`syncer.node.bootclock`), never on the wall clock, which NTP may step at boot:
a gate closed before a reboot (or by a syncer that did not record the boot) starts over, which only
ever delays the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from ops.lifecycle import wait_any
from ops.retry import Backoff
from syncer import metrics
from syncer.node.bootclock import BootClock
from syncer.node.nodeinfo import ApiCallError, ApiEndpoint, NodeInfoError, NodeWatcher
from syncer.node.nodetaints import Removal, remove_taint
from wire.nodestatus import GateStatus

__all__ = ["DEFAULT_TIMEOUT", "StartupGate"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 15 * 60.0
# After a failed removal (API server down, RBAC or admission policy refusing): retry this often.
_RETRY_MIN, _RETRY_MAX = 1.0, 60.0
_MISSING_SHOWN = 20
_READY_GRACE = 30.0
_UNKNOWN = "(unknown: the event log or the node images could not be read)"


class StartupGate:
    """Removes the startup taint ``key`` from ``node`` once ``missing()`` is empty (or on timeout).

    ``ready()`` says whether ``missing()`` can be trusted yet: before the log was replayed and the
    runtime listed, "nothing missing" would only mean "nothing known".
    """

    def __init__(
        self,
        key: str,
        watcher: NodeWatcher,
        *,
        missing: Callable[[], Sequence[str]],
        ready: Callable[[], bool],
        stalled: Callable[[], str] = lambda: "",
        timeout: float = DEFAULT_TIMEOUT,
        endpoint: ApiEndpoint | None = None,
        on_change: Callable[[], None] | None = None,
        boot: BootClock | None = None,
    ) -> None:
        self.key = key
        self._boot = boot or BootClock()
        self.watcher = watcher
        self.endpoint = endpoint or watcher.endpoint
        self.missing = missing
        self.ready = ready
        # Why no missing image can arrive now (the disk budget, nothing in flight), or "".
        self.stalled = stalled
        self.timeout = timeout
        self.on_change = on_change
        self.started = time.monotonic()
        self.status = GateStatus(taint=key)
        self._closed_at: float | None = None  # monotonic twin of status.closed_since
        self._closed_boot: float | None = None  # its boot-time twin, kept across restarts
        self._kicked = asyncio.Event()
        self._retry = Backoff(_RETRY_MIN, _RETRY_MAX)
        self._retry_at: float | None = None
        self._failing = False
        metrics.GATE_CLOSED.set(0)

    # --- inputs -------------------------------------------------------------------------------

    def resume(self, previous: GateStatus | None) -> None:
        """Continue the timeout of a gate the previous run of this syncer left closed."""
        if previous is None or previous.taint != self.key or previous.state == "open":
            return
        if previous.closed_since is None:
            return
        age = self._boot.elapsed_since(previous.boot_id, previous.closed_uptime)
        if age is None:
            log.info(
                "startup gate was closed before a reboot (or by an older syncer), "
                "its timeout starts over",
                extra={"taint": self.key, "closed_since": previous.closed_since.isoformat()},
            )
            return
        self._closed_at = time.monotonic() - age
        self._closed_boot = previous.closed_uptime
        self.status = GateStatus(
            taint=self.key, state="waiting", closed_since=previous.closed_since
        )
        log.info(
            "startup gate was closed before this start, resuming its timeout",
            extra={"taint": self.key, "closed_for": round(age, 1)},
        )

    def kick(self) -> None:
        """Something that may open or close the gate changed: look again soon."""
        self._kicked.set()

    # --- the loop -----------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.step()
            self._kicked.clear()
            await wait_any(self._kicked, stopping, timeout=self._next_wakeup())

    def _next_wakeup(self) -> float | None:
        deadlines = []
        now = time.monotonic()
        if self.status.state != "open" and self._closed_at is not None:
            deadlines.append(self._closed_at + self.timeout - now)
        if self._retry_at is not None:
            deadlines.append(self._retry_at - now)
        if self.status.state == "waiting" and now - self.started < _READY_GRACE:
            deadlines.append(self.started + _READY_GRACE - now)
        return max(0.0, min(deadlines)) if deadlines else None

    async def step(self) -> None:
        """Look at the node and the images once; remove the taint if it is time."""
        node = self.watcher.current
        if node is None:
            return
        if not any(t.key == self.key for t in node.taints):
            self._open_seen()
            return
        ready = self.ready()
        now = time.monotonic()
        if self._closed_at is None:
            self._closed_at = now
            self._closed_boot = round(self._boot.now(), 3)
        closed_since = self.status.closed_since if self.status.state != "open" else None
        closed_since = closed_since or datetime.now(UTC)
        timed_out = now - self._closed_at >= self.timeout
        # The timeout holds even when the log or the node images cannot be read: whatever keeps
        # the syncer from knowing, it must not keep the node out of service forever. A clock
        # resumed past its end still gives a fresh start a moment to name what is missing.
        if not ready and (not timed_out or now - self.started < _READY_GRACE):
            self._set(GateStatus(taint=self.key, state="waiting", closed_since=closed_since))
            return
        missing = list(dict.fromkeys(self.missing())) if ready else [_UNKNOWN]
        stalled = self.stalled() if missing and ready else ""
        if missing and not timed_out and not stalled:
            self._set(GateStatus(
                taint=self.key, state="closed", missing=missing[:_MISSING_SHOWN],
                closed_since=closed_since,
            ))  # fmt: skip
            return
        if self._retry_at is not None and now < self._retry_at:
            return
        await self._remove(missing, closed_since, stalled)

    async def _remove(self, missing: list[str], closed_since: datetime, stalled: str) -> None:
        try:
            outcome = await asyncio.to_thread(
                remove_taint,
                self.endpoint,
                self.watcher.name,
                self.key,
                timeout=self.watcher.timeout,
                on_conflict=lambda: metrics.GATE_ERRORS.labels("conflict").inc(),
            )
        except NodeInfoError as e:
            # A refusal (RBAC, the admission policy) needs an operator; anything else may clear.
            reason = "forbidden" if isinstance(e, ApiCallError) and e.refused else "api"
            metrics.GATE_ERRORS.labels(reason).inc()
            self._retry_at = time.monotonic() + self._retry.next_delay()
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot remove the startup taint, will retry",
                    extra={"taint": self.key, "node": self.watcher.name, "error": str(e)},
                )
            self._set(GateStatus(
                taint=self.key, state="closed", missing=missing[:_MISSING_SHOWN],
                closed_since=closed_since,
            ))  # fmt: skip
            return
        self._failing, self._retry_at = False, None
        self._retry.reset()
        by_timeout = bool(missing)
        if by_timeout and stalled:
            log.warning(
                "startup gate opened early: the missing images cannot be pulled",
                extra={
                    "taint": self.key,
                    "reason": stalled,
                    "missing": missing[:_MISSING_SHOWN],
                    "missing_count": len(missing),
                },
            )
        elif by_timeout:
            metrics.GATE_TIMEOUTS.inc()
            log.warning(
                "startup taint timeout: opening the node with images missing",
                extra={
                    "taint": self.key,
                    "timeout": self.timeout,
                    "missing": missing[:_MISSING_SHOWN],
                    "missing_count": len(missing),
                },
            )
        latency = time.monotonic() - self.started
        if outcome is Removal.REMOVED:
            metrics.GATE_OPEN_LATENCY.set(latency)
            log.info(
                "startup taint removed, node open for game servers",
                extra={
                    "taint": self.key,
                    "node": self.watcher.name,
                    "since_start": round(latency, 3),
                    "by_timeout": by_timeout,
                },
            )
            self._set(GateStatus(
                taint=self.key, state="open", opened_at=datetime.now(UTC),
                closed_since=closed_since, by_timeout=by_timeout,
            ))  # fmt: skip
        # Read the node again: the cached copy still shows the taint we just removed.
        await self.watcher.refresh_once()
        self._closed_at = self._closed_boot = None
        if outcome is Removal.ABSENT:
            self._open_seen()

    def _open_seen(self) -> None:
        """The node carries no taint: open, whoever removed it."""
        if self.status.state == "open":
            return
        if self.status.state == "closed":
            log.info("startup taint gone (removed by someone else)", extra={"taint": self.key})
        self._closed_at = self._closed_boot = None
        self._set(GateStatus(taint=self.key, state="open"))

    def _set(self, status: GateStatus) -> None:
        if status.state != "open" and self._closed_boot is not None:
            # For the next start's resume: when it closed, on a clock no NTP step moves.
            status = msgspec.structs.replace(
                status, boot_id=self._boot.boot_id, closed_uptime=self._closed_boot
            )
        if status.state == "closed" and self.status.state != "closed":
            since = status.closed_since or datetime.now(UTC)
            log.info(
                "startup taint present, node closed until its images are here",
                extra={
                    "taint": self.key,
                    "missing_count": len(status.missing),
                    "timeout_at": (since + timedelta(seconds=self.timeout)).isoformat(),
                },
            )
        metrics.GATE_CLOSED.set(0 if status.state == "open" else 1)
        changed = status != self.status
        self.status = status
        if changed and self.on_change is not None:
            self.on_change()
