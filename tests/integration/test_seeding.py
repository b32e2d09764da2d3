"""Seeding against the real nats-server: one seed first, the rest after its report; dead, slow
and lying seeds.

Each "node" is a :class:`Seeding` on a NATS connection of its own, as separate syncers would be.
A pull is the body of ``turn``; a seed that dies is a connection closed while it holds its
lease. Nothing here measures time: every wait polls for a state with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest
from nats.aio.client import Client
from prometheus_client import REGISTRY
from support.polling import eventually

from syncer.folding.references import ImageRef, normalize
from syncer.pulling.pullbudget import budget_bucket, image_hash
from syncer.pulling.seeding import Seeding, SeedReport, SeedSettings, SeedTurn, group_token, mirrors
from wire.natsconn import NatsSettings, connect

pytestmark = pytest.mark.nats

MIRRORED = "registry.example:5000"
IMAGE = normalize(f"{MIRRORED}/game/server:v1")
UNMIRRORED = normalize("other.example/game/server:v1")


@pytest.fixture
async def node_connections() -> AsyncIterator[list[Client]]:
    clients: list[Client] = []
    yield clients
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


@pytest.fixture
def make_node(
    nats_settings: NatsSettings, node_connections: list[Client], prefix: str
) -> Callable[..., object]:
    async def make(node: str, group: str = "", **settings: float) -> Seeding:
        client = await connect(nats_settings, name=node)
        node_connections.append(client)
        options = {"seeds": 1, "lease": 2.0, "deadline": 600.0, "report_ttl": 60.0, **settings}
        config = SeedSettings(mirrored=(MIRRORED,), prefix=prefix, **options)  # type: ignore[arg-type]
        return Seeding(client, config, node, group=lambda: group)

    return make


class Puller:
    """A pull in a task: takes its turn, then 'pulls' until told how it went."""

    def __init__(self, seeding: Seeding, image: ImageRef = IMAGE) -> None:
        self.seeding = seeding
        self.turn: SeedTurn | None = None
        self.started = asyncio.Event()
        self.outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._pull(image))

    async def _pull(self, image: ImageRef) -> None:
        async with self.seeding.turn(image) as turn:
            self.turn = turn
            self.started.set()
            turn.pulled = await self.outcome

    async def finish(self, pulled: bool = True) -> None:
        self.outcome.set_result(pulled)
        await self.task


def seed_waits() -> float:
    return REGISTRY.get_sample_value("image_syncer_syncer_seed_waits_total") or 0.0


def test_which_images_are_mirrored() -> None:
    assert mirrors((MIRRORED,), IMAGE) and not mirrors((MIRRORED,), UNMIRRORED)
    assert mirrors(("*",), UNMIRRORED) and not mirrors((), IMAGE)
    assert mirrors(("docker.io",), normalize("nginx"))
    assert group_token("us-east-1a") == "us-east-1a" and group_token("") == "_"
    assert group_token("a.b/c") == "a_b_c"


async def test_one_seed_pulls_first_and_the_others_follow_from_the_mirror(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b, c = [await make_node(f"node-{n}.example") for n in "abc"]
    seed = Puller(a)
    await asyncio.wait_for(seed.started.wait(), 30)
    assert seed.turn == SeedTurn(mirrored=False, seed=True)
    followers = [Puller(b), Puller(c)]
    await eventually(
        lambda: IMAGE in b.waiting() and IMAGE in c.waiting(), "the others to wait for the seed"
    )
    assert not any(f.started.is_set() for f in followers)
    await seed.finish(pulled=True)
    for follower in followers:
        await asyncio.wait_for(follower.started.wait(), 30)
        # From the mirror: no lease, nothing to report.
        assert follower.turn == SeedTurn(mirrored=True, seed=False)
        await follower.finish()
    assert b.waiting() == c.waiting() == frozenset()


async def test_a_failed_seed_hands_the_lease_to_a_waiting_node(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_node("node-a"), await make_node("node-b")
    seed = Puller(a)
    await asyncio.wait_for(seed.started.wait(), 30)
    waiter = Puller(b)
    await eventually(lambda: IMAGE in b.waiting(), "node-b to wait for the seed")
    # The seed's pull failed: no report, the lease is given back, node-b seeds instead.
    await seed.finish(pulled=False)
    await asyncio.wait_for(waiter.started.wait(), 30)
    assert waiter.turn == SeedTurn(mirrored=False, seed=True)
    await waiter.finish()


async def test_a_dead_seeds_lease_frees_itself(make_node, node_connections) -> None:  # type: ignore[no-untyped-def]
    dead = await make_node("node-dead")
    seed = Puller(dead)
    await asyncio.wait_for(seed.started.wait(), 30)
    survivor = await make_node("node-b")
    waiter = Puller(survivor)
    await eventually(lambda: IMAGE in survivor.waiting(), "node-b to wait for the seed")
    # The seed's node dies: its connection is gone first, so it neither renews nor releases.
    await node_connections[0].close()
    seed.task.cancel()
    await asyncio.wait_for(waiter.started.wait(), 60)
    assert waiter.turn == SeedTurn(mirrored=False, seed=True)
    await waiter.finish()


async def test_a_slow_seed_gets_one_more_seed_after_the_deadline(make_node) -> None:  # type: ignore[no-untyped-def]
    slow = await make_node("node-slow")
    seed = Puller(slow)
    await asyncio.wait_for(seed.started.wait(), 30)
    impatient = await make_node("node-b", deadline=1.0)
    patient = await make_node("node-c")
    second, waiting = Puller(impatient), Puller(patient)
    # The slow seed keeps its lease alive; node-b's own clock passes the deadline: it seeds too.
    await asyncio.wait_for(second.started.wait(), 60)
    assert second.turn == SeedTurn(mirrored=False, seed=True)
    assert not seed.task.done()
    # Bounded: node-c, still within its deadline, waits on; node-b's report lets it go.
    assert IMAGE in patient.waiting() and not waiting.started.is_set()
    await second.finish()
    await asyncio.wait_for(waiting.started.wait(), 30)
    assert waiting.turn == SeedTurn(mirrored=True)
    await waiting.finish()
    await seed.finish()


async def test_seeds_are_counted_per_group(make_node) -> None:  # type: ignore[no-untyped-def]
    east, west = await make_node("node-e", group="zone-east"), await make_node("node-w", "zone-w")
    first, second = Puller(east), Puller(west)
    for puller in (first, second):
        await asyncio.wait_for(puller.started.wait(), 30)
        assert puller.turn == SeedTurn(mirrored=False, seed=True)
    await first.finish()
    await second.finish()


async def test_a_forged_report_is_ignored(make_node, nc: Client, prefix: str) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_node("node-a"), await make_node("node-b")
    seed = Puller(a)
    await asyncio.wait_for(seed.started.wait(), 30)
    waiter = Puller(b)
    await eventually(lambda: IMAGE in b.waiting(), "node-b to wait for the seed")
    # Node x claims, under its own key, that node-a holds another image: not a report of IMAGE.
    bucket = budget_bucket(prefix)
    forged = msgspec.json.encode(SeedReport(image=str(UNMIRRORED), node="node-a"))
    js = nc.jetstream()
    bad = REGISTRY.get_sample_value("image_syncer_syncer_seed_bad_reports_total") or 0.0
    await js.publish(f"$KV.{bucket}.seeded.{image_hash(IMAGE)}.node-x", forged, msg_ttl=60)
    await eventually(
        lambda: (
            (REGISTRY.get_sample_value("image_syncer_syncer_seed_bad_reports_total") or 0) > bad
        ),
        "node-b to read and refuse the forged report",
    )
    assert IMAGE in b.waiting() and not waiter.started.is_set()
    await seed.finish()
    await asyncio.wait_for(waiter.started.wait(), 30)
    assert waiter.turn == SeedTurn(mirrored=True)
    await waiter.finish()


async def test_an_unmirrored_registry_is_not_seeded(make_node) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_node("node-a"), await make_node("node-b")
    waits = seed_waits()
    first, second = Puller(a, UNMIRRORED), Puller(b, UNMIRRORED)
    for puller in (first, second):
        await asyncio.wait_for(puller.started.wait(), 30)
        assert puller.turn == SeedTurn(mirrored=False, seed=False)
    assert seed_waits() == waits
    await first.finish()
    await second.finish()


async def test_without_nats_a_node_pulls_at_once(make_node, node_connections) -> None:  # type: ignore[no-untyped-def]
    a = await make_node("node-a")
    await node_connections[0].close()
    puller = Puller(a)
    await asyncio.wait_for(puller.started.wait(), 30)
    # Seeding saves egress; it never keeps an image from being pulled.
    assert puller.turn == SeedTurn(mirrored=False, seed=False)
    await puller.finish()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"MIRROR": "registry.example/path"}, "mirror 'registry.example/path' is not a registry"),
        ({"MIRROR": "*", "SEED_PER": "not a label"}, "seed-per 'not a label' is not a label key"),
        ({"MIRROR": "*", "SEEDS": "0"}, "SEEDS"),
        ({"SEED_TIMEOUT": "soon"}, "SEED_TIMEOUT"),
        ({"SEED_REPORT_TTL": "0s"}, "--seed-report-ttl must be positive"),
        ({"MAX_MIRROR_PULLS": "-1"}, "MAX_MIRROR_PULLS"),
    ],
)
def test_bad_seeding_settings_are_refused_through_their_environment_twins(
    env: dict[str, str], says: str
) -> None:
    result = subprocess.run(
        # No metrics port: the check that it is free would answer first on a busy machine.
        [sys.executable, "-m", "image_syncer", "syncer", "--metrics-addr", ""],
        env={**os.environ, **env, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert says in result.stderr
