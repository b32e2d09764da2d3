"""The startup-taint gate against the fake API server: what it removes, when, and what it keeps."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.celpolicy import startup_taint_policy
from support.fakekube import FakeKube
from support.polling import eventually as until

from image_syncer.sandbox.fakekube import Denial
from ops.logs import fields_of
from syncer import metrics
from syncer.folding.scheduling import Taint
from syncer.node.bootclock import BootClock
from syncer.node.nodeinfo import ApiCallError, ApiEndpoint, NodeWatcher
from syncer.node.nodetaints import Removal, remove_taint
from syncer.node.startupgate import StartupGate
from wire.contract import PodSpec
from wire.nodestatus import GateStatus

GATE = "image-syncer.agones.dev/images-not-ready"
NODE = "pool-a-1"


def node(*taints: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": NODE, "labels": {"kubernetes.io/arch": "amd64"}},
        "spec": {"providerID": "fake://pool-a-1", "taints": list(taints)},
    }


GATE_TAINT = {"key": GATE, "effect": "NoSchedule"}
OTHER = {"key": "dedicated", "value": "gameservers", "effect": "NoSchedule"}
# The lifecycle controller's taints carry timeAdded: a field our types do not model, kept as is.
NOT_READY = {
    "key": "node.kubernetes.io/not-ready",
    "effect": "NoExecute",
    "timeAdded": "2026-11-30T05:00:00Z",
}


def taints_of(kube: FakeKube) -> list[dict[str, Any]]:
    stored = kube.get("nodes", "", NODE)
    assert stored is not None
    return stored["spec"].get("taints") or []


def patches(kube: FakeKube) -> int:
    return sum(1 for method, _ in kube.requests if method == "PATCH")


def test_removes_only_the_gate_taint(kube: FakeKube) -> None:
    kube.create("nodes", node(OTHER, GATE_TAINT, NOT_READY))
    before = kube.get("nodes", "", NODE)
    assert remove_taint(ApiEndpoint(kube.url), NODE, GATE) is Removal.REMOVED
    after = kube.get("nodes", "", NODE)
    assert after is not None and before is not None
    assert after["spec"]["taints"] == [OTHER, NOT_READY]
    assert after["metadata"]["labels"] == before["metadata"]["labels"]
    assert after["spec"]["providerID"] == before["spec"]["providerID"]


def test_a_node_without_the_taint_is_not_written(kube: FakeKube) -> None:
    kube.create("nodes", node(OTHER))
    assert remove_taint(ApiEndpoint(kube.url), NODE, GATE) is Removal.ABSENT
    assert patches(kube) == 0
    assert taints_of(kube) == [OTHER]


def test_a_conflict_is_read_again_and_the_other_change_kept(kube: FakeKube) -> None:
    kube.create("nodes", node(GATE_TAINT))
    conflicts: list[int] = []

    def operator_adds_a_taint() -> None:
        current = kube.get("nodes", "", NODE)
        assert current is not None
        current["spec"]["taints"].append(OTHER)
        kube.update("nodes", current)

    kube.before_next_patch(operator_adds_a_taint)
    outcome = remove_taint(
        ApiEndpoint(kube.url), NODE, GATE, on_conflict=lambda: conflicts.append(1)
    )
    assert outcome is Removal.REMOVED
    assert conflicts == [1]
    assert patches(kube) == 2
    # The taint added between our read and our first patch survived the second one.
    assert taints_of(kube) == [OTHER]


def test_the_gate_taint_does_not_exclude_fleets() -> None:
    watcher = NodeWatcher(ApiEndpoint("http://127.0.0.1:1"), NODE, ignored_taints=frozenset({GATE}))
    from syncer.folding.scheduling import NodeInfo

    watcher.current = NodeInfo(NODE, {}, (Taint(GATE, "NoSchedule"),))
    assert watcher.schedulable(PodSpec())[0]
    watcher.current = NodeInfo(NODE, {}, (Taint(GATE, "NoSchedule"), Taint("x", "NoSchedule")))
    assert not watcher.schedulable(PodSpec())[0]


# --- the gate's decisions -----------------------------------------------------------------------


class Images:
    """What the syncer's inventory would answer: the missing images, and whether it knows yet."""

    def __init__(self, *missing: str) -> None:
        self.missing = list(missing)
        self.ready = True


def gate_for(
    kube: FakeKube, images: Images, *, timeout: float = 900.0, boot: BootClock | None = None
) -> StartupGate:
    watcher = NodeWatcher(
        ApiEndpoint(kube.url), NODE, refresh=3600, ignored_taints=frozenset({GATE})
    )
    gate = StartupGate(
        GATE,
        watcher,
        missing=lambda: images.missing,
        ready=lambda: images.ready,
        timeout=timeout,
        boot=boot,
    )
    watcher.on_change = lambda _: gate.kick()
    return gate


