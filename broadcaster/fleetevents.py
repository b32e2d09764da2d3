"""Kubernetes Events on Fleets, so `kubectl describe fleet` answers "are my images out there?".

The active broadcaster (the one that publishes: it has the API client and sees every Fleet) reads
the nodes' status every ``fleet_events_interval``, folds it per Fleet
(:mod:`broadcaster.convergence`) and, when a Fleet's convergence changes, records it:

- ``ImagesPrePulled`` (Normal): every node the Fleet is for holds its images, as of its newest
  event;
- ``ImagePullFailing`` (Warning): some nodes cannot pull one of its images, with the registry's
  answer and the nodes' names;
- for a Fleet that names next images (``image-syncer.octops.io/next-images``, a rollout being
  staged), the same two about them alone: ``NextImagesReady`` (Normal: the Fleet can roll to them
  without a game server waiting for a pull) and ``NextImagesPullFailing`` (Warning).

Like the kubelet's event recorder, one Event per Fleet and reason is kept and its ``count`` bumped
(its name is derived from the Fleet and the reason), and nothing is written while nothing changes,
so a flapping node costs one write per interval at most. The same convergence is exported as
``image_syncer_broadcaster_fleet_nodes`` for dashboards. Needs RBAC create/patch on events only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiException, CoreV1Api, CoreV1Event
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge

from broadcaster.convergence import FleetConvergence, converge, newest_events
from ops.lifecycle import every
from wire.nodestatus import StatusSettings, list_statuses, open_status_bucket
from wire.readiness import Readiness

__all__ = ["FLEET_NODES", "FleetEvents", "FleetReporter", "Notice", "next_notice_of", "notice_of"]

log = logging.getLogger(__name__)

FLEET_NODES = Gauge(
    "image_syncer_broadcaster_fleet_nodes",
    "Live nodes per Fleet by readiness against its newest event (ready, missing, behind, "
    "not_targeted), from the nodes' status; exported by the active broadcaster.",
    ["namespace", "fleet", "state"],
)
EVENTS_RECORDED = Counter(
    "image_syncer_broadcaster_fleet_events_total",
    "Kubernetes Events written on Fleets, by reason and outcome (created, bumped, failed).",
    ["reason", "outcome"],
)
_STATES = {
    Readiness.DONE: "ready",
    Readiness.MISSING: "missing",
    Readiness.BEHIND: "behind",
    Readiness.NOT_TARGETED: "not_targeted",
}
SHOWN_NODES = 5
COMPONENT = "image-syncer"


@dataclass(frozen=True)
class Notice:
    """What one Event on a Fleet says."""

    reason: str
    type: str
    message: str


def notice_of(convergence: FleetConvergence) -> Notice | None:
    """The Event a Fleet's convergence calls for, or None while it is on its way."""
    if convergence.failing:
        return _failing("ImagePullFailing", "", convergence.failing, convergence.targeted)
    if convergence.complete:
        return Notice(
            "ImagesPrePulled",
            "Normal",
            f"all {convergence.ready} nodes hold the images of this Fleet "
            f"(event seq {convergence.seq})",
        )
    return None


def next_notice_of(convergence: FleetConvergence) -> Notice | None:
    """The Event about the Fleet's next images, or None (none named, or on their way)."""
    if not convergence.next_images:
        return None
    if convergence.next_failing:
        failing = convergence.next_failing
        return _failing("NextImagesPullFailing", "next image ", failing, convergence.targeted)
    if convergence.next_complete:
        return Notice(
            "NextImagesReady",
            "Normal",
            f"all {convergence.next_ready} nodes hold the next images of this Fleet "
            f"({', '.join(convergence.next_images)}; event seq {convergence.seq}): it can roll "
            "to them without a pull",
        )
    return None


def _failing(
    reason: str, what: str, failing: Mapping[tuple[str, str], tuple[str, ...]], targeted: int
) -> Notice:
    (image, error), nodes = max(failing.items(), key=lambda kv: len(kv[1]))
    shown = ", ".join(nodes[:SHOWN_NODES]) + (
        f", +{len(nodes) - SHOWN_NODES} more" if len(nodes) > SHOWN_NODES else ""
    )
    more = len(failing) - 1
    also = f"; {more} more image/error pair(s) failing" if more else ""
    return Notice(
        reason,
        "Warning",
        f"{len(nodes)} of {targeted} nodes cannot pull {what}{image}: {error} ({shown}){also}",
    )


