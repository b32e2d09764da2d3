"""The node syncer's main coroutine: wire the parts together, run them, stop them in order.

Start: NATS (retried forever), the runtime (retried while unavailable), the replay of the log,
one reconcile, then the live consumer and the periodic reconcile side by side. /readyz says
false until NATS is connected, the runtime answers and the replay is done. Stop (``stopping``
set by SIGTERM): take no more events, let running pulls finish or time out, ack what they
settled, close the connections, return 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from ops.serving import Health, parse_addr, serve_http
from syncer.consumer import FleetConsumer
from syncer.cri import CriClient, CriError
from syncer.desired import DesiredState
from syncer.puller import Backoff, Puller
from syncer.reconcile import Reconciler
from syncer.registryauth import RegistryCredentials
from syncer.settings import SyncerSettings
from wire.natsconn import connect

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
    server = await _serve(settings, health)
    log.info(
        "syncer starting",
        extra={
            "node": settings.node_name,
            "consumer": settings.durable,
            "cri_endpoint": settings.cri_endpoint,
            "nats": settings.nats.safe_servers(),
        },
    )
    cri = CriClient(settings.cri_endpoint, call_timeout=settings.cri_call_timeout)
    nc: Client | None = None
    try:
        nc = await _until(
            stopping,
            connect(settings.nats, name=f"syncer {settings.node_name}", retry_forever=True),
        )
        if nc is None or not await _wait_for_runtime(cri, health, stopping):
            return 0
        await _sync(settings, stopping, health, nc, cri, credentials)
        return 0
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        await cri.close()
        if server is not None:
            server.close()
        log.info("syncer stopped", extra={"node": settings.node_name})


async def _sync(
    settings: SyncerSettings,
    stopping: asyncio.Event,
    health: Health,
    nc: Client,
    cri: CriClient,
    credentials: RegistryCredentials,
) -> None:
    desired = DesiredState()
    reconciler: Reconciler
    puller = Puller(
        cri,
        max_parallel=settings.max_parallel_pulls,
        pull_timeout=settings.pull_timeout,
        backoff=Backoff(settings.backoff_min, settings.backoff_max),
        auth_for=lambda image: credentials.for_image(str(image)),
        on_result=lambda result: reconciler.on_pull_result(result),
    )
    reconciler = Reconciler(cri, desired, puller, health)
    consumer = FleetConsumer(nc.jetstream(), settings, desired, reconciler, puller, health)
    watcher = asyncio.create_task(_watch_nats(nc, health, stopping))
    try:
        if not await _replay(consumer, health, stopping):
            return
        with contextlib.suppress(CriError):
            await reconciler.reconcile()
        await consumer.start_durable()
        loops = [
            asyncio.create_task(reconciler.run(settings.sync_period, stopping)),
            asyncio.create_task(consumer.run(stopping)),
        ]
        await asyncio.gather(*loops)
        log.info("draining", extra={"pulls_in_flight": puller.inflight})
        await puller.close()
        await consumer.drain()
    finally:
        watcher.cancel()


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


async def _wait_for_runtime(cri: CriClient, health: Health, stopping: asyncio.Event) -> bool:
    delay = 0.5
    while not stopping.is_set():
        try:
            await cri.check()
            health.set("runtime", True)
            log.info("runtime reachable")
            return True
        except CriError as e:
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
