"""The node syncer's parts, built once and wired together: :func:`assemble` returns them frozen.

Construction and the callbacks between the parts live here (which part tells which of a change,
who may hold a pull back, what the status reports); :mod:`syncer.runner` only starts the parts,
runs them and stops them, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js import JetStreamContext

from ops.retry import Backoff
from ops.serving import Health
from syncer import metrics
from syncer.folding.desired import DesiredState
from syncer.folding.filtering import FleetFilter
from syncer.folding.references import ImageRef
from syncer.folding.transitions import report_transition
from syncer.keeping.keeper import Keeper
from syncer.keeping.unusedimages import UnrecordedLabels, UnusedImages
from syncer.node.gatekeeper import Gatekeeper
from syncer.node.nodeinfo import NodeWatcher
from syncer.pulling.inventory import Inventory
from syncer.pulling.pullbudget import BudgetSettings, PullBudget
from syncer.pulling.puller import Puller
from syncer.pulling.reconcile import Reconciler
from syncer.pulling.registryauth import RegistryCredentials
from syncer.pulling.runtimehealth import RuntimeHealth
from syncer.pulling.seeding import Seeding, SeedSettings
from syncer.reading.antientropy import Refolder
from syncer.reading.consumer import FleetConsumer
from syncer.reporting.nodestate import node_state
from syncer.reporting.replayrequests import ReplayRequests
from syncer.reporting.reporter import StatusReporter
from syncer.runtime.cri import CriClient, RuntimeImage
from syncer.settings import SyncerSettings
from wire.contract import Fleet
from wire.nodestatus import NodeState, StatusError, StatusSettings, check_node

__all__ = ["Parts", "assemble"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """What :mod:`syncer.runner` starts, runs and stops; ``None`` for a part the settings leave
    out."""

    settings: SyncerSettings
    health: Health
    nc: Client
    js: JetStreamContext
    node_watcher: NodeWatcher | None
    runtime: RuntimeHealth
    keeper: Keeper
    puller: Puller
    reconciler: Reconciler
    consumer: FleetConsumer
    refolder: Refolder
    status_settings: StatusSettings
    gatekeeper: Gatekeeper
    reporter: StatusReporter | None
    requests: ReplayRequests | None


def assemble(
    settings: SyncerSettings,
    health: Health,
    nc: Client,
    cri: CriClient,
    runtime: RuntimeHealth,
    credentials: RegistryCredentials,
    node_watcher: NodeWatcher | None,
) -> Parts:
    """Build the parts of one node's syncer, each wired to the others it reports to."""
    wired = _Wiring(settings, health, nc, cri, runtime, credentials, node_watcher)
    return Parts(
        settings=settings,
        health=health,
        nc=nc,
        js=wired.js,
        node_watcher=node_watcher,
        runtime=runtime,
        keeper=wired.keeper,
        puller=wired.puller,
        reconciler=wired.reconciler,
        consumer=wired.consumer,
        refolder=wired.refolder,
        status_settings=wired.status_settings,
        gatekeeper=wired.gatekeeper,
        reporter=wired.reporter,
        requests=wired.requests,
    )


