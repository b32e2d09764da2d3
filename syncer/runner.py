"""The node syncer's main coroutine: wire the parts together, run them, stop them in order.

Only wiring and order live here; each part is a module of its own (docs/development.md, "Where
things are" lists them). Start: NATS (retried forever), the runtime (retried while unavailable), the
node's labels and taints if ``--respect-scheduling``, the replay of the log (honouring a pending
replay request), one reconcile, then side by side: the live consumer and the periodic reconcile
(the two loops whose end is the end of the syncer), and the background tasks: the node status
reporter, the replay-request watch, the consumer-lag gauge, the NATS and runtime watches and the
node watcher. /readyz says false until NATS is connected, the runtime answers and the replay is
done; /healthz fails when a loop stops turning or the runtime has not answered for
``runtime_unhealthy_after``. Stop (``stopping`` set by SIGTERM): take no more events, let running
pulls finish or time out, ack what they settled, close the connections, return 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from ops.lifecycle import cancel_and_wait, every, until_stopping
from ops.retry import Backoff, retry
from ops.serving import Health, parse_addr, serve_http
from syncer import metrics
from syncer.consumer import FleetConsumer
from syncer.cri import CriClient, CriError, RuntimeImage
from syncer.desired import DesiredState
from syncer.filtering import FleetFilter
from syncer.folding import report_transition
from syncer.gatekeeper import Gatekeeper
from syncer.inventory import Inventory
from syncer.keeping import Keeper
from syncer.nodeinfo import ApiEndpoint, NodeInfoError, NodeWatcher
from syncer.pullbudget import BudgetSettings, PullBudget
from syncer.puller import Puller
from syncer.reconcile import Reconciler
from syncer.references import ImageRef
from syncer.refold import Refolder
from syncer.registryauth import RegistryCredentials
from syncer.replay import replay_until_done
from syncer.replayrequests import ReplayRequests
from syncer.runtimehealth import RuntimeHealth
from syncer.seeding import Seeding, SeedSettings
from syncer.settings import SyncerSettings
from syncer.snapshot import node_state
from syncer.status import StatusReporter
from syncer.unused import UnrecordedLabels, UnusedImages
from wire.contract import Fleet
from wire.natsconn import RETRYABLE, connect
from wire.nodestatus import NodeState, StatusError, StatusSettings, check_node
from wire.permissions import inbox_prefix

__all__ = ["run"]

log = logging.getLogger(__name__)

_NATS_CHECK_PERIOD = 1.0
# How long the background tasks get to end once cancelled (they watch ``stopping`` too).
_TASKS_PATIENCE = 10.0
# How long the reconcile and the consumer get to finish their pass once stopping.
_LOOPS_PATIENCE = 15.0


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
        log.error("cannot read this node from the API server", extra={"error": str(e)})
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
            "startup_taint": settings.startup_taint,
            "extra_images": len(settings.extra_images),
            "mirror": ",".join(settings.mirror),
        },
    )
    cri = CriClient(settings.cri_endpoint, call_timeout=settings.cri_call_timeout)
    runtime = RuntimeHealth(cri, health, allowance=settings.runtime_unhealthy_after)
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
        parts = _Syncer(settings, stopping, health, nc, cri, runtime, credentials, node_watcher)
        await parts.run()
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
    # --seed-per reads a label of this node only when seeding is on at all.
    seed_per = settings.seed_per and settings.mirror
    if not settings.respect_scheduling and not settings.startup_taint and not seed_per:
        return None
    endpoint = ApiEndpoint.from_url(settings.kube_api_url)
    ignored = frozenset({settings.startup_taint}) if settings.startup_taint else frozenset()
    return NodeWatcher(
        endpoint, settings.node_name, refresh=settings.node_refresh, ignored_taints=ignored
    )


async def _serve(settings: SyncerSettings, health: Health) -> asyncio.Server | None:
    if not settings.metrics_addr:
        return None
    host, port = parse_addr(settings.metrics_addr)
    return await serve_http(host, port, health)


class _Syncer:
    """The running parts of one node's syncer and how they talk to each other.

    Stage by stage: events come in through the consumer and fold into the desired state; the
    consumer and the reconcile ask the inventory for the images that state wants; the puller's
    outcomes go to its subscribers (the inventory first, then the runtime's health, the keeper
    (pins) and the cleanup); before each pull the keeper may hold it back (disk budget, an image
    that keeps vanishing); any change pokes the status reporter.
    """

    def __init__(
        self,
        settings: SyncerSettings,
        stopping: asyncio.Event,
        health: Health,
        nc: Client,
        cri: CriClient,
        runtime: RuntimeHealth,
        credentials: RegistryCredentials,
        node_watcher: NodeWatcher | None,
    ) -> None:
        self.settings = settings
        self.stopping = stopping
        self.health = health
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.node_watcher = node_watcher
        self.fleet_filter = FleetFilter.parse(settings.fleet_selector)
        # Fleets are judged again only when the node changes, which only a node watcher sees.
        self.desired = DesiredState(admit=self.admit, keep_objects=node_watcher is not None)
        self.budget = self._budget()
        self.seeding = self._seeding()
        self.keeper = Keeper(settings, cri)
        self.puller = Puller(
            cri,
            max_parallel=settings.max_parallel_pulls,
            pull_timeout=settings.pull_timeout,
            backoff=Backoff(settings.backoff_min, settings.backoff_max),
            auth_for=lambda image: credentials.for_image(str(image)),
            budget=self.budget,
            hold=self.keeper.hold_off,
            admit=self.keeper.refuse,
            before=self._before_pull,
            seeding=self.seeding,
        )
        self.inventory = Inventory(self.desired, self.puller, on_change=self.poke)
        self.puller.subscribe(runtime.on_pull_result)
        self.puller.subscribe(self.keeper.on_pull_result)
        self.unused = self._unused(cri)
        if self.unused is not None:
            self.puller.subscribe(self.unused.on_pull_result)
        self.reconciler = Reconciler(
            cri,
            self.desired,
            self.inventory,
            runtime,
            health,
            after_list=self.after_list,
            observe=self.keeper.observe,
            on_change=self.poke,
        )
        self.runtime = runtime
        self.consumer = FleetConsumer(
            self.js,
            settings,
            self.desired,
            self.inventory,
            health,
            on_change=self.poke,
            on_rebuilt=self.on_desired_change,
        )
        self.refolder = Refolder(self.consumer.refold, period=settings.refold_period)
        self._reconnects = self._reconnect_count()
        self.status_settings = StatusSettings(
            prefix=settings.subject_prefix,
            replicas=settings.status_replicas,
            node_ttl=settings.status_ttl,
        )
        self.gatekeeper = Gatekeeper(
            settings,
            self.desired,
            node_watcher,
            is_present=self.inventory.is_present,
            on_change=self.on_desired_change,
            on_status=self.poke,
        )
        self.reporter = self._reporter()
        self.requests = self._requests()
        if node_watcher is not None:
            node_watcher.on_change = lambda _: self.on_node_change()

    # --- wiring -----------------------------------------------------------------------------

    def admit(self, fleet: Fleet) -> tuple[bool, str]:
        admitted, reason = self.fleet_filter.admits(fleet)
        if admitted and self.node_watcher is not None and self.settings.respect_scheduling:
            admitted, reason = self.node_watcher.schedulable(fleet.pod_spec)
        return admitted, reason

    async def _before_pull(self, image: ImageRef) -> None:
        if self.unused is not None:
            await self.unused.before_pull(image)

    def _unused(self, cri: CriClient) -> UnusedImages | None:
        if not self.settings.remove_unused:
            return None
        return UnusedImages(
            self.js,
            self.settings.node_name,
            # Unpinned first: a pin of ours must not outlive the image.
            self.keeper.removing(cri.remove_image),
            containers=cri,  # images running containers use are never removed
            guard=self.inventory.removal,
            labels=self._unrecorded_labels,
            grace=self.settings.remove_grace,
            prefix=self.settings.subject_prefix,
            replicas=self.settings.status_replicas,
        )

    def _unrecorded_labels(self) -> UnrecordedLabels | None:
        # Pulls NATS could not record are labelled in the runtime where pinning labels.
        images = self.keeper.labels()
        return UnrecordedLabels(images, self.settings.node_name) if images is not None else None

    def _budget(self) -> PullBudget | None:
        if not self.settings.max_cluster_pulls and not self.settings.max_mirror_pulls:
            return None
        settings = BudgetSettings(
            max_pulls=self.settings.max_cluster_pulls,
            prefix=self.settings.subject_prefix,
            replicas=self.settings.status_replicas,
            backoff=self.settings.registry_backoff,
            max_mirror_pulls=self.settings.max_mirror_pulls,
        )
        return PullBudget(self.js, settings, self.settings.node_name)

    def _seeding(self) -> Seeding | None:
        if not self.settings.mirror:
            return None
        settings = SeedSettings(
            mirrored=self.settings.mirror,
            seeds=self.settings.seeds,
            prefix=self.settings.subject_prefix,
            replicas=self.settings.status_replicas,
            deadline=self.settings.seed_timeout,
            report_ttl=self.settings.seed_report_ttl,
        )
        return Seeding(self.nc, settings, self.settings.node_name, group=self._seed_group)

    def _seed_group(self) -> str:
        """The node's value of ``--seed-per`` (its zone, say): seeds are counted per value."""
        known = self.node_watcher.current if self.node_watcher is not None else None
        if not self.settings.seed_per or known is None:
            return ""
        return known.labels.get(self.settings.seed_per, "")

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
            self.node_state,
            interval=interval,
            heartbeat=max(30.0, interval),
            on_error=lambda _: metrics.NATS_ERRORS.labels("status_write").inc(),
        )

    def _requests(self) -> ReplayRequests | None:
        # Requests live next to the node's status: without a status, nobody can ask.
        if self.reporter is None:
            return None
        return ReplayRequests(
            self.js,
            self.settings.node_name,
            self.status_settings,
            rebuild=self.consumer.rebuild,
            on_rebuilt=self.on_desired_change,
        )

    def node_state(self) -> NodeState:
        return node_state(
            self.desired,
            self.inventory,
            last_reconcile=self.reconciler.last_reconcile,
            replayed_request=self.requests.honoured if self.requests else "",
            budget=self.budget,
            keeper=self.keeper,
            gate=self.gatekeeper.status,
            log_created=self.consumer.stream_created,
            seeding=self.seeding,
        )

    async def after_list(
        self, wanted: Callable[[], Collection[ImageRef]], images: list[RuntimeImage]
    ) -> None:
        """After each ListImages: pins follow the desired images, then the cleanup runs (so an
        image no Fleet wants is unpinned before it may be removed). ``wanted`` gives the desired
        images as they are when called: the cleanup asks again before each removal."""
        await self.keeper.after_list(wanted(), self.inventory.present)
        if self.unused is not None:
            await self.unused.after_list(wanted, images)

    def poke(self) -> None:
        if self.reporter is not None:
            self.reporter.poke()
        self.gatekeeper.kick()

    def on_node_change(self) -> None:
        for change in self.desired.reevaluate():
            report_transition(change)
        self.on_desired_change()

    def on_desired_change(self) -> None:
        """The desired state changed outside the event path: reconcile now, report it."""
        self.inventory.update_gauges()
        self.reconciler.kick()
        self.poke()

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [
            self._task(every(_NATS_CHECK_PERIOD, self.stopping, self._check_nats), "nats watch"),
            self._task(self._watch_runtime(), "runtime watch"),
        ]
        try:
            # Stopping abandons the start wherever it is (a replay, a first reconcile).
            if not await until_stopping(self.stopping, self._start(tasks)):
                return
            tasks += self._background()
            loops = [
                self._task(
                    self.reconciler.run(self.settings.sync_period, self.stopping), "reconcile"
                ),
                self._task(self.consumer.run(self.stopping), "consumer"),
            ]
            tasks += loops
            await self._until_loops_end(loops)
            await self._stop()
        finally:
            # Bounded: a background task that does not end must not keep the syncer from exiting.
            left = await cancel_and_wait(tasks, patience=_TASKS_PATIENCE)
            if left:
                log.warning(
                    "background tasks did not stop, exiting without them",
                    extra={"tasks": sorted(task.get_name() for task in left)},
                )

    async def _until_loops_end(self, loops: list[asyncio.Task[None]]) -> None:
        """Until ``stopping`` (or a loop failed); then the loops get a while to finish the pass
        they are in. A pass that hangs is cancelled: it must not keep the syncer from stopping,
        and the next start does it again."""
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([*loops, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        # A loop that failed ends the syncer: the other one is not waited for.
        patience = _LOOPS_PATIENCE if self.stopping.is_set() else 0.0
        _, late = await asyncio.wait(loops, timeout=patience)
        if late:
            if self.stopping.is_set():
                log.warning(
                    "loops did not end in time, cancelled",
                    extra={"loops": sorted(task.get_name() for task in late)},
                )
            await cancel_and_wait(late, patience=_TASKS_PATIENCE)
        for loop in loops:
            error = loop.exception() if loop.done() and not loop.cancelled() else None
            if error is not None:
                raise error

    async def _start(self, tasks: list[asyncio.Task[None]]) -> bool:
        """Everything before the loops; False when the syncer was stopped meanwhile."""
        if self.node_watcher is not None:
            await self.node_watcher.refresh_once()
        status = self.status_settings if self.reporter is not None else None
        await self.gatekeeper.prepare(self.js, status)
        # From here on: the gate's timeout holds even if the replay below never ends.
        tasks += [
            self._task(work, "startup gate")
            for work in self.gatekeeper.tasks(self.js, self.stopping)
        ]
        if self.requests is not None:
            await self.requests.find_pending()
        if not await replay_until_done(
            self.consumer.replay, self.consumer.stream, self.health, self.stopping
        ):
            return False
        metrics.REPLAYS.labels("start").inc()
        if self.requests is not None:
            await self.requests.complete_pending()
        await self.keeper.start(self.js)
        with contextlib.suppress(CriError):
            await self.reconciler.reconcile()
        self.gatekeeper.opened_for_business()
        return await self._start_durable()

    async def _start_durable(self) -> bool:
        """Create the durable, retried while NATS does not answer (a partition, a server
        restarting, a slow link): a timeout here used to end the process."""

        async def attempt() -> bool:
            await self.consumer.start_durable()
            return True

        def report(error: BaseException, delay: float) -> None:
            log.warning(
                "consumer not created, retrying",
                extra={
                    "consumer": self.consumer.durable.name,
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
        if self.settings.lag_interval > 0:
            lag = every(
                self.settings.lag_interval, self.stopping, self.consumer.durable.refresh_lag
            )
            tasks.append(self._task(lag, "consumer lag"))
        if self.reporter is not None:
            tasks.append(self._task(self.reporter.run(self.stopping), "status reporter"))
        if self.requests is not None:
            tasks.append(self._task(self.requests.watch(self.stopping), "replay requests"))
        if self.node_watcher is not None:
            tasks.append(self._task(self.node_watcher.run(self.stopping), "node watcher"))
        tasks.append(self._task(self.refolder.run(self.stopping), "refold"))
        return tasks

    async def _stop(self) -> None:
        log.info("draining", extra={"pulls_in_flight": self.puller.inflight})
        await self.puller.close()
        await self.keeper.close()
        await self.consumer.drain()
        if self.reporter is not None:
            # The last word: what the node holds as it stops.
            await self.reporter.tick()

    def _task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=f"{name} ({self.settings.node_name})")

    async def _check_nats(self) -> None:
        connected = self.nc.is_connected
        self.health.set("nats", connected, "" if connected else "disconnected")
        reconnects = self._reconnect_count()
        if connected and reconnects != self._reconnects:
            # Deletes whose tombstones expired meanwhile will never be delivered: refold.
            self._reconnects = reconnects
            self.refolder.reconnected()

    def _reconnect_count(self) -> int:
        return int(self.nc.stats.get("reconnects", 0))

    async def _watch_runtime(self) -> None:
        # During a long replay nothing else asks the runtime; the reconcile period bounds it.
        await self.runtime.watch(min(self.settings.sync_period, 15.0), self.stopping)
