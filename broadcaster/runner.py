"""The broadcaster process: wire NATS, the streams, the watchers and the HTTP endpoints together.

Start-up order: serve /healthz, /readyz and /metrics first (so a probe can tell "starting" from
"dead"), connect to NATS (retrying forever), make sure the streams exist, then start one
watcher thread and one forwarder task per watch target. Ready means NATS is connected and every
target's initial list has been caught up into the log.

On ``stopping`` (SIGTERM): stop the watchers, give the forwarders ``drain_timeout`` to publish
what they already hold, close NATS and return 0. Anything not drained is found by the next
start's catch-up, so stopping early loses nothing for good.

With ``ha`` (several replicas), all of the above but the watching and publishing happens in
every replica; only the holder of the lease (:mod:`broadcaster.lease`) watches and publishes.
A standby is ready but idle. Taking over starts with a fresh list and catch-up, so whatever the
previous holder did not publish is published now; losing the lease stops at once, without
draining. A publish of the old holder still on its way (even one the NATS client buffered while
cut off, which cancelling the forwarders does not remove) was conditioned on the object's newest
message as the old holder saw it, so JetStream refuses it once the new holder has published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kubernetes import client
from nats.aio.client import Client
from nats.js import JetStreamContext

from broadcaster.catchup import LogView
from broadcaster.fleetevents import FleetEvents, FleetReporter
from broadcaster.forwarding import Forwarder
from broadcaster.kubeapi import custom_objects_api
from broadcaster.lease import LEADER, Lease
from broadcaster.publishing import Publisher
from broadcaster.settings import Settings
from broadcaster.sidecar import SidecarWatcher
from broadcaster.watching import Watcher
from ops.lifecycle import until_stopping, wait_any
from ops.retry import Backoff, retry
from ops.serving import Health, parse_addr, serve_http
from wire.eventlog import ensure_streams
from wire.kvbuckets import ensure_bucket
from wire.natsconn import RETRYABLE, connect
from wire.nodestatus import StatusSettings
from wire.permissions import BROADCASTER_INBOX, inbox_prefix, install_buckets

__all__ = ["run"]

log = logging.getLogger(__name__)

_MONITOR_PERIOD = 1.0


async def run(settings: Settings, stopping: asyncio.Event, *, health: Health | None = None) -> int:
    """Run until ``stopping`` is set; returns the exit code (0 after a clean drain)."""
    health = health or Health()
    health.set("nats", False, "connecting")
    health.set("initial-list", False, "not listed yet")
    # Fail before any network work if the Kubernetes configuration is unusable.
    api = custom_objects_api(settings.kubeconfig)
    host, port = parse_addr(settings.metrics_addr)
    server = await serve_http(host, port, health)
    try:
        nc = await until_stopping(
            stopping,
            connect(
                settings.nats.with_inbox(inbox_prefix(BROADCASTER_INBOX)),
                name="broadcaster",
                retry_forever=True,
            ),
        )
        if nc is None:
            return 0
        try:
            js = nc.jetstream()
            if not await until_stopping(stopping, _ensure_streams(js, settings)):
                return 0
            if settings.ha:
                await _broadcast_when_leading(settings, api, nc, js, health, stopping)
            else:
                # The only replica is the active one (the no-broadcaster alert watches this).
                LEADER.set(1)
                try:
                    await _broadcast(settings, api, nc, js, health, stopping)
                finally:
                    LEADER.set(0)
        finally:
            await nc.close()
    finally:
        server.close()
        await server.wait_closed()
        api.api_client.close()
    log.info("broadcaster stopped")
    return 0


async def _broadcast_when_leading(
    settings: Settings,
    api: client.CustomObjectsApi,
    nc: Client,
    js: JetStreamContext,
    health: Health,
    stopping: asyncio.Event,
) -> None:
    """Stand by until this replica holds the lease, broadcast while it does; repeat."""
    lease = Lease(
        js, settings.log.prefix, settings.identity, settings.lease_ttl, settings.log.replicas
    )
    fields = {"identity": settings.identity, "lease": f"{lease.bucket}/{lease.key}"}
    while not stopping.is_set():
        _standby(health)
        monitor = asyncio.create_task(_monitor(nc, [], health))
        try:
            if await until_stopping(stopping, _acquired(lease)) is None:
                return
        finally:
            monitor.cancel()
        LEADER.set(1)
        log.info("leadership acquired", extra=fields)
        lost = asyncio.Event()
        reason = "stopping"
        holding = asyncio.create_task(lease.hold())
        holding.add_done_callback(_setting(lost))
        try:
            await _broadcast(settings, api, nc, js, health, stopping, lost=lost)
        finally:
            if holding.done() and not holding.cancelled():
                error = holding.exception()
                reason = holding.result() if error is None else f"renewal failed: {error!r}"
            holding.cancel()
            LEADER.set(0)
        if stopping.is_set():
            await lease.release()
        log.info("leadership lost", extra={**fields, "reason": reason})


async def _acquired(lease: Lease) -> bool:
    await lease.acquire()
    return True


def _standby(health: Health) -> None:
    LEADER.set(0)
    # Ready but idle: nothing to list while another replica broadcasts.
    health.set("initial-list", True, "standby")


async def _broadcast(
    settings: Settings,
    api: client.CustomObjectsApi,
    nc: Client,
    js: JetStreamContext,
    health: Health,
    stopping: asyncio.Event,
    *,
    lost: asyncio.Event | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    sidecar = None
    if settings.sidecar.namespace:
        sidecar = SidecarWatcher(api.api_client, js, settings.log, settings.sidecar)
    publisher = Publisher(js, settings, streams_recreated=sidecar.wake if sidecar else None)
    view = LogView(js, settings.log)
    forwarders, watchers, tasks = [], [], []
    for target in settings.targets():
        forwarder = Forwarder(target, settings, publisher, view)
        watcher = Watcher(api, target, settings, forwarder.queue, loop)
        forwarders.append(forwarder)
        watchers.append(watcher)
        tasks.append(asyncio.create_task(forwarder.run(), name=f"forward {target}"))
        watcher.start()
    if sidecar is not None:
        follow = sidecar.run(stopping)
        tasks.append(asyncio.create_task(follow, name="follow the sdk sidecar image"))
    log.info(
        "broadcasting",
        extra={
            "targets": ",".join(str(t) for t in settings.targets()),
            "label_selector": settings.label_selector,
            "prefix": settings.log.prefix,
        },
    )
    if settings.fleet_events:
        reporter = _fleet_reporter(settings, api, js)
        tasks.append(asyncio.create_task(reporter.run(stopping), name="fleet events"))
    monitor = asyncio.create_task(_monitor(nc, forwarders, health))
    try:
        await wait_any(*(e for e in (stopping, lost) if e is not None))
    finally:
        monitor.cancel()
        # A replica that lost its lease must not publish what it still holds: drain nothing.
        drain_for = 0.0 if lost is not None and lost.is_set() else settings.drain_timeout
        await _drain(drain_for, watchers, forwarders, tasks)


def _fleet_reporter(
    settings: Settings, api: client.CustomObjectsApi, js: JetStreamContext
) -> FleetReporter:
    events = FleetEvents(client.CoreV1Api(api.api_client), settings.identity)
    return FleetReporter(
        js,
        events,
        StatusSettings(prefix=settings.log.prefix),
        interval=settings.fleet_events_interval,
        stale_after=settings.node_stale_after,
    )


async def _monitor(nc: Client, forwarders: list[Forwarder], health: Health) -> None:
    while True:
        health.beat("broadcaster", allowance=30 * _MONITOR_PERIOD)
        health.set("nats", nc.is_connected, "" if nc.is_connected else "disconnected")
        pending = [str(f.target) for f in forwarders if not f.caught_up.is_set()]
        health.set("initial-list", not pending, "waiting for " + ",".join(pending))
        await asyncio.sleep(_MONITOR_PERIOD)


def _setting(event: asyncio.Event) -> Callable[[object], None]:
    """A done-callback that sets ``event`` however the task ended."""
    return lambda _task: event.set()


async def _drain(
    drain_timeout: float,
    watchers: list[Watcher],
    forwarders: list[Forwarder],
    tasks: list[asyncio.Task[None]],
) -> None:
    for watcher in watchers:
        watcher.stop()
    queued = sum(f.queue.qsize() for f in forwarders)
    if drain_timeout <= 0:
        log.info("not draining: the lease holder catches up", extra={"queued": queued})
    else:
        log.info("draining", extra={"queued": queued})
        try:
            async with asyncio.timeout(drain_timeout):
                await asyncio.gather(*(f.queue.join() for f in forwarders))
        except TimeoutError:
            left = sum(f.queue.qsize() for f in forwarders)
            log.warning("drain timed out; the next start catches up", extra={"queued": left})
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(w.join(timeout=5.0) for w in watchers))


async def _ensure_streams(js: JetStreamContext, settings: Settings) -> bool:
    def report(error: BaseException, delay: float) -> None:
        log.warning(
            "cannot ensure streams, retrying",
            extra={"error": repr(error), "retry_in": round(delay, 2)},
        )

    async def attempt() -> bool:
        await ensure_streams(js, settings.log, settings.kinds)
        # Every bucket the nodes use, with its final config: no node may create one, and one
        # found with another config is refused (BucketConfigError stops the broadcaster).
        for config in install_buckets(settings.log.prefix, settings.log.replicas):
            await ensure_bucket(js, config)
        return True

    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    return await retry(attempt, retry_on=RETRYABLE, backoff=backoff, on_retry=report)
