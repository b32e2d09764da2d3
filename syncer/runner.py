"""The node syncer's main coroutine: wire the parts together, run them, stop them in order.

Start: NATS (retried forever), the runtime (retried while unavailable), the node's labels and
taints if ``--respect-scheduling``, the replay of the log (honouring a pending replay request),
one reconcile, then side by side: the live consumer, the periodic reconcile, the node status
reporter, the replay-request watch, the consumer-lag gauge, the runtime liveness watch and the
node watcher. /readyz says false until NATS is connected, the runtime answers and the replay is
done; /healthz fails when a loop stops turning or the runtime has not answered for
``runtime_unhealthy_after``. Stop (``stopping`` set by SIGTERM): take no more events, let running
pulls finish or time out, ack what they settled, close the connections, return 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from ops.serving import Health, parse_addr, serve_http
from syncer import metrics
from syncer.consumer import FleetConsumer, report_transition
from syncer.cri import CriClient, CriError
from syncer.desired import DesiredState
from syncer.filtering import FleetFilter
from syncer.nodeinfo import ApiEndpoint, NodeInfoError, NodeWatcher
from syncer.pullbudget import BudgetSettings, PullBudget
from syncer.puller import Backoff, Puller, PullResult
from syncer.reconcile import Reconciler
from syncer.registryauth import RegistryCredentials
from syncer.replaycontrol import (
    PendingReplay,
    complete_replay,
    pending_replay,
    watch_replay_requests,
)
from syncer.settings import SyncerSettings
from syncer.snapshot import node_state
from syncer.status import StatusReporter
from syncer.unused import UnusedImages
from wire.contract import Fleet
from wire.natsconn import connect
from wire.nodestatus import StatusError, StatusSettings, check_node
from wire.permissions import inbox_prefix

__all__ = ["run"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def run(
    settings: SyncerSettings, stopping: asyncio.Event, health: Health | None = None
) -> int:
    """Run the syncer of one node until ``stopping`` is set; return the exit code."""
    health = health or Health()
    for check in ("nats", "runtime", "replay"):
        health.set(check, False, "starting")
    credentials = RegistryCredentials.from_paths(
        settings.registry_auth_file, settings.kubelet_config_json
    )
    try:
        node_watcher = _node_watcher(settings)
    except NodeInfoError as e:
        log.error("cannot respect scheduling", extra={"error": str(e)})
        return 2
    server = await _serve(settings, health)
    log.info(
        "syncer starting",
        extra={
            "node": settings.node_name,
            "consumer": settings.durable,
            "cri_endpoint": settings.cri_endpoint,
            "nats": settings.nats.safe_servers(),
            "fleet_selector": settings.fleet_selector,
            "respect_scheduling": settings.respect_scheduling,
            "remove_unused": settings.remove_unused,
        },
    )
    cri = CriClient(settings.cri_endpoint, call_timeout=settings.cri_call_timeout)
    nc: Client | None = None
    try:
        nc = await _until(
            stopping,
            connect(
                # Per-node NATS identities may only read replies under their own inbox prefix.
                settings.nats.with_inbox(inbox_prefix(settings.durable)),
                name=f"syncer {settings.node_name}",
                retry_forever=True,
            ),
        )
        if nc is None or not await _wait_for_runtime(cri, health, stopping, settings):
            return 0
        await _Syncer(settings, stopping, health, nc, cri, credentials, node_watcher).run()
        return 0
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        await cri.close()
        if server is not None:
            server.close()
        log.info("syncer stopped", extra={"node": settings.node_name})


def _node_watcher(settings: SyncerSettings) -> NodeWatcher | None:
    if not settings.respect_scheduling:
        return None
    endpoint = ApiEndpoint.from_url(settings.kube_api_url)
    return NodeWatcher(endpoint, settings.node_name, refresh=settings.node_refresh)


@dataclass
class _Replayed:
    """The replay request this node honoured last (shown in its status)."""

    request: str = ""


class _Syncer:
    """The running parts of one node's syncer and how they talk to each other."""

    def __init__(
        self,
        settings: SyncerSettings,
        stopping: asyncio.Event,
        health: Health,
        nc: Client,
        cri: CriClient,
        credentials: RegistryCredentials,
        node_watcher: NodeWatcher | None,
    ) -> None:
        self.settings = settings
        self.stopping = stopping
        self.health = health
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.cri = cri
        self.node_watcher = node_watcher
        self.replayed = _Replayed()
        self.status_settings = StatusSettings(
            prefix=settings.subject_prefix,
            replicas=settings.status_replicas,
            node_ttl=settings.status_ttl,
        )
        self.fleet_filter = FleetFilter.parse(settings.fleet_selector)
        # Fleets are judged again only when the node changes, which only a node watcher sees.
        self.desired = DesiredState(admit=self.admit, keep_objects=node_watcher is not None)
        self.unused = self._unused()
        self.budget = self._budget()
        self.puller = Puller(
            cri,
            max_parallel=settings.max_parallel_pulls,
            pull_timeout=settings.pull_timeout,
            backoff=Backoff(settings.backoff_min, settings.backoff_max),
            auth_for=lambda image: credentials.for_image(str(image)),
            on_result=self.on_pull_result,
            budget=self.budget,
        )
        self.reconciler = Reconciler(
            cri,
            self.desired,
            self.puller,
            health,
            runtime_allowance=settings.runtime_unhealthy_after,
            after_list=self.unused.after_list if self.unused else None,
            on_change=self.poke,
        )
        self.consumer = FleetConsumer(
            self.js,
            settings,
            self.desired,
            self.reconciler,
            self.puller,
            health,
            on_change=self.poke,
        )
        self.reporter = self._reporter()
        if node_watcher is not None:
            node_watcher.on_change = lambda _: self.on_node_change()

    # --- wiring -----------------------------------------------------------------------------

    def admit(self, fleet: Fleet) -> tuple[bool, str]:
        admitted, reason = self.fleet_filter.admits(fleet)
        if admitted and self.node_watcher is not None:
            admitted, reason = self.node_watcher.schedulable(fleet.pod_spec)
        return admitted, reason

    def _unused(self) -> UnusedImages | None:
        if not self.settings.remove_unused:
            return None
        return UnusedImages(
            self.js,
            self.settings.node_name,
            self.cri.remove_image,
            containers=self.cri,  # images running containers use are never removed
            grace=self.settings.remove_grace,
            prefix=self.settings.subject_prefix,
            replicas=self.settings.status_replicas,
        )

    def _budget(self) -> PullBudget | None:
        if not self.settings.max_cluster_pulls:
            return None
        settings = BudgetSettings(
            max_pulls=self.settings.max_cluster_pulls,
            prefix=self.settings.subject_prefix,
            replicas=self.settings.status_replicas,
            backoff=self.settings.registry_backoff,
        )
        return PullBudget(self.js, settings, self.settings.node_name)

    def _reporter(self) -> StatusReporter | None:
        try:
            check_node(self.settings.node_name)
        except StatusError as e:
            log.warning("node status disabled", extra={"error": str(e)})
            return None
        interval = self.settings.status_interval
        return StatusReporter(
            self.js,
            self.status_settings,
            self.settings.node_name,
            lambda: node_state(
                self.desired, self.reconciler, self.puller, self.replayed.request, self.budget
            ),
            interval=interval,
            heartbeat=max(30.0, interval),
            on_error=lambda _: metrics.NATS_ERRORS.labels("status_write").inc(),
        )

    def poke(self) -> None:
        if self.reporter is not None:
            self.reporter.poke()

    def on_pull_result(self, result: PullResult) -> None:
        self.reconciler.on_pull_result(result)
        if self.unused is not None:
            self.unused.on_pull_result(result)
        self.poke()

    def on_node_change(self) -> None:
        for change in self.desired.reevaluate():
            report_transition(change)
        self.reconciler.update_gauges()
        self.reconciler.kick()
        self.poke()

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [asyncio.create_task(_watch_nats(self.nc, self.health, self.stopping))]
        tasks.append(asyncio.create_task(self._watch_runtime()))
        try:
            if self.node_watcher is not None:
                await self.node_watcher.refresh_once()
            pending = await self._pending_replay()
            if not await _replay(self.consumer, self.health, self.stopping):
                return
            metrics.REPLAYS.labels("start").inc()
            if pending is not None:
                await self._complete(pending)
            with contextlib.suppress(CriError):
                await self.reconciler.reconcile()
            await self.consumer.start_durable()
            tasks += self._background(pending)
            loops = [
                asyncio.create_task(self.reconciler.run(self.settings.sync_period, self.stopping)),
                asyncio.create_task(self.consumer.run(self.stopping)),
            ]
            await asyncio.gather(*loops)
            log.info("draining", extra={"pulls_in_flight": self.puller.inflight})
            await self.puller.close()
            await self.consumer.drain()
            if self.reporter is not None:
                # The last word: what the node holds as it stops.
                await self.reporter.tick()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _background(self, pending: PendingReplay | None) -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(self._refresh_lag())]
        if self.reporter is not None:
            tasks.append(asyncio.create_task(self.reporter.run(self.stopping)))
            ignore = [pending.request.id] if pending is not None else []
            watch = watch_replay_requests(
                self.js,
                self.settings.node_name,
                self._replay_on_request,
                settings=self.status_settings,
                ignore=ignore,
            )
            tasks.append(asyncio.create_task(watch))
        if self.node_watcher is not None:
            tasks.append(asyncio.create_task(self.node_watcher.run(self.stopping)))
        return tasks

    async def _pending_replay(self) -> PendingReplay | None:
        if self.reporter is None:
            return None
        try:
            pending = await pending_replay(
                self.js, self.settings.node_name, settings=self.status_settings
            )
        except Exception as e:
            # The start-up replay happens anyway; only the request's bookkeeping is lost.
            metrics.NATS_ERRORS.labels("replay_request").inc()
            log.warning("cannot read replay requests", extra={"error": repr(e)})
            return None
        if pending is not None:
            log.info(
                "replay requested, honoured by the start-up replay",
                extra={"node": self.settings.node_name, "request": pending.request.id},
            )
        return pending

    async def _complete(self, pending: PendingReplay) -> None:
        self.replayed.request = pending.request.id
        try:
            await complete_replay(
                self.js, self.settings.node_name, pending, settings=self.status_settings
            )
        except Exception as e:
            metrics.NATS_ERRORS.labels("replay_request").inc()
            log.warning("cannot complete the replay request", extra={"error": repr(e)})

    async def _replay_on_request(self, pending: PendingReplay) -> None:
        log.info(
            "replaying the whole log on request",
            extra={"node": self.settings.node_name, "request": pending.request.id},
        )
        await self.consumer.rebuild()
        metrics.REPLAYS.labels("request").inc()
        self.replayed.request = pending.request.id
        self.reconciler.update_gauges()
        self.reconciler.kick()
        self.poke()

    async def _refresh_lag(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):
                await self.consumer.refresh_lag()
            await _until(self.stopping, asyncio.sleep(self.settings.lag_interval))

    async def _watch_runtime(self) -> None:
        """Ask the runtime directly when nothing else did for a while (e.g. during replay)."""
        period = min(self.settings.sync_period, 15.0)
        while not self.stopping.is_set():
            await _until(self.stopping, asyncio.sleep(period))
            if time.monotonic() - self.reconciler.last_answer < period:
                continue
            try:
                await self.cri.check()
                self.reconciler.runtime_answered()
            except CriError as e:
                self.health.set("runtime", False, str(e))


