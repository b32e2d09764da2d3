"""Broadcaster high availability: one active replica through a lease in NATS KV, fast takeover.

The lease itself is tested against a real nats-server; the failover with two real
``image-syncer broadcaster --ha`` processes against the fake API server, the active one
SIGKILLed while Fleets change. An observer reads every message as the stream stores it, so the
test can tell that nothing was stored twice and that no object's history went backwards.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from support.fakekube import FakeKube
from support.fakekube.harness import fleet, log_state, wait_converged, with_image
from support.polling import eventually

from broadcaster.lease import LEADER, Lease, lease_key
from broadcaster.runner import run
from broadcaster.settings import Settings
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, stop_process
from ops.logs import fields_of
from ops.serving import Health
from wire.contract import ContractError, Kind, decode_event
from wire.eventlog import LogSettings, stream_name
from wire.natsconn import NatsSettings
from wire.permissions import LEASE_BUCKET, bucket_for

pytestmark = pytest.mark.nats

DEADLINE = 30.0


# --- the lease -------------------------------------------------------------------------------


async def test_one_holder_at_a_time_and_release_hands_over(
    js: JetStreamContext, prefix: str
) -> None:
    a, b = Lease(js, prefix, "a", ttl=5.0), Lease(js, prefix, "b", ttl=5.0)
    await a.open()
    await b.open()
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert await b.holder() == "a"
    assert await a.renew() and await a.renew()
    assert not await b.try_acquire()
    await a.release()
    assert await b.try_acquire(), "a released lease is free at once"
    assert await a.holder() == "b"
    assert a.bucket == bucket_for(LEASE_BUCKET, prefix) and a.key == lease_key(prefix)


async def test_a_dead_holders_lease_expires(js: JetStreamContext, prefix: str) -> None:
    dead, standby = Lease(js, prefix, "dead", ttl=1.0), Lease(js, prefix, "standby", ttl=1.0)
    await dead.open()
    assert await dead.try_acquire()
    # "dead" never renews: the bucket's max age removes its key, and the standby gets it.
    took = await eventually(standby.try_acquire, "the standby to acquire the expired lease")
    print(f"expired lease taken after {took:.2f}s (ttl 1s)")
    assert not await dead.renew(), "the old holder learns it lost the lease"


async def test_a_lease_expiring_while_the_standby_asks_for_it_is_no_error(
    js: JetStreamContext, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py's ``create``, refused because the key exists, reads the key again to see whether
    it is a delete marker; the holder's key expiring in between made ``try_acquire`` raise
    KeyNotFoundError (seen in a full-suite run). The expiry is made to happen right there."""
    holder, standby = Lease(js, prefix, "holder", ttl=60.0), Lease(js, prefix, "standby", ttl=60.0)
    await holder.open()
    assert await holder.try_acquire()
    await standby.open()
    kv = standby._kv
    assert kv is not None
    read_again = kv._get

    async def expired_first(key: str, revision: int | None = None) -> object:
        # What the bucket's max age does: the message gone, no marker left.
        await js.purge_stream(f"KV_{holder.bucket}", subject=f"$KV.{holder.bucket}.{key}")
        return await read_again(key, revision)

    monkeypatch.setattr(kv, "_get", expired_first)
    assert not await standby.try_acquire()
    monkeypatch.undo()
    assert await standby.try_acquire(), "nobody holds it now: the next attempt takes it"


async def test_a_holder_loses_the_lease_on_a_revision_mismatch(
    js: JetStreamContext, prefix: str
) -> None:
    holder, thief = Lease(js, prefix, "holder", ttl=3.0), Lease(js, prefix, "thief", ttl=3.0)
    await holder.open()
    await thief.open()
    assert await holder.try_acquire()
    kv = await js.key_value(holder.bucket)
    await kv.delete(holder.key)
    assert await thief.try_acquire()
    reason = await asyncio.wait_for(holder.hold(), DEADLINE)
    assert reason == "taken over by thief"


async def test_the_buckets_ttl_wins_over_the_flag(js: JetStreamContext, prefix: str) -> None:
    first = Lease(js, prefix, "first", ttl=4.0)
    await first.open()
    second = Lease(js, prefix, "second", ttl=12.0)
    await second.open()
    assert second.ttl == pytest.approx(4.0)


# --- in process: losing the lease stops the watching, regaining it catches up ---------------


