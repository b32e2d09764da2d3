"""Kubernetes Events on Fleets from the nodes' convergence, through the real kubernetes client.

The fold itself is checked on status entries written the way syncers write them (real NATS, the
wire contract's own writers); the whole path once end to end: a real syncer on containerd, the
in-process broadcaster, and the Events as the fake API server stores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client, config
from nats.js import JetStreamContext
from support.fakekube import FakeKube
from support.fakekube.harness import fleet
from support.faults_harness import (
    InProcessBroadcaster,
    InProcessSyncer,
    broadcaster_settings,
    eventually,
    node_name,
    syncer_settings,
)

from broadcaster.convergence import FleetConvergence, converge, newest_events
from broadcaster.fleetevents import (
    FLEET_NODES,
    FleetEvents,
    FleetReporter,
    Notice,
    next_notice_of,
    notice_of,
)
from image_syncer.sandbox.containerd import Containerd
from wire.contract import NEXT_IMAGES_ANNOTATION, Action, Kind
from wire.eventlog import LogSettings, publish_event
from wire.natsconn import NatsSettings
from wire.nodestatus import (
    NodeStatus,
    StatusSettings,
    ensure_status_bucket,
    put_status,
    summarize,
)
from wire.readiness import Readiness

pytestmark = [pytest.mark.nats]

FLEET = "default/game"
IMAGE = "registry.example/game:1"
AUTH_ERROR = (
    'rpc error: code = Unknown desc = failed to pull and unpack image "registry.example/game:1": '
    "failed to resolve reference: unexpected status from HEAD request: 401 Unauthorized"
)


def _status(node: str, seq: int, *, present: bool, failed: str = "", age: float = 0) -> NodeStatus:
    now = datetime.now(UTC) - timedelta(seconds=age)
    summary = summarize(
        desired={FLEET: [IMAGE]},
        present={IMAGE} if present else set(),
        fleet_seqs={FLEET: seq},
        failed={IMAGE: failed} if failed else None,
    )
    return NodeStatus(node=node, version="test", reported_at=now, started_at=now, summary=summary)


def _convergence(**counts: int) -> FleetConvergence:
    return FleetConvergence(FLEET, "uid-1", 7, {Readiness(k): v for k, v in counts.items()})


# --- what an Event says ------------------------------------------------------------------------


def test_all_targeted_nodes_ready_is_images_pre_pulled() -> None:
    notice = notice_of(_convergence(done=3, not_targeted=2))
    assert notice == Notice(
        "ImagesPrePulled", "Normal", "all 3 nodes hold the images of this Fleet (event seq 7)"
    )


def test_nodes_on_their_way_say_nothing_yet() -> None:
    assert notice_of(_convergence(done=2, behind=1)) is None
    assert notice_of(_convergence(done=2, missing=1)) is None
    assert notice_of(_convergence(not_targeted=4)) is None, "no node wants it: nothing to say"


def test_failing_pulls_name_the_image_the_answer_and_the_nodes() -> None:
    nodes = tuple(f"node-{i}" for i in range(7))
    failing = {(IMAGE, "401 Unauthorized"): nodes, ("r/other:1", "404 Not Found"): ("node-0",)}
    convergence = dataclasses.replace(_convergence(done=1, missing=7), failing=failing)
    notice = notice_of(convergence)
    assert notice is not None and (notice.reason, notice.type) == ("ImagePullFailing", "Warning")
    assert notice.message == (
        f"7 of 8 nodes cannot pull {IMAGE}: 401 Unauthorized "
        "(node-0, node-1, node-2, node-3, node-4, +2 more); 1 more image/error pair(s) failing"
    )


def test_converge_judges_live_nodes_against_the_newest_event() -> None:
    from broadcaster.convergence import LoggedFleet

    statuses = {
        "a": _status("a", 7, present=True),
        "b": _status("b", 5, present=True),  # folded an older version: behind
        "c": _status("c", 7, present=False, failed=AUTH_ERROR),
        "d": _status("d", 7, present=False, age=3600),  # stale: left out
    }
    state = converge({FLEET: LoggedFleet(7, "uid-1")}, statuses, datetime.now(UTC), 60)
    result = state[FLEET]
    assert dict(result.counts) == {Readiness.DONE: 1, Readiness.BEHIND: 1, Readiness.MISSING: 1}
    assert dict(result.failing) == {(IMAGE, "401 Unauthorized"): ("c",)}
    assert (result.targeted, result.ready, result.complete) == (3, 1, False)


# --- Events in the API server ---------------------------------------------------------------


def _core(kube: FakeKube) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(config_file=str(kube.kubeconfig)))


def _events(kube: FakeKube) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = kube.list("events", "default", {})["items"]
    return result


@pytest.fixture
async def logged_fleet(js: JetStreamContext, log_settings: LogSettings) -> int:
    obj = fleet("game", IMAGE)
    obj["metadata"].update(uid="uid-1", resourceVersion="3")
    ack = await publish_event(js, log_settings, f"{Kind.FLEET}.events.{Action.ADDED}", obj)
    return ack.seq


async def test_events_are_created_bumped_and_not_repeated(
    kube: FakeKube, js: JetStreamContext, prefix: str, logged_fleet: int
) -> None:
    status_settings = StatusSettings(prefix=prefix)
    await ensure_status_bucket(js, status_settings)
    reporter = FleetReporter(
        js, FleetEvents(_core(kube), "b-1"), status_settings, interval=1, stale_after=60
    )
    assert (await newest_events(js, prefix))[FLEET].uid == "uid-1"

    await put_status(
        js, status_settings, _status("a", logged_fleet, present=False, failed=AUTH_ERROR)
    )
    await reporter.report_once()
    (event,) = _events(kube)
    assert event["reason"] == "ImagePullFailing" and event["type"] == "Warning"
    assert event["message"].startswith(f"1 of 1 nodes cannot pull {IMAGE}: 401 Unauthorized (a)")
    assert event["involvedObject"] == {
        "apiVersion": "agones.dev/v1",
        "kind": "Fleet",
        "namespace": "default",
        "name": "game",
        "uid": "uid-1",
    }
    assert event["count"] == 1
    assert FLEET_NODES.labels("default", "game", "missing")._value.get() == 1

    await reporter.report_once()  # nothing changed: no write
    assert [e["count"] for e in _events(kube)] == [1]

    await put_status(
        js, status_settings, _status("b", logged_fleet, present=False, failed=AUTH_ERROR)
    )
    await reporter.report_once()  # the same reason, a new message: the series is bumped
    (event,) = _events(kube)
    assert event["count"] == 2 and "2 of 2 nodes cannot pull" in event["message"]

    await put_status(js, status_settings, _status("a", logged_fleet, present=True))
    await put_status(js, status_settings, _status("b", logged_fleet, present=True))
    await reporter.report_once()
    by_reason = {e["reason"]: e for e in _events(kube)}
    assert by_reason["ImagesPrePulled"]["message"] == (
        f"all 2 nodes hold the images of this Fleet (event seq {logged_fleet})"
    )
    assert by_reason["ImagesPrePulled"]["type"] == "Normal"
    assert FLEET_NODES.labels("default", "game", "ready")._value.get() == 2


# --- end to end: a real syncer, the broadcaster, the Events -----------------------------------


@pytest.fixture
async def broadcaster(
    kube: FakeKube, nats_settings: NatsSettings, log_settings: LogSettings
) -> AsyncIterator[InProcessBroadcaster]:
    settings = dataclasses.replace(
        broadcaster_settings(kube, nats_settings, log_settings), fleet_events_interval=0.3
    )
    running = await InProcessBroadcaster(settings).start()
    yield running
    await running.stop()


@pytest.mark.cri
async def test_a_real_syncer_turns_into_events_on_the_fleet(
    kube: FakeKube,
    broadcaster: InProcessBroadcaster,
    own_containerd: Containerd,
    nats_settings: NatsSettings,
    js: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
) -> None:
    image = push()
    syncer = await InProcessSyncer(
        syncer_settings(node_name(), own_containerd, nats_settings, prefix), own_containerd
    ).start()
    try:
        kube.create("fleets", fleet("pulls", image))
        kube.create("fleets", fleet("fails", image.rsplit(":", 1)[0] + ":no-such-tag"))

        def reasons() -> dict[tuple[str, str], str]:
            found = {}
            for event in _events(kube):
                found[(event["involvedObject"]["name"], event["reason"])] = event["message"]
            return found

        await eventually(lambda: ("pulls", "ImagesPrePulled") in reasons(), "ImagesPrePulled")
        await eventually(lambda: ("fails", "ImagePullFailing") in reasons(), "ImagePullFailing")
        message = reasons()[("fails", "ImagePullFailing")]
        assert "1 of 1 nodes cannot pull" in message and syncer.node in message
        assert "all 1 nodes hold the images" in reasons()[("pulls", "ImagesPrePulled")]
    finally:
        await syncer.stop()


# --- next images: their own series -----------------------------------------------------------

NEXT = "registry.example/game:2"


@pytest.fixture
async def staged_fleet(js: JetStreamContext, log_settings: LogSettings) -> int:
    obj = fleet("game", IMAGE)
    # A short name: nodes report it normalized, the broadcaster must compare it so.
    obj["metadata"].update(
        uid="uid-1", resourceVersion="4", annotations={NEXT_IMAGES_ANNOTATION: "game:2, " + NEXT}
    )
    ack = await publish_event(js, log_settings, f"{Kind.FLEET}.events.{Action.ADDED}", obj)
    return ack.seq


async def test_next_images_have_their_own_events(
    kube: FakeKube, js: JetStreamContext, prefix: str, staged_fleet: int
) -> None:
    short = "docker.io/library/game:2"
    status_settings = StatusSettings(prefix=prefix)
    await ensure_status_bucket(js, status_settings)
    reporter = FleetReporter(
        js, FleetEvents(_core(kube), "b-1"), status_settings, interval=1, stale_after=60
    )
    assert (await newest_events(js, prefix))[FLEET].next_images == (short, NEXT)

    def staged(node: str, has: set[str], failed: str = "") -> NodeStatus:
        now = datetime.now(UTC)
        summary = summarize(
            desired={FLEET: [IMAGE, short, NEXT]},
            present=has,
            fleet_seqs={FLEET: staged_fleet},
            failed={NEXT: failed} if failed else None,
        )
        return NodeStatus(node=node, version="t", reported_at=now, started_at=now, summary=summary)

    # The next build is not pushed yet: the running Fleet is fine, its next image is failing.
    await put_status(js, status_settings, staged("a", {IMAGE, short}, failed="404 Not Found"))
    await put_status(js, status_settings, staged("b", {IMAGE, short, NEXT}))
    await reporter.report_once()
    (event,) = _events(kube)
    assert (event["reason"], event["type"]) == ("NextImagesPullFailing", "Warning")
    assert event["message"] == f"1 of 2 nodes cannot pull next image {NEXT}: 404 Not Found (a)"

    await put_status(js, status_settings, staged("a", {IMAGE, short, NEXT}))
    await reporter.report_once()
    by_reason = {e["reason"]: e for e in _events(kube)}
    assert by_reason["NextImagesReady"]["message"] == (
        f"all 2 nodes hold the next images of this Fleet ({short}, {NEXT}; event seq "
        f"{staged_fleet}): it can roll to them without a pull"
    )
    assert by_reason["ImagesPrePulled"]["type"] == "Normal"
    assert "ImagePullFailing" not in by_reason
    await reporter.report_once()  # nothing changed: no write
    assert sorted(e["count"] for e in _events(kube)) == [1, 1, 1]


def test_a_fleet_without_next_images_has_no_next_event() -> None:
    assert next_notice_of(_convergence(done=3)) is None
