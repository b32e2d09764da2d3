"""The node syncer's main coroutine: start the parts, run them, stop them in order.

Only order lives here; :mod:`syncer.assembly` builds the parts and wires them together, and each
part is a module of its own (docs/development.md, "Where things are" lists them). Start: NATS
(retried forever), the runtime (retried while unavailable), the node's labels and taints if
``--respect-scheduling``, the replay of the log (honouring a pending replay request), one
reconcile, then side by side: the live consumer and the periodic reconcile (the two loops whose end
is the end of the syncer), and the background tasks: the node status reporter, the replay-request
watch, the consumer-lag gauge, the NATS and runtime watches and the node watcher. /readyz says
false until NATS is connected, the runtime answers and the replay is done; /healthz fails when a
loop stops turning or the runtime has not answered for ``--runtime-unhealthy-after``. Stop
(``stopping`` set by SIGTERM, also during the start): take no more events, let running pulls
finish for ``--stop-timeout``, then cancel them; hand their events back, write the last status,
close the connections, return 0. Every step after the drain has its own bound (together
:data:`~syncer.settings.CLOSING_BOUND`), so the stop ends well inside the kubelet's grace period
whatever is in flight, and one warning names what it gave up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client

from ops.lifecycle import Deadline, cancel_and_wait, every, until_stopping
from ops.retry import Backoff, retry
from ops.serving import Health, parse_addr, serve_http
from syncer import assembly, metrics
from syncer.node.nodeinfo import NodeInfoError, watcher_for
from syncer.pulling.registryauth import RegistryCredentials
from syncer.pulling.runtimehealth import RuntimeHealth
from syncer.reading.replay import replay_until_done
from syncer.runtime.cri import CriClient, CriError
from syncer.settings import CLOSING_BOUND, SyncerSettings
from wire.natsconn import RETRYABLE, connect
from wire.permissions import inbox_prefix

__all__ = ["run"]

log = logging.getLogger(__name__)

_NATS_CHECK_PERIOD = 1.0
# The closing steps after the drain, each bounded (seconds); together CLOSING_BOUND at most.
# Pins of finished pulls (each waits for a NATS write: NATS may be down).
_CLOSE_PINS = 2.0
# The events the pulls settled: acked or handed back (NATS publishes, no answer awaited).
_CLOSE_EVENTS = 1.0
# The last status write (one NATS request).
_LAST_STATUS = 2.0
# The background tasks, cancelled (they watch ``stopping`` too).
_CLOSE_TASKS = 1.0
# The NATS connection: a drain when connected, else a close.
_CLOSE_NATS = 1.0
assert _CLOSE_PINS + _CLOSE_EVENTS + _LAST_STATUS + _CLOSE_TASKS + _CLOSE_NATS <= CLOSING_BOUND


async def run(
    settings: SyncerSettings, stopping: asyncio.Event, health: Health | None = None
) -> int:
    """Run the syncer of one node until ``stopping`` is set; return the exit code."""
    health = health or Health()
    for check in ("nats", "runtime", "replay"):
        health.set(check, False, "starting")
    credentials = RegistryCredentials.from_paths(
        settings.pulls.registry_auth_file, settings.pulls.kubelet_config_json
    )
    try:
        seeding = settings.seeding
        node_watcher = watcher_for(
            settings.node_name,
            settings.fleets,
            taint=settings.gate.taint,
            # --seed-per reads a label of this node only when seeding is on at all.
            seed_label=seeding.per if seeding.mirror else "",
        )
    except NodeInfoError as e:
        log.error("cannot read this node from the API server", extra={"error": str(e)})
        return 2
    server = await _serve(settings, health)
    log.info(
        "syncer starting",
        extra={
            "node": settings.node_name,
            "consumer": settings.durable,
            "cri_endpoint": settings.runtime.endpoint,
            "nats": settings.nats.safe_servers(),
            "fleet_selector": settings.fleets.selector,
            "respect_scheduling": settings.fleets.respect_scheduling,
            "remove_unused": settings.keeping.remove_unused,
            "startup_taint": settings.gate.taint,
            "extra_images": len(settings.pulls.extra_images),
            "mirror": ",".join(settings.seeding.mirror),
        },
    )
    cri = CriClient(settings.runtime.endpoint, call_timeout=settings.runtime.call_timeout)
    runtime = RuntimeHealth(cri, health, allowance=settings.runtime.unhealthy_after)
    nc: Client | None = None
    try:
        nc = await until_stopping(
            stopping,
            connect(
                # Per-node NATS identities may only read replies under their own inbox prefix.
                settings.nats.with_inbox(inbox_prefix(settings.durable)),
                name=f"syncer {settings.node_name}",
                retry_forever=True,
            ),
        )
        if nc is None or not await runtime.wait_until_reachable(stopping):
            return 0
        parts = assembly.assemble(settings, health, nc, cri, runtime, credentials, node_watcher)
        await _Syncer(parts, stopping).run()
        return 0
    finally:
        if nc is not None:
            await _close_nats(nc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_NATS):
                await cri.close()
        if server is not None:
            server.close()
        log.info("syncer stopped", extra={"node": settings.node_name})


async def _close_nats(nc: Client) -> None:
    """Drain when connected (acks still in the buffer go out), else just close: nats-py's drain
    waits ``drain_timeout`` (30s) for a server that is not there. A second signal (the task
    is being cancelled) closes at once."""
    task = asyncio.current_task()
    hurried = task is not None and task.cancelling() > 0
    try:
        async with asyncio.timeout(_CLOSE_NATS):
            if nc.is_connected and not hurried:
                await nc.drain()
    except Exception as e:
        log.debug("nats drain at stop failed", extra={"error": repr(e)})
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_NATS):
                await nc.close()


async def _serve(settings: SyncerSettings, health: Health) -> asyncio.Server | None:
    if not settings.metrics_addr:
        return None
    host, port = parse_addr(settings.metrics_addr)
    return await serve_http(host, port, health)


class _Syncer:
    """Starts, runs and stops the parts :func:`syncer.assembly.assemble` built, in order."""

    def __init__(self, parts: assembly.Parts, stopping: asyncio.Event) -> None:
        self.parts = parts
        self.stopping = stopping
        self._reconnects = self._reconnect_count()
        self._deadline: Deadline | None = None

    async def run(self) -> None:
        tasks = [
            self._task(every(_NATS_CHECK_PERIOD, self.stopping, self._check_nats), "nats watch"),
            self._task(self._watch_runtime(), "runtime watch"),
        ]
        try:
            # Stopping abandons the start wherever it is (a replay, a first reconcile); what the
            # start began (the first reconcile's pulls, pins) is stopped like the rest.
            started = await until_stopping(self.stopping, self._start(tasks))
            if started:
                tasks += self._background()
                loops = [
                    self._task(
                        self.parts.reconciler.run(self.parts.settings.pulls.period, self.stopping),
                        "reconcile",
                    ),
                    self._task(self.parts.consumer.run(self.stopping), "consumer"),
                ]
                tasks += loops
                await self._until_loops_end(loops)
            await self._stop(status=bool(started))
        finally:
            # Bounded: a background task that does not end must not keep the syncer from exiting.
            left = await cancel_and_wait(tasks, patience=_CLOSE_TASKS)
            if left:
                log.warning(
                    "background tasks did not stop, exiting without them",
                    extra={"tasks": sorted(task.get_name() for task in left)},
                )

    def _drain_deadline(self) -> Deadline:
        """The end of the drain, counted from the first look after ``stopping`` was set."""
        if self._deadline is None:
            self._deadline = Deadline(self.parts.settings.stop_timeout)
        return self._deadline

    async def _until_loops_end(self, loops: list[asyncio.Task[None]]) -> None:
        """Until ``stopping`` (or a loop failed); then the loops get what is left of the drain
        to finish the pass they are in. A pass that hangs is cancelled: it must not keep the
        syncer from stopping, and the next start does it again."""
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([*loops, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        # A loop that failed ends the syncer: the other one is not waited for.
        patience = self._drain_deadline().left() if self.stopping.is_set() else 0.0
        if patience > 0:
            await asyncio.wait(loops, timeout=patience)
        late = {loop for loop in loops if not loop.done()}
        if late:
            if self.stopping.is_set():
                log.warning(
                    "loops did not end in time, cancelled",
                    extra={"loops": sorted(task.get_name() for task in late)},
                )
            await cancel_and_wait(late, patience=_CLOSE_TASKS)
        for loop in loops:
            error = loop.exception() if loop.done() and not loop.cancelled() else None
            if error is not None:
                raise error

    async def _start(self, tasks: list[asyncio.Task[None]]) -> bool:
        """Everything before the loops; False when the syncer was stopped meanwhile."""
        if self.parts.node_watcher is not None:
            await self.parts.node_watcher.refresh_once()
        status = self.parts.status_settings if self.parts.reporter is not None else None
        await self.parts.gatekeeper.prepare(self.parts.js, status)
        # From here on: the gate's timeout holds even if the replay below never ends.
        tasks += [
            self._task(work, "startup gate")
            for work in self.parts.gatekeeper.tasks(self.parts.js, self.stopping)
        ]
        if self.parts.requests is not None:
            await self.parts.requests.find_pending()
        if not await replay_until_done(
            self.parts.consumer.replay, self.parts.consumer.stream, self.parts.health, self.stopping
        ):
            return False
        metrics.REPLAYS.labels("start").inc()
        if self.parts.requests is not None:
            await self.parts.requests.complete_pending()
        await self.parts.keeper.start(self.parts.js)
        with contextlib.suppress(CriError):
            await self.parts.reconciler.reconcile()
        self.parts.gatekeeper.opened_for_business()
        return await self._start_durable()

    async def _start_durable(self) -> bool:
        """Create the durable, retried while NATS does not answer (a partition, a server
        restarting, a slow link): a timeout here used to end the process."""

        async def attempt() -> bool:
            await self.parts.consumer.start_durable()
            return True

        def report(error: BaseException, delay: float) -> None:
            log.warning(
                "consumer not created, retrying",
                extra={
                    "consumer": self.parts.consumer.durable.name,
                    "error": repr(error),
                    "retry_in": delay,
                },
            )

        started = await retry(
            attempt,
            retry_on=RETRYABLE,
            backoff=Backoff(0.5, 10.0, jitter=False),
            on_retry=report,
            stopping=self.stopping,
        )
        return bool(started)

    def _background(self) -> list[asyncio.Task[None]]:
        """The tasks beside the two loops; a new periodic chore goes here (see ``every``)."""
        tasks = []
        lag_interval = self.parts.settings.consumer.lag_interval
        if lag_interval > 0:
            lag = every(
                lag_interval,
                self.stopping,
                self.parts.consumer.durable.refresh_lag,
            )
            tasks.append(self._task(lag, "consumer lag"))
        if self.parts.reporter is not None:
            tasks.append(self._task(self.parts.reporter.run(self.stopping), "status reporter"))
        if self.parts.requests is not None:
            tasks.append(self._task(self.parts.requests.watch(self.stopping), "replay requests"))
        if self.parts.node_watcher is not None:
            tasks.append(self._task(self.parts.node_watcher.run(self.stopping), "node watcher"))
        tasks.append(self._task(self.parts.refolder.run(self.stopping), "refold"))
        return tasks

    async def _stop(self, *, status: bool) -> None:
        """Drain up to the deadline, then cancel; every closing step bounded; one warning
        naming what was given up on. ``status``: write the last status (not when the start was
        cut short: a half-folded log is not the node's state)."""
        parts = self.parts
        drain = self._drain_deadline()
        log.info(
            "draining",
            extra={"pulls_in_flight": parts.puller.inflight, "drain_for": round(drain.left(), 1)},
        )
        given_up: dict[str, str] = {}
        pulls = await parts.puller.close(patience=drain.left())
        if pulls:
            given_up["pulls"] = ",".join(str(image) for image in pulls)
        pins = await parts.keeper.close(patience=_CLOSE_PINS)
        if pins:
            given_up["pins"] = ",".join(str(image) for image in pins)
        try:
            async with asyncio.timeout(_CLOSE_EVENTS):
                await parts.consumer.drain()
        except TimeoutError:
            given_up["events"] = "not settled (redelivered after --ack-wait)"
        # The last word: what the node holds as it stops, though the throttle says "not yet".
        reporter = parts.reporter if status else None
        if reporter is not None and not await reporter.last_word(_LAST_STATUS):
            given_up["status"] = "last status not written"
        if given_up:
            log.warning("stop abandoned work", extra=given_up)

    def _task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=f"{name} ({self.parts.settings.node_name})")

    async def _check_nats(self) -> None:
        connected = self.parts.nc.is_connected
        self.parts.health.set("nats", connected, "" if connected else "disconnected")
        reconnects = self._reconnect_count()
        if connected and reconnects != self._reconnects:
            # Deletes whose tombstones expired meanwhile will never be delivered: refold.
            self._reconnects = reconnects
            self.parts.refolder.reconnected()

    def _reconnect_count(self) -> int:
        return int(self.parts.nc.stats.get("reconnects", 0))

    async def _watch_runtime(self) -> None:
        # During a long replay nothing else asks the runtime; the reconcile period bounds it.
        await self.parts.runtime.watch(min(self.parts.settings.pulls.period, 15.0), self.stopping)