class FleetEvents:
    """Writes Events on Fleets: one series per Fleet and reason, its count bumped by PATCH.

    Needs only create and patch on events. As the kubelet's recorder does, the series are kept
    in memory: a new process (or a new leader) starts new series, with names of its own.
    """

    def __init__(self, core: CoreV1Api, source_host: str) -> None:
        self.core, self.host = core, source_host
        self._instance = hashlib.sha256(f"{source_host}/{time.time_ns()}".encode()).hexdigest()[:6]
        # (fleet, reason) -> (event name, count so far)
        self._series: dict[tuple[str, str], tuple[str, int]] = {}

    def event_name(self, fleet: str, reason: str) -> str:
        # Event names are DNS subdomains; a Fleet name has at most 63 characters.
        digest = hashlib.sha256(f"{fleet}/{reason}".encode()).hexdigest()[:8]
        return f"{fleet.split('/', 1)[1]}.{digest}{self._instance}"

    def record(self, fleet: str, uid: str, notice: Notice, now: datetime) -> str:
        """Bump the Fleet's series for this reason, or start it; returns bumped or created."""
        namespace = fleet.split("/", 1)[0]
        stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        series = self._series.get((fleet, notice.reason))
        if series is not None:
            name, count = series
            patch = {"count": count + 1, "lastTimestamp": stamp, "message": notice.message}
            try:
                self.core.patch_namespaced_event(
                    name, namespace, patch, _content_type="application/merge-patch+json"
                )
                self._series[(fleet, notice.reason)] = (name, count + 1)
                return "bumped"
            except ApiException as e:
                if e.status != 404:  # expired (the API server keeps events for an hour)
                    raise
        name = self.event_name(fleet, notice.reason)
        event = CoreV1Event.from_dict(self._event(fleet, uid, name, notice, stamp))
        assert event is not None
        self.core.create_namespaced_event(namespace, event)
        self._series[(fleet, notice.reason)] = (name, 1)
        return "created"

    def _event(self, fleet: str, uid: str, name: str, notice: Notice, stamp: str) -> dict[str, Any]:
        namespace, fleet_name = fleet.split("/", 1)
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": "agones.dev/v1",
                "kind": "Fleet",
                "namespace": namespace,
                "name": fleet_name,
                "uid": uid,
            },
            "reason": notice.reason,
            "type": notice.type,
            "message": notice.message,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": COMPONENT, "host": self.host},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.host,
        }


class FleetReporter:
    """The loop: read status and log, fold per Fleet, export gauges, record what changed."""

    def __init__(
        self,
        js: JetStreamContext,
        events: FleetEvents,
        status: StatusSettings,
        *,
        interval: float,
        stale_after: float,
    ) -> None:
        self.js, self.events, self.status = js, events, status
        self.interval, self.stale_after = interval, stale_after
        # (fleet, series) -> what was said last: the Fleet's images, and its next images.
        self._said: dict[tuple[str, str], Notice] = {}
        self._exported: set[tuple[str, str, str]] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Report every ``interval`` until ``stopping``, or cancelled (the lead is lost)."""
        await every(self.interval, stopping, self._report)

    async def _report(self) -> None:
        try:
            await self.report_once()
        except Exception as e:  # a NATS or API hiccup: try again next interval
            log.warning("fleet convergence report failed", extra={"error": repr(e)})

    async def report_once(self) -> dict[str, FleetConvergence]:
        kv = await open_status_bucket(self.js, self.status)
        statuses = (await list_statuses(kv))[0] if kv is not None else {}
        newest = await newest_events(self.js, self.status.prefix)
        state = converge(newest, statuses, datetime.now(UTC), self.stale_after)
        self._export(state)
        for fleet, convergence in state.items():
            await self._maybe_record(fleet, "images", notice_of(convergence), convergence)
            await self._maybe_record(fleet, "next", next_notice_of(convergence), convergence)
        for gone in [key for key in self._said if key[0] not in state]:
            del self._said[gone]
        return state

    def _export(self, state: dict[str, FleetConvergence]) -> None:
        exported = set()
        for fleet, convergence in state.items():
            namespace, name = fleet.split("/", 1)
            for verdict, label in _STATES.items():
                FLEET_NODES.labels(namespace, name, label).set(convergence.counts.get(verdict, 0))
                exported.add((namespace, name, label))
        for labels in self._exported - exported:
            FLEET_NODES.remove(*labels)
        self._exported = exported

    async def _maybe_record(
        self, fleet: str, series: str, notice: Notice | None, convergence: FleetConvergence
    ) -> None:
        if notice is None or self._said.get((fleet, series)) == notice:
            return
        try:
            outcome = await asyncio.to_thread(
                self.events.record, fleet, convergence.uid, notice, datetime.now(UTC)
            )
        except ApiException as e:
            EVENTS_RECORDED.labels(notice.reason, "failed").inc()
            log.warning(
                "cannot record an event on the fleet",
                extra={"fleet": fleet, "reason": notice.reason, "status": e.status},
            )
            return
        EVENTS_RECORDED.labels(notice.reason, outcome).inc()
        self._said[(fleet, series)] = notice
        log.info(
            "fleet event recorded",
            extra={"fleet": fleet, "reason": notice.reason, "event_message": notice.message},
        )
