"""The puller's narrow logic against an in-memory stand-in for the CRI client.

Concurrency, de-duplication, timeouts and backoff are about scheduling, not the runtime, so a
stand-in whose pulls finish when the test says so makes them exact. The real runtime is
exercised by tests/integration/test_syncer.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from support.polling import eventually

from ops.retry import Backoff
from syncer.folding.references import ImageRef, normalize
from syncer.pulling.puller import Puller, PullResult
from syncer.runtime.cri import CriError, RegistryAuth, RuntimeUnavailable


class StandInCri:
    """Pulls block until released; failures are scripted per image."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.calls: list[tuple[str, RegistryAuth | None]] = []
        self.running = 0
        self.peak = 0
        self.fail: dict[str, list[BaseException]] = defaultdict(list)

    async def pull_image(
        self, ref: str, auth: RegistryAuth | None = None, *, timeout: float
    ) -> str:
        self.calls.append((ref, auth))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.fail[ref]:
                raise self.fail[ref].pop(0)
            await self.gates[ref].wait()
            return f"sha256:{len(self.calls):064d}"
        finally:
            self.running -= 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(cri: StandInCri, **kw: object) -> tuple[Puller, list[PullResult], Clock]:
    results: list[PullResult] = []
    clock = Clock()
    options: dict[str, Any] = {
        "max_parallel": 2,
        "pull_timeout": 30.0,
        "backoff": Backoff(1.0, 60.0, rng=lambda: 1.0),
        "on_result": results.append,
        "clock": clock,
        **kw,
    }
    return Puller(cri, **options), results, clock  # type: ignore[arg-type]


async def until(check: Callable[[], object], what: str) -> None:
    # Only the loop's own tasks must run for the state to change: poll without sleeping.
    await eventually(check, what, interval=0)


IMG = [normalize(f"127.0.0.1:5000/img{i}:v1") for i in range(5)]


async def test_one_pull_per_image_however_many_ask() -> None:
    cri = StandInCri()
    puller, results, _ = make(cri)
    futures = [puller.ensure(IMG[0]) for _ in range(5)]
    await until(lambda: cri.calls, "pull started")
    cri.gates[str(IMG[0])].set()
    outcomes = await asyncio.gather(*futures)
    assert [c[0] for c in cri.calls] == [str(IMG[0])]
    assert all(o.ok for o in outcomes)
    assert len(results) == 1  # reported (and so logged) once


async def test_pool_is_bounded_and_a_slow_image_does_not_block_others() -> None:
    cri = StandInCri()
    puller, _, _ = make(cri, max_parallel=2)
    slow = puller.ensure(IMG[0])
    others = [puller.ensure(image) for image in IMG[1:4]]
    await until(lambda: cri.running == 2, "two pulls running")
    for image in IMG[1:4]:
        cri.gates[str(image)].set()
    done = await asyncio.gather(*others)
    assert all(o.ok for o in done)
    assert not slow.done()
    assert cri.peak == 2
    cri.gates[str(IMG[0])].set()
    assert (await slow).ok


async def test_timeout_fails_the_pull_and_starts_backoff() -> None:
    cri = StandInCri()
    puller, results, _ = make(cri, pull_timeout=0.05)
    outcome = await puller.ensure(IMG[0])  # never released
    assert not outcome.ok and "timed out" in outcome.error
    assert outcome.retry_in == 1.0
    assert puller.backoff_left(IMG[0]) == 1.0
    assert results == [outcome]


async def test_backoff_grows_defers_then_allows_retry() -> None:
    cri = StandInCri()
    cri.fail[str(IMG[0])] = [CriError("401 Unauthorized"), CriError("401 Unauthorized")]
    puller, _, clock = make(cri)
    first = await puller.ensure(IMG[0])
    assert not first.ok and first.retry_in == 1.0
    deferred = await puller.ensure(IMG[0])
    assert deferred.deferred and len(cri.calls) == 1
    clock.now += 1.0
    second = await puller.ensure(IMG[0])
    assert second.retry_in == 2.0  # exponential
    clock.now += 2.0
    cri.gates[str(IMG[0])].set()
    assert (await puller.ensure(IMG[0])).ok
    assert puller.backoff_left(IMG[0]) == 0


async def test_runtime_unavailable_is_transient_without_backoff() -> None:
    cri = StandInCri()
    cri.fail[str(IMG[0])] = [RuntimeUnavailable("socket absent")]
    puller, _, _ = make(cri)
    outcome = await puller.ensure(IMG[0])
    assert outcome.transient and not outcome.ok
    assert puller.backoff_left(IMG[0]) == 0


def test_backoff_jitter_and_cap() -> None:
    backoff = Backoff(1.0, 10.0, rng=lambda: 0.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5, 9)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


async def test_credentials_are_tried_in_turn() -> None:
    cri = StandInCri()
    image = IMG[0]
    cri.fail[str(image)] = [CriError("401 Unauthorized")]
    cri.gates[str(image)].set()
    wrong, right = RegistryAuth(username="old"), RegistryAuth(username="new")
    puller, _, _ = make(cri, auth_for=lambda _: [wrong, right])
    assert (await puller.ensure(image)).ok
    assert [auth for _, auth in cri.calls] == [wrong, right]


async def test_close_lets_running_pulls_finish_and_queued_give_up() -> None:
    cri = StandInCri()
    puller, _, _ = make(cri, max_parallel=1)
    running = puller.ensure(IMG[0])
    queued = puller.ensure(IMG[1])
    await until(lambda: cri.running == 1, "first pull running")
    closing = asyncio.create_task(puller.close(patience=60.0))
    await asyncio.sleep(0)
    assert not closing.done()
    cri.gates[str(IMG[0])].set()
    await closing
    assert (await running).ok
    assert (await queued).deferred
    assert [c[0] for c in cri.calls] == [str(IMG[0])]
    assert puller.ensure(IMG[2]).result().deferred


async def test_close_cancels_a_pull_still_running_after_its_patience() -> None:
    cri = StandInCri()
    puller, _, _ = make(cri, max_parallel=1)
    hung = puller.ensure(IMG[0])  # its gate never opens: a registry that never answers
    queued = puller.ensure(IMG[1])
    await until(lambda: cri.running == 1, "first pull running")

    abandoned = await puller.close(patience=0.01)

    assert abandoned == [IMG[0]]
    assert (await hung).deferred and (await hung).error == "stopping"
    assert (await queued).deferred
    assert puller.inflight == 0


@pytest.mark.parametrize("image", [ImageRef("127.0.0.1:5000/x", "v1")])
async def test_pull_uses_the_normalized_reference(image: ImageRef) -> None:
    cri = StandInCri()
    cri.gates[str(image)].set()
    puller, _, _ = make(cri)
    await puller.ensure(image)
    assert cri.calls[0][0] == "127.0.0.1:5000/x:v1"


async def test_the_before_hook_runs_before_the_runtime_pulls_and_cannot_stop_it() -> None:
    cri = StandInCri()
    seen: list[tuple[str, int]] = []

    async def before(image: ImageRef) -> None:
        seen.append((str(image), len(cri.calls)))  # how many pulls had started by then
        raise RuntimeError("bookkeeping broke")

    puller, _, _ = make(cri, before=before)
    cri.gates[str(IMG[0])].set()
    outcome = await puller.ensure(IMG[0])
    assert seen == [(str(IMG[0]), 0)]
    assert outcome.ok and [c[0] for c in cri.calls] == [str(IMG[0])]
