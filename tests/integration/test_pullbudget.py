"""The cluster-wide pull budget against the real nats-server: slots, dead holders, 429 backoff.

Each "node" is a PullBudget on a NATS connection of its own, as separate syncers would be. A
holder that dies is a connection closed without giving its slot back: the slot must free itself
through its TTL. Nothing here measures time; every wait polls for the state with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from support.polling import eventually

from ops.retry import Backoff
from syncer.folding.references import normalize
from syncer.pulling.pullbudget import BudgetSettings, PullBudget, budget_bucket, is_rate_limited
from syncer.pulling.puller import Puller
from syncer.runtime.cri import CriError
from wire.natsconn import NatsSettings, connect

pytestmark = pytest.mark.nats

IMAGE = normalize("registry.example:5000/game/server:v1")
OTHER_REGISTRY_IMAGE = normalize("other.example/game/server:v1")


@pytest.fixture
async def node_connections(nats_settings: NatsSettings) -> AsyncIterator[list[Client]]:
    clients: list[Client] = []
    yield clients
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


@pytest.fixture
def make_node(
    nats_settings: NatsSettings, node_connections: list[Client], prefix: str
) -> Callable[..., object]:
    async def make(
        node: str, wall_clock: Callable[[], datetime] | None = None, **settings: float
    ) -> PullBudget:
        client = await connect(nats_settings, name=node)
        node_connections.append(client)
        options = {"max_pulls": 1, "prefix": prefix, "lease": 2.0, "backoff": 2.0, **settings}
        clock = {"wall_clock": wall_clock} if wall_clock else {}
        return PullBudget(client.jetstream(), BudgetSettings(**options), node, **clock)  # type: ignore[arg-type]

    return make


class Holder:
    """Holds a slot in a task until released (or its node dies)."""

    def __init__(self, budget: PullBudget, *, mirrored: bool = False) -> None:
        self.budget = budget
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._hold(mirrored))

    async def _hold(self, mirrored: bool) -> None:
        async with self.budget.slot(IMAGE, mirrored=mirrored):
            self.holding.set()
            await self.release.wait()


def test_rate_limit_answers_are_recognised() -> None:
    assert is_rate_limited("CRI PullImage x: UNKNOWN: ... 429 Too Many Requests")
    assert is_rate_limited("toomanyrequests: too many requests, rate limit")
    assert not is_rate_limited("401 Unauthorized") and not is_rate_limited("port 14290")
    assert budget_bucket("agones") == "IMAGE_SYNCER_PULL_SLOTS"
    assert budget_bucket("t1.dev") == "IMAGE_SYNCER_PULL_SLOTS_T1_DEV"


async def test_a_node_waits_for_the_slot_until_the_holder_gives_it_back(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b, c = await make_node("node-a"), await make_node("node-b"), await make_node("node-c")
    first = Holder(a)
    await asyncio.wait_for(first.holding.wait(), 30)
    second = Holder(b)
    await eventually(lambda: IMAGE in b.waiting(), "node-b to wait for the slot")
    assert not second.holding.is_set()
    # Another image has slots of its own.
    async with c.slot(OTHER_REGISTRY_IMAGE):
        pass
    first.release.set()
    await first.task
    await asyncio.wait_for(second.holding.wait(), 30)
    assert b.waiting() == frozenset()
    second.release.set()
    await second.task


async def test_two_slots_let_two_nodes_pull_at_once(make_node) -> None:  # type: ignore[no-untyped-def]
    nodes = [await make_node(f"node-{i}", max_pulls=2) for i in range(3)]
    holders = [Holder(node) for node in nodes]
    await eventually(
        lambda: sum(h.holding.is_set() for h in holders) == 2, "two nodes to hold a slot"
    )
    waiting = next(h for h in holders if not h.holding.is_set())
    await eventually(lambda: IMAGE in waiting.budget.waiting(), "the third node to wait")
    next(h for h in holders if h.holding.is_set()).release.set()
    await asyncio.wait_for(waiting.holding.wait(), 30)
    for holder in holders:
        holder.release.set()
    await asyncio.gather(*(h.task for h in holders))


async def test_a_dead_holders_slot_frees_itself(make_node, node_connections) -> None:  # type: ignore[no-untyped-def]
    dead = await make_node("node-dead")
    holder = Holder(dead)
    await asyncio.wait_for(holder.holding.wait(), 30)
    survivor = await make_node("node-b")
    waiter = Holder(survivor)
    await eventually(lambda: IMAGE in survivor.waiting(), "node-b to wait for the slot")
    # The holder's node dies: its connection is gone, it neither renews nor releases.
    holder.task.cancel()
    await node_connections[0].close()
    await asyncio.wait_for(waiter.holding.wait(), 60)
    waiter.release.set()
    await waiter.task


async def test_a_429_holds_back_the_whole_cluster_for_that_registry(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_node("node-a"), await make_node("node-b", max_pulls=5)
    await a.observe(IMAGE, "CRI PullImage: UNKNOWN: unexpected status: 429 Too Many Requests")
    assert a.backoff_until is not None
    await a.observe(IMAGE, "401 Unauthorized")  # not a rate limit: changes nothing
    # Another registry is not held back.
    async with b.slot(OTHER_REGISTRY_IMAGE):
        pass
    waiter = Holder(b)
    await eventually(lambda: IMAGE in b.waiting(), "node-b to hold back its pull")
    await eventually(lambda: b.backoff_until is not None, "node-b to show the backoff")
    # The backoff's TTL runs out: the pull goes ahead.
    await asyncio.wait_for(waiter.holding.wait(), 60)
    waiter.release.set()
    await waiter.task


async def test_a_node_whose_clock_is_ahead_still_respects_a_backoff(  # type: ignore[no-untyped-def]
    make_node, js: JetStreamContext, prefix: str
) -> None:
    # The writer says "60 s"; a reader whose wall clock is 90 s ahead must not read that as
    # "over 30 s ago". Only the server's TTL and each node's own monotonic clock count.
    a = await make_node("node-a", backoff=60.0)
    ahead = await make_node(
        "node-ahead",
        wall_clock=lambda: datetime.now(UTC) + timedelta(seconds=90),
        backoff=60.0,
        max_pulls=5,
    )
    await a.observe(IMAGE, "CRI PullImage: UNKNOWN: unexpected status: 429 Too Many Requests")
    waiter = Holder(ahead)
    await eventually(
        lambda: waiter.holding.is_set() or ahead.backoff_until is not None,
        "node-ahead to either pull or see the backoff",
    )
    assert not waiter.holding.is_set(), "a node with its clock ahead ignored the cluster backoff"
    assert IMAGE in ahead.waiting()
    # The key goes (its TTL, or lifted): the pull goes ahead. It is node-a's own key
    # (backoff.<registry>.<node>), deleted: the bucket refuses the rollup a purge would send.
    kv = await js.key_value(budget_bucket(prefix))
    await kv.delete("backoff." + IMAGE.domain.replace(".", "_").replace(":", "_") + ".node-a")
    await asyncio.wait_for(waiter.holding.wait(), 60)
    waiter.release.set()
    await waiter.task


async def test_the_puller_takes_a_slot_and_reports_429s(make_node, js: JetStreamContext) -> None:  # type: ignore[no-untyped-def]
    budget = await make_node("node-a", backoff=600.0)

    class RateLimitedCri:
        calls = 0

        async def pull_image(self, ref: str, auth: object = None, *, timeout: float) -> str:
            self.calls += 1
            raise CriError(f"CRI PullImage {ref}: UNKNOWN: 429 Too Many Requests")

    cri = RateLimitedCri()
    puller = Puller(
        cri,  # type: ignore[arg-type]
        max_parallel=2,
        pull_timeout=30.0,
        backoff=Backoff(1.0, 60.0),
        budget=budget,
    )
    result = await puller.ensure(IMAGE)
    assert not result.ok and cri.calls == 1
    assert budget.backoff_until is not None
    # The next pull of that registry waits, and stopping the puller ends the wait at once.
    other = normalize("registry.example:5000/game/other:v1")
    pending = puller.ensure(other)
    await eventually(lambda: other in budget.waiting(), "the next pull to wait out the 429")
    await puller.close(patience=60.0)
    result = await asyncio.wait_for(pending, 30)
    assert result.deferred and result.error == "stopping" and cri.calls == 1


async def test_mirrored_pulls_take_slots_of_their_own(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b, c = [await make_node(f"node-{n}", max_mirror_pulls=1) for n in "abc"]
    registry_bound = Holder(a)
    await asyncio.wait_for(registry_bound.holding.wait(), 30)
    # The registry's one slot is taken; a pull from the mirror does not need it...
    mirrored = Holder(b, mirrored=True)
    await asyncio.wait_for(mirrored.holding.wait(), 30)
    # ...but the mirror's limit holds too.
    second = Holder(c, mirrored=True)
    await eventually(lambda: IMAGE in c.waiting(), "node-c to wait for a mirror slot")
    mirrored.release.set()
    await asyncio.wait_for(second.holding.wait(), 30)
    for holder in (registry_bound, mirrored, second):
        holder.release.set()
        await holder.task


async def test_without_a_mirror_limit_mirrored_pulls_take_no_slot(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_node("node-a"), await make_node("node-b")
    registry_bound = Holder(a)
    await asyncio.wait_for(registry_bound.holding.wait(), 30)
    mirrored = [Holder(b, mirrored=True) for _ in range(2)]
    for holder in mirrored:
        await asyncio.wait_for(holder.holding.wait(), 30)
    for holder in (registry_bound, *mirrored):
        holder.release.set()
        await holder.task


async def test_mirrored_pulls_neither_wait_out_nor_raise_a_registry_backoff(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_node("node-a", backoff=600.0), await make_node("node-b", max_pulls=5)
    # A 429 on a mirrored pull says nothing about the registry's budget.
    await a.observe(IMAGE, "unexpected status: 429 Too Many Requests", mirrored=True)
    assert a.backoff_until is None
    async with b.slot(IMAGE):
        pass
    # A registry-bound 429 holds back registry-bound pulls, not those the mirror serves.
    await a.observe(IMAGE, "unexpected status: 429 Too Many Requests")
    held_back = Holder(b)
    await eventually(lambda: IMAGE in b.waiting(), "node-b's registry pull to be held back")
    async with b.slot(IMAGE, mirrored=True):
        pass
    held_back.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await held_back.task


# --- what a hostile node writes into the budget --------------------------------------------
# Entries without TTL under both the old shared keys (what the budget read before) and the
# per-node keys it reads now: none may hold another node's pulls past its own bounds.


async def _forge(js: JetStreamContext, prefix: str, keys: list[str], value: bytes) -> None:
    # No Nats-TTL: the entry would live as long as the bucket lets it.
    for key in keys:
        await js.publish(f"$KV.{budget_bucket(prefix)}.{key}", value)


async def test_a_backoff_dated_2099_holds_pulls_for_the_readers_backoff_only(  # type: ignore[no-untyped-def]
    make_node, js: JetStreamContext, prefix: str
) -> None:
    b = await make_node("node-b")  # backoff 2s
    async with b.slot(OTHER_REGISTRY_IMAGE):  # binds (creates) the bucket
        pass
    registry = IMAGE.domain.replace(".", "_").replace(":", "_")
    value = b'{"until": "2099-01-01T00:00:00Z", "node": "evil", "error": "429"}'
    await _forge(js, prefix, [f"backoff.{registry}", f"backoff.{registry}.evil"], value)
    waiter = Holder(b)
    await asyncio.wait_for(waiter.holding.wait(), 60)
    assert b.backoff_until is not None and b.backoff_until.year < 2099
    waiter.release.set()
    await waiter.task


async def test_a_slot_written_without_ttl_blocks_nobody_past_one_lease(  # type: ignore[no-untyped-def]
    make_node, js: JetStreamContext, prefix: str
) -> None:
    b = await make_node("node-b")  # one slot, lease 2s
    async with b.slot(OTHER_REGISTRY_IMAGE):  # binds (creates) the bucket
        pass
    token = hashlib.sha256(str(IMAGE).encode()).hexdigest()[:24]
    keys = [f"slot.{token}.0", f"slot.{token}.evil", f"alive.slot.{token}.evil"]
    await _forge(js, prefix, keys, b"evil")
    waiter = Holder(b)
    await asyncio.wait_for(waiter.holding.wait(), 60)
    waiter.release.set()
    await waiter.task
