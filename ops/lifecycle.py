"""Running a long-lived asyncio process until SIGTERM or SIGINT, and waiting without outliving it.

A signal sets the ``stopping`` event; the main coroutine watches it, stops taking work, finishes
what is in flight and returns. A second signal means "now": the main task is cancelled, and
cancelled again until it is over (so no cleanup step it is in can hold it up), and the process
exits 0 without a traceback: an operator asked for it, nothing failed. A stop has a
:class:`Deadline`; each step takes what is left of it, or a bound of its own.

Every loop of the processes waits through the helpers here, so that none of them keeps a
stopping process alive for a whole period: :func:`sleep_unless_stopping` for a loop's pause,
:func:`wait_any` for a pause that something else may cut short too (a poke, a kick), and
:func:`until_stopping` for one piece of work that stopping abandons (connecting, acquiring), and
:func:`every` for a periodic chore (refresh a gauge, look at a connection). What is left when
the main coroutine is done goes through :func:`cancel_and_wait`, which gives up after a while.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

__all__ = [
    "Deadline",
    "cancel_and_wait",
    "every",
    "run_until_signalled",
    "sleep_unless_stopping",
    "until_stopping",
    "wait_any",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# After a second signal, the main task is cancelled again this often until it is over.
_RECANCEL = 0.1
# How long what a second signal left running gets to end once cancelled.
_LEFTOVER_PATIENCE = 1.0


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run ``main(stopping)`` on a fresh loop; return its exit code (0 for None)."""
    return asyncio.run(_run(main)) or 0


async def _run(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int | None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    task = asyncio.current_task()
    assert task is not None
    hurried = over = False

    def hurry() -> None:
        # One cancel can be swallowed (see cancel_and_wait): repeat until the task is over.
        if not task.done() and not over:
            task.cancel()
            loop.call_later(_RECANCEL, hurry)

    def on_signal(sig: signal.Signals) -> None:
        nonlocal hurried
        if stopping.is_set():
            if not hurried:
                hurried = True
                log.warning("second signal, stopping now", extra={"signal": sig.name})
                hurry()
            return
        log.info("signal received, draining", extra={"signal": sig.name})
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await main(stopping)
    except asyncio.CancelledError:
        if not hurried:
            raise
        over = True
        task.uncancel()
        await _end_the_rest(_LEFTOVER_PATIENCE)
        log.info("stopped at once")
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _end_the_rest(patience: float) -> None:
    """Cancel what a hurried stop left running and let it end here, errors and all.

    Left to ``asyncio.run``, each leftover's last exception (e.g. nats-py's ConnectionClosedError
    from a long poll cancelled as the connection closed) is logged as an unhandled error with its
    traceback, on a stop that went as asked."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for leftover in rest:
        leftover.cancel()
    if rest:
        await asyncio.wait(rest, timeout=patience)
    for leftover in rest:
        if leftover.done() and not leftover.cancelled():
            leftover.exception()  # retrieved: not "never retrieved" either


class Deadline:
    """The end of a stop: how long each of its steps may still take."""

    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.at = self._loop.time() + max(0.0, seconds)

    def left(self) -> float:
        return max(0.0, self.at - self._loop.time())

    def patience(self, bound: float) -> float:
        """What is left, but at most ``bound``."""
        return min(self.left(), bound)


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return once any of ``events`` is set, or after ``timeout`` seconds (None: no limit)."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def sleep_unless_stopping(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``, cut short by ``stopping``; True when the process is stopping."""
    await wait_any(stopping, timeout=max(0.0, seconds))
    return stopping.is_set()


async def until_stopping(stopping: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if ``stopping`` is set first (``work`` is then cancelled).

    An error ``work`` raises after it was cancelled is of no interest to a stopping process and
    is dropped; one raised before comes through.
    """
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()  # the caller was cancelled: its work must not run on without it
        raise
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # asyncio.wait, not ``await task``: a cancel of the caller meanwhile must come through.
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()  # taken and dropped
    return None


async def cancel_and_wait(
    tasks: Collection[asyncio.Task[Any]], *, patience: float, again_every: float = 1.0
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait at most ``patience`` seconds for them; return those still running.

    The cancel is repeated every ``again_every`` seconds, because one can be lost: Python
    3.11's ``asyncio.wait_for`` (nats-py waits through it) returns the awaited result instead
    of raising when the result arrives at the moment of the cancel, and a loop that only ends
    when cancelled then runs on. Their errors are taken (a stopping process does not report
    them), so none is logged later as "never retrieved".
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(again_every, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
    return pending


async def every(
    period: float, stopping: asyncio.Event, tick: Callable[[], Awaitable[object]]
) -> None:
    """Run ``tick`` now and then every ``period`` seconds until ``stopping``.

    A failing tick is logged at debug level and retried next period: a chore reports its own
    failures (a metric, a readiness check), and its loop must outlive them.
    """
    while not stopping.is_set():
        try:
            await tick()
        except Exception as e:
            log.debug("periodic task failed", extra={"task": _name_of(tick), "error": repr(e)})
        if await sleep_unless_stopping(stopping, period):
            return


def _name_of(tick: Callable[..., object]) -> str:
    return getattr(tick, "__qualname__", None) or repr(tick)