@pytest.fixture
def settings(kube: FakeKube, nats_settings: NatsSettings, log_settings: LogSettings) -> Settings:
    return Settings(
        nats=nats_settings,
        log=log_settings,
        kubeconfig=str(kube.kubeconfig),
        metrics_addr=f"127.0.0.1:{free_port()}",
        watch_timeout=30.0,
        backoff_initial=0.05,
        backoff_max=0.5,
        drain_timeout=5.0,
        ha=True,
        lease_ttl=1.5,
        identity="in-process",
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Health]:
    stopping, health = asyncio.Event(), Health()
    health.set("initial-list", False, "not started")
    task = asyncio.create_task(run(settings, stopping, health=health))
    try:
        yield health
    finally:
        stopping.set()
        assert await asyncio.wait_for(task, DEADLINE) == 0


async def test_losing_the_lease_stops_watching_and_regaining_it_catches_up(
    kube: FakeKube,
    settings: Settings,
    js: JetStreamContext,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    kube.create("fleets", fleet("before", "game:1"))
    async with running(settings) as health:
        await eventually(lambda: LEADER._value.get() == 1, "leadership")
        await wait_converged(js, prefix, kube.objects())
        assert kube.open_watches == 1
        # Another replica takes the lease (as if ours had stalled past the ttl).
        kv = await js.key_value(bucket_for(LEASE_BUCKET, prefix))
        await kv.delete(lease_key(prefix))
        thief = Lease(js, prefix, "thief", ttl=settings.lease_ttl)
        await thief.open()
        assert await thief.try_acquire()
        thief_holding = asyncio.create_task(thief.hold())
        await eventually(lambda: LEADER._value.get() == 0, "stepping down")
        await eventually(lambda: not _watch_threads(), "the watch thread to end")
        assert health.ready()[0], "a standby is ready"
        # Changes while another replica (which does nothing here) holds the lease...
        kube.delete("fleets", "default", "before")
        kube.create("fleets", fleet("while-standby"))
        # ...are not published by a standby: nothing of ours watches any more.
        assert set(await log_state(js, prefix)) == {("default", "before")}
        thief_holding.cancel()
        await thief.release()
        # ...are caught up once the lease comes back.
        await eventually(lambda: LEADER._value.get() == 1, "leadership regained")
        await wait_converged(js, prefix, kube.objects())
    lost = [r for r in caplog.records if r.getMessage() == "leadership lost"]
    assert [fields_of(r)["reason"] for r in lost] == ["taken over by thief", "stopping"]
    assert len([r for r in caplog.records if r.getMessage() == "leadership acquired"]) == 2
    assert LEADER._value.get() == 0


def _watch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("watch ")]


async def test_without_ha_no_lease_is_taken(
    kube: FakeKube, settings: Settings, js: JetStreamContext, prefix: str
) -> None:
    async with running(replace(settings, ha=False)):
        kube.create("fleets", fleet("plain"))
        await wait_converged(js, prefix, kube.objects())
    with pytest.raises(nats.js.errors.BucketNotFoundError):
        await js.key_value(bucket_for(LEASE_BUCKET, prefix))


# --- two real processes, the active one SIGKILLed ---------------------------------------------


@dataclass
class Replica:
    name: str
    env: dict[str, str]
    log_file: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        env = {**self.env, "BROADCASTER_IDENTITY": self.name, "METRICS_ADDR": self.addr}
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "image_syncer", "broadcaster", "--ha"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=1) as response:
                return response.status, response.read().decode()
        except OSError:
            return 0, ""

    def leader(self) -> float | None:
        """The replica's image_syncer_broadcaster_leader, None while it does not answer."""
        assert self.process is not None and self.process.poll() is None, self.log()
        for line in self._get("/metrics")[1].splitlines():
            if line.startswith("image_syncer_broadcaster_leader "):
                return float(line.split()[1])
        return None

    def ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self, *, kill: bool = False) -> None:
        stop_process(self.process, kill=kill)


@pytest.fixture
def replicas(
    kube: FakeKube, nats_server: NatsServer, prefix: str, tmp_path: Path
) -> Iterator[list[Replica]]:
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.kubeconfig),
        "NATS_URL": nats_server.url,
        "SUBJECT_PREFIX": prefix,
        "LEASE_TTL": "2s",
        "MAX_BACKOFF": "500ms",
        "DRAIN_TIMEOUT": "5s",
    }
    pair = [Replica(n, env, tmp_path / f"{n}.log").start() for n in ("replica-a", "replica-b")]
    yield pair
    for replica in pair:
        replica.stop(kill=True)


@dataclass(frozen=True)
class Stored:
    seq: int
    key: tuple[str, str]
    event_type: str
    uid: str
    rv: int


