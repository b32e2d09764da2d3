"""Retrying what fails for a while: one backoff policy and one loop that applies it.

Every retry in the project waits the same way: capped exponential delays, jittered so that many
processes retrying against one server spread out instead of arriving in step, and never down to
zero. :class:`Backoff` is the policy, usable with a failure count (the puller keeps one per image)
or as a counter (:meth:`Backoff.next_delay` / :meth:`Backoff.reset`); :func:`retry` is the loop
around one attempt, cut short by the process stopping.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, overload

from ops.lifecycle import sleep_unless_stopping

__all__ = ["Backoff", "retry"]

T = TypeVar("T")

# Past this many doublings every delay is the maximum anyway; bounding the exponent keeps a
# failure count of a long outage from overflowing the float.
_MAX_DOUBLINGS = 64


@dataclass
class Backoff:
    """``minimum * 2**(failures-1)`` capped at ``maximum``, scaled by a jitter in [0.5, 1).

    Half fixed, half random: retries spread out without ever going to zero. ``jitter=False``
    gives the plain doubling (for loops only this process runs, e.g. waiting for a local socket).
    """

    minimum: float
    maximum: float
    jitter: bool = True
    rng: Callable[[], float] = random.random
    failures: int = field(default=0, compare=False)

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (1 for the first)."""
        doublings = min(max(0, failures - 1), _MAX_DOUBLINGS)
        base = min(self.maximum, self.minimum * 2.0**doublings)
        return base * (0.5 + self.rng() / 2) if self.jitter else base

    def next_delay(self) -> float:
        """Count one more failure; the wait before the next attempt."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """After a success: the next failure waits ``minimum`` again."""
        self.failures = 0


OnRetry = Callable[[BaseException, float], object]


def _ignore(error: BaseException, delay: float) -> None:
    pass


@overload
async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff,
    on_retry: OnRetry = ...,
    stopping: None = None,
) -> T: ...


@overload
async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff,
    on_retry: OnRetry = ...,
    stopping: asyncio.Event,
) -> T | None: ...


async def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff,
    on_retry: OnRetry = _ignore,
    stopping: asyncio.Event | None = None,
) -> T | None:
    """``attempt()``'s result, trying again after a backoff each time it raises ``retry_on``.

    ``on_retry(error, delay)`` runs before each wait (a log line, a metric, a readiness check).
    Returns None once ``stopping`` is set (before an attempt or during a wait); without
    ``stopping`` it retries forever. Any other exception propagates at once.
    """
    while stopping is None or not stopping.is_set():
        try:
            return await attempt()
        except retry_on as error:
            delay = backoff.next_delay()
            on_retry(error, delay)
        if stopping is None:
            await asyncio.sleep(delay)
        elif await sleep_unless_stopping(stopping, delay):
            break
    return None