class _Wiring:
    """The parts of one node's syncer and how they talk to each other.

    Stage by stage: events come in through the consumer and fold into the desired state; the
    consumer and the reconcile ask the inventory for the images that state wants; the puller's
    outcomes go to its subscribers (the inventory first, then the runtime's health, the keeper
    (pins) and the cleanup); before each pull the keeper may hold it back (disk budget, an image
    that keeps vanishing); any change pokes the status reporter.
    """

    def __init__(
        self,
        settings: SyncerSettings,
        health: Health,
        nc: Client,
        cri: CriClient,
        runtime: RuntimeHealth,
        credentials: RegistryCredentials,
        node_watcher: NodeWatcher | None,
    ) -> None:
        self.settings = settings
        self.health = health
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.node_watcher = node_watcher
        self.node = settings.node_name
        self.prefix = settings.subject_prefix
        self.fleet_filter = FleetFilter.parse(settings.fleets.selector)
        # Fleets are judged again only when the node changes, which only a node watcher sees.
        self.desired = DesiredState(admit=self.admit, keep_objects=node_watcher is not None)
        self.budget = self._budget()
        self.seeding = self._seeding()
        self.keeper = Keeper(
            settings.keeping,
            settings.runtime,
            cri,
            node=self.node,
            prefix=self.prefix,
            replicas=settings.status.replicas,
            auth_for=lambda image: credentials.for_image(str(image)),
        )
        pulls = settings.pulls
        self.puller = Puller(
            cri,
            max_parallel=pulls.max_parallel,
            pull_timeout=pulls.timeout,
            backoff=Backoff(pulls.backoff_min, pulls.backoff_max),
            auth_for=lambda image: credentials.for_image(str(image)),
            budget=self.budget,
            hold=self.keeper.hold_off,
            admission=self.keeper,
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
            settings.consumer,
            self.desired,
            self.inventory,
            health,
            node=self.node,
            prefix=self.prefix,
            on_change=self.poke,
            on_rebuilt=self.on_desired_change,
        )
        self.refolder = Refolder(self.consumer.refold, period=settings.consumer.refold_period)
        self.status_settings = StatusSettings(
            prefix=self.prefix, replicas=settings.status.replicas, node_ttl=settings.status.ttl
        )
        self.gatekeeper = Gatekeeper(
            settings.gate,
            self.desired,
            node_watcher,
            extra_images=pulls.extra_images,
            node=self.node,
            prefix=self.prefix,
            is_present=self.inventory.is_present,
            on_change=self.on_desired_change,
            on_status=self.poke,
            stalled=self._pulls_stalled,
        )
        self.reporter = self._reporter()
        self.requests = self._requests()
        if node_watcher is not None:
            node_watcher.on_change = lambda _: self.on_node_change()

    def admit(self, fleet: Fleet) -> tuple[bool, str]:
        admitted, reason = self.fleet_filter.admits(fleet)
        if admitted and self.node_watcher is not None and self.settings.fleets.respect_scheduling:
            admitted, reason = self.node_watcher.schedulable(fleet.pod_spec)
        return admitted, reason

    def _pulls_stalled(self) -> str:
        """Why no missing image can arrive now: over the disk budget with nothing in flight."""
        return self.keeper.budget.blocked if self.puller.inflight == 0 else ""

    async def _before_pull(self, image: ImageRef) -> None:
        if self.unused is not None:
            await self.unused.before_pull(image)

    def _unused(self, cri: CriClient) -> UnusedImages | None:
        keeping = self.settings.keeping
        if not keeping.remove_unused:
            return None
        return UnusedImages(
            self.js,
            self.node,
            # Unpinned first: a pin of ours must not outlive the image.
            self.keeper.removing(cri.remove_image),
            containers=cri,  # images running containers use are never removed
            guard=self.inventory.removal,
            labels=self._unrecorded_labels,
            grace=keeping.remove_grace,
            prefix=self.prefix,
            replicas=self.settings.status.replicas,
            ledger_ttl=keeping.ledger_ttl,
        )

    def _unrecorded_labels(self) -> UnrecordedLabels | None:
        # Pulls NATS could not record are labelled in the runtime where pinning labels.
        images = self.keeper.labels()
        return UnrecordedLabels(images, self.node) if images is not None else None

    def _budget(self) -> PullBudget | None:
        pulls, max_mirror_pulls = self.settings.pulls, self.settings.seeding.max_mirror_pulls
        if not pulls.max_cluster and not max_mirror_pulls:
            return None
        settings = BudgetSettings(
            max_pulls=pulls.max_cluster,
            prefix=self.prefix,
            replicas=self.settings.status.replicas,
            backoff=pulls.registry_backoff,
            max_mirror_pulls=max_mirror_pulls,
            # A pull ends by its timeout; its slot counts no longer (one lease of slack).
            max_hold=pulls.timeout + BudgetSettings.lease,
        )
        return PullBudget(self.js, settings, self.node)

    def _seeding(self) -> Seeding | None:
        seeding = self.settings.seeding
        if not seeding.mirror:
            return None
        settings = SeedSettings(
            mirrored=seeding.mirror,
            seeds=seeding.seeds,
            prefix=self.prefix,
            replicas=self.settings.status.replicas,
            deadline=seeding.timeout,
            report_ttl=seeding.report_ttl,
            max_hold=self.settings.pulls.timeout + SeedSettings.lease,
        )
        return Seeding(self.nc, settings, self.node, group=self._seed_group)

    def _seed_group(self) -> str:
        """The node's value of ``--seed-per`` (its zone, say): seeds are counted per value."""
        known = self.node_watcher.current if self.node_watcher is not None else None
        label = self.settings.seeding.per
        if not label or known is None:
            return ""
        return known.labels.get(label, "")

    def _reporter(self) -> StatusReporter | None:
        try:
            check_node(self.node)
        except StatusError as e:
            log.warning("node status disabled", extra={"error": str(e)})
            return None
        status = self.settings.status
        return StatusReporter(
            self.js,
            self.status_settings,
            self.node,
            self.node_state,
            interval=status.interval,
            heartbeat=max(status.heartbeat, status.interval),
            on_error=lambda _: metrics.NATS_ERRORS.labels("status_write").inc(),
        )

    def _requests(self) -> ReplayRequests | None:
        # Requests live next to the node's status: without a status, nobody can ask.
        if self.reporter is None:
            return None
        return ReplayRequests(
            self.js,
            self.node,
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
        await self.keeper.after_list(wanted(), self.inventory.present, images)
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