@asynccontextmanager
async def observing(js: JetStreamContext, prefix: str) -> AsyncIterator[list[Stored]]:
    """Every message of the Fleet stream, as stored, in order (an ordered push consumer)."""
    seen: list[Stored] = []

    async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
        try:
            event = decode_event(msg.data)
        except ContractError as e:
            raise AssertionError(f"the broadcaster stored an undecodable message: {e}") from e
        meta = event.obj.metadata
        seen.append(
            Stored(
                msg.metadata.sequence.stream,
                (meta.namespace, meta.name),
                event.event_type,
                meta.uid,
                int(meta.resource_version),
            )
        )

    sub = await js.subscribe(
        f"{prefix}.fleet.>",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=on_message,
    )
    try:
        yield seen
    finally:
        await sub.unsubscribe()


class Churn:
    """Creates, updates and deletes a small pool of Fleets, reproducibly."""

    def __init__(self, kube: FakeKube, seed: int) -> None:
        self.kube, self.random, self.changes = kube, random.Random(seed), 0

    def step(self) -> None:
        name = f"fleet-{self.random.randrange(8)}"
        current = self.kube.get("fleets", "default", name)
        if current is None:
            self.kube.create("fleets", fleet(name, f"game:{self.changes}"))
        elif self.random.random() < 0.25:
            self.kube.delete("fleets", "default", name)
        else:
            self.kube.update("fleets", with_image(current, f"game:{self.changes}"))
        self.changes += 1


def assert_exactly_once_and_in_order(seen: list[Stored]) -> None:
    changes = [(s.uid, s.rv, s.event_type) for s in seen]
    duplicated = {c for c in changes if changes.count(c) > 1}
    assert not duplicated, f"stored more than once: {duplicated}"
    assert [s.seq for s in seen] == sorted(s.seq for s in seen)
    newest: dict[tuple[str, str], int] = {}
    for stored in seen:
        # A catch-up tombstone carries the last recorded version: equal, never older.
        assert stored.rv >= newest.get(stored.key, 0), f"{stored} went back in time"
        newest[stored.key] = stored.rv


async def test_the_standby_takes_over_when_the_active_is_killed(
    kube: FakeKube, replicas: list[Replica], js: JetStreamContext, prefix: str
) -> None:
    churn = Churn(kube, seed=7)
    async with observing(js, prefix) as seen:
        await eventually(
            lambda: sorted(r.leader() or 0 for r in replicas) == [0, 1], "one active replica"
        )
        active = next(r for r in replicas if r.leader() == 1)
        standby = next(r for r in replicas if r is not active)
        await eventually(lambda: all(r.ready() for r in replicas), "both replicas ready")
        for _ in range(20):
            churn.step()
        await wait_converged(js, prefix, kube.objects())
        assert kube.open_watches == 1, "only the active replica watches"
        assert "caught up" not in standby.log() and "standing by" in standby.log()

        # Kill the active between changes, and keep changing things until the standby leads.
        for _ in range(5):
            churn.step()
        active.stop(kill=True)

        def leads() -> bool:
            if standby.leader() == 1:
                return True
            churn.step()
            return False

        took = await eventually(leads, standby.log)
        print(f"takeover {took:.2f}s after SIGKILL (lease ttl 2s)")
        for _ in range(20):
            churn.step()
        await wait_converged(js, prefix, kube.objects(), timeout=DEADLINE)
        info = await js.stream_info(stream_name(prefix, Kind.FLEET))
        await eventually(
            lambda: seen and seen[-1].seq >= info.state.last_seq, "the observer to catch up"
        )
    assert "leadership acquired" in standby.log()
    assert_exactly_once_and_in_order(seen)
    assert churn.changes > 45


async def test_sigterm_hands_the_lease_over_at_once(
    kube: FakeKube, replicas: list[Replica], js: JetStreamContext, prefix: str
) -> None:
    await eventually(
        lambda: sorted(r.leader() or 0 for r in replicas) == [0, 1], "one active replica"
    )
    active = next(r for r in replicas if r.leader() == 1)
    standby = next(r for r in replicas if r is not active)
    kube.create("fleets", fleet("handed-over"))
    await wait_converged(js, prefix, kube.objects())
    assert active.process is not None
    active.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(active.process.wait, DEADLINE) == 0, active.log()
    assert 'msg="leadership lost"' in active.log() and "reason=stopping" in active.log()
    await eventually(lambda: standby.leader() == 1, "the standby to lead")
    kube.create("fleets", fleet("after-handover"))
    await wait_converged(js, prefix, kube.objects())