async def _replay(consumer: FleetConsumer, health: Health, stopping: asyncio.Event) -> bool:
    delay = 0.5
    while not stopping.is_set():
        try:
            await consumer.replay()
            health.set("replay", True)
            return True
        except nats.js.errors.NotFoundError:
            reason = f"stream {consumer.stream} does not exist yet"
        except (nats.errors.Error, TimeoutError, OSError) as e:
            reason = f"replay failed: {e!r}"
        health.set("replay", False, reason)
        log.warning("waiting to replay the log", extra={"reason": reason, "retry_in": delay})
        await _until(stopping, asyncio.sleep(delay))
        delay = min(delay * 2, 10.0)
    return False


async def _wait_for_runtime(
    cri: CriClient, health: Health, stopping: asyncio.Event, settings: SyncerSettings
) -> bool:
    # Liveness: an unreachable runtime fails /healthz after runtime_unhealthy_after.
    allowance = settings.runtime_unhealthy_after
    health.beat("runtime", allowance=allowance)
    delay = 0.5
    while not stopping.is_set():
        try:
            await cri.check()
            health.set("runtime", True)
            health.beat("runtime", allowance=allowance)
            log.info("runtime reachable")
            return True
        except CriError as e:
            metrics.CRI_ERRORS.labels("ImageFsInfo").inc()
            health.set("runtime", False, str(e))
            log.warning("runtime unavailable", extra={"error": str(e), "retry_in": delay})
        await _until(stopping, asyncio.sleep(delay))
        delay = min(delay * 2, 10.0)
    return False


async def _watch_nats(nc: Client, health: Health, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        health.set("nats", nc.is_connected, "" if nc.is_connected else "disconnected")
        await _until(stopping, asyncio.sleep(1.0))


async def _serve(settings: SyncerSettings, health: Health) -> asyncio.Server | None:
    if not settings.metrics_addr:
        return None
    host, port = parse_addr(settings.metrics_addr)
    return await serve_http(host, port, health)


async def _until(stopping: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if ``stopping`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