async def test_closed_while_images_are_missing_then_opened(kube: FakeKube) -> None:
    kube.create("nodes", node(OTHER, GATE_TAINT))
    images = Images("registry.local/game:1")
    images.ready = False
    gate = gate_for(kube, images)
    await gate.watcher.refresh_once()
    await gate.step()
    assert gate.status.state == "waiting"  # the log is not replayed yet: nothing is known
    images.ready = True
    await gate.step()
    assert gate.status.state == "closed"
    assert gate.status.missing == ["registry.local/game:1"]
    assert gate.status.closed_since is not None
    assert metrics.GATE_CLOSED._value.get() == 1
    assert GATE in {t["key"] for t in taints_of(kube)}
    assert patches(kube) == 0

    images.missing.clear()
    await gate.step()
    assert gate.status.state == "open" and not gate.status.by_timeout
    assert gate.status.opened_at is not None
    assert taints_of(kube) == [OTHER]
    assert metrics.GATE_CLOSED._value.get() == 0
    assert metrics.GATE_OPEN_LATENCY._value.get() > 0


async def test_timeout_opens_with_one_warning(
    kube: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    kube.create("nodes", node(GATE_TAINT))
    images = Images("registry.local/broken:1")
    gate = gate_for(kube, images, timeout=0.3)
    timeouts = metrics.GATE_TIMEOUTS._value.get()
    stopping = asyncio.Event()
    await gate.watcher.refresh_once()
    with caplog.at_level(logging.WARNING, logger="syncer.node.startupgate"):
        task = asyncio.create_task(gate.run(stopping))
        await until(lambda: gate.status.state == "open", "the timeout to open the gate")
        stopping.set()
        await task
    assert gate.status.by_timeout
    assert taints_of(kube) == []
    assert metrics.GATE_TIMEOUTS._value.get() == timeouts + 1
    warnings = [r for r in caplog.records if "timeout" in r.getMessage()]
    assert len(warnings) == 1
    assert fields_of(warnings[0])["missing"] == ["registry.local/broken:1"]


async def test_a_taint_added_again_closes_the_gate_again(kube: FakeKube) -> None:
    kube.create("nodes", node(GATE_TAINT))
    images = Images()
    gate = gate_for(kube, images)
    stopping = asyncio.Event()
    await gate.watcher.refresh_once()
    task = asyncio.create_task(gate.run(stopping))
    try:
        await until(lambda: gate.status.state == "open", "the gate to open")
        images.missing.append("registry.local/game:2")
        current = kube.get("nodes", "", NODE)
        assert current is not None
        current["spec"]["taints"] = [GATE_TAINT]
        kube.update("nodes", current)  # an operator taints the node again
        await gate.watcher.refresh_once()
        await until(lambda: gate.status.state == "closed", "the gate to close again")
        assert gate.status.opened_at is None
        images.missing.clear()
        gate.kick()
        await until(lambda: taints_of(kube) == [], "the taint to go again")
    finally:
        stopping.set()
        await task


class BootTime:
    """The kernel's boot-time clock, by hand."""

    def __init__(self, boot_id: str = "boot-1") -> None:
        self.seconds = 10_000.0
        self.clock = BootClock(boot_id, lambda: self.seconds)


async def test_a_restart_resumes_the_timeout(kube: FakeKube) -> None:
    kube.create("nodes", node(GATE_TAINT))
    images = Images("registry.local/slow:1")
    boot = BootTime()
    gate = gate_for(kube, images, timeout=600.0, boot=boot.clock)
    since = datetime.now(UTC) - timedelta(seconds=599.5)
    gate.resume(
        GateStatus(
            taint=GATE,
            state="closed",
            closed_since=since,
            boot_id="boot-1",
            closed_uptime=boot.seconds - 599.5,
        )
    )
    await gate.watcher.refresh_once()
    await gate.step()
    assert gate.status.state == "closed" and gate.status.closed_since == since
    stopping = asyncio.Event()
    task = asyncio.create_task(gate.run(stopping))
    try:
        await until(lambda: gate.status.state == "open", "the resumed timeout to expire")
    finally:
        stopping.set()
        await task
    assert gate.status.by_timeout


@pytest.mark.parametrize("boot_id", ["boot-1", "boot-0"])
async def test_a_wall_clock_stepped_at_boot_does_not_expire_a_resumed_timeout(
    kube: FakeKube, boot_id: str
) -> None:
    """Issue 23: resume() measured the time closed on the wall clock. The entry says the gate
    closed 2h ago by the wall clock (NTP stepped it forward since), 10s ago by the boot-time
    clock: 10s it is. An entry of another boot (the node rebooted) starts the timeout over."""
    kube.create("nodes", node(GATE_TAINT))
    boot = BootTime()
    gate = gate_for(kube, Images("registry.local/slow:1"), timeout=600.0, boot=boot.clock)
    since = datetime.now(UTC) - timedelta(hours=2)
    gate.resume(
        GateStatus(
            taint=GATE,
            state="closed",
            closed_since=since,
            boot_id=boot_id,
            closed_uptime=boot.seconds - 10.0,
        )
    )
    await gate.watcher.refresh_once()

    await gate.step()

    assert gate.status.state == "closed"
    assert GATE in {t["key"] for t in taints_of(kube)}
    assert gate._closed_at is not None
    closed_for = time.monotonic() - gate._closed_at
    assert closed_for < 60.0  # 10s on a resumed clock (or ~0s started over), never 2h
    assert gate.status.closed_uptime == (boot.seconds - 10.0 if boot_id == "boot-1" else 10_000.0)


async def test_a_refused_removal_is_retried(kube: FakeKube) -> None:
    kube.create("nodes", node(GATE_TAINT))
    gate = gate_for(kube, Images())
    await gate.watcher.refresh_once()
    gate.endpoint = ApiEndpoint(kube.url + "/nowhere")  # the patch path answers 404
    errors = metrics.GATE_ERRORS.labels("api")._value.get()
    await gate.step()
    assert gate.status.state == "closed"
    assert metrics.GATE_ERRORS.labels("api")._value.get() == errors + 1
    gate.endpoint = ApiEndpoint(kube.url)
    stopping = asyncio.Event()
    task = asyncio.create_task(gate.run(stopping))
    try:
        await until(lambda: gate.status.state == "open", "the retry to open the gate")
    finally:
        stopping.set()
        await task


async def test_an_unreadable_log_does_not_keep_the_node_out_forever(kube: FakeKube) -> None:
    kube.create("nodes", node(GATE_TAINT))
    images = Images()
    images.ready = False  # e.g. the node-images stream cannot be read
    gate = gate_for(kube, images, timeout=0.3)
    gate.started -= 60  # up for a minute: past the grace a fresh start gets to read the log
    await gate.watcher.refresh_once()
    stopping = asyncio.Event()
    task = asyncio.create_task(gate.run(stopping))
    try:
        await until(lambda: gate.status.state == "open", "the timeout to open the gate")
    finally:
        stopping.set()
        await task
    assert gate.status.by_timeout
    assert taints_of(kube) == []


# --- the shipped admission policy, met by the syncer's real PATCH -------------------------------

POLICY_GATE = "image-syncer.octops.io/images-not-ready"  # the key the shipped policy names


def syncer_endpoint(kube: FakeKube, tmp_path: Path, node: str) -> ApiEndpoint:
    """The syncer's API access: a pod-bound token of its ServiceAccount on ``node``."""
    token = kube.issue_token(
        "image-syncer-node",
        "image-syncer-syncer",
        node=node,
        audiences=("https://kubernetes.default.svc",),
    )
    token_file = tmp_path / f"token-{node}"
    token_file.write_text(token)
    return ApiEndpoint(kube.url, token_file=token_file)


def test_the_shipped_policy_admits_the_gates_own_patch(kube: FakeKube, tmp_path: Path) -> None:
    """The real merge patch (resourceVersion precondition, taint list), read through the real
    policy on a request shaped as a real API server's (issue 21: refused by every one)."""
    kube.admission = startup_taint_policy().denial
    gate = {"key": POLICY_GATE, "effect": "NoSchedule"}
    for name in (NODE, "pool-a-2"):
        kube.create("nodes", {**node(OTHER, gate, NOT_READY), "metadata": {"name": name}})
    endpoint = syncer_endpoint(kube, tmp_path, NODE)
    assert remove_taint(endpoint, NODE, POLICY_GATE) is Removal.REMOVED
    assert taints_of(kube) == [OTHER, NOT_READY]
    # The last taint too: the patch's empty list is what the policy must accept.
    kube.create("nodes", {**node(gate), "metadata": {"name": "pool-a-3"}})
    only = syncer_endpoint(kube, tmp_path, "pool-a-3")
    assert remove_taint(only, "pool-a-3", POLICY_GATE) is Removal.REMOVED
    # Another node's taint, with this node's token: refused, counted as forbidden.
    with pytest.raises(ApiCallError) as refused:
        remove_taint(endpoint, "pool-a-2", POLICY_GATE)
    assert refused.value.code == 403 and refused.value.refused
    assert "ValidatingAdmissionPolicy 'image-syncer-startup-taint'" in str(refused.value)
    other = kube.get("nodes", "", "pool-a-2")
    assert other is not None and gate in other["spec"]["taints"]


@pytest.mark.parametrize("reason", ["Forbidden", "Invalid"])
async def test_an_admission_refusal_counts_as_forbidden(kube: FakeKube, reason: str) -> None:
    """403 of a validation with reason Forbidden, 422 of one without or of an expression error."""
    kube.create("nodes", node(GATE_TAINT))
    message = "expression 'request.subResource' resulted in error: no such key: subResource"
    kube.admission = lambda _: Denial("image-syncer-startup-taint", "b", message, reason)
    gate = gate_for(kube, Images())
    await gate.watcher.refresh_once()
    forbidden = metrics.GATE_ERRORS.labels("forbidden")._value.get()
    api = metrics.GATE_ERRORS.labels("api")._value.get()
    await gate.step()
    assert gate.status.state == "closed"
    assert metrics.GATE_ERRORS.labels("forbidden")._value.get() == forbidden + 1
    assert metrics.GATE_ERRORS.labels("api")._value.get() == api
    assert GATE_TAINT in taints_of(kube)
