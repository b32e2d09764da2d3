"""Waiting in tests for something to become true: one poll loop with one deadline.

Tests never sleep to synchronise; they poll a check until it holds, and fail with what they were
waiting for when the deadline passes. The deadline is generous on purpose (the machine running
the suite may be loaded): it only bounds how long a broken test takes to fail, never how fast a
passing one is.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

__all__ = ["DEADLINE", "eventually"]

DEADLINE = 60.0


async def eventually(
    check: Callable[[], Any],
    what: str | Callable[[], str],
    timeout: float = DEADLINE,
    *,
    interval: float = 0.05,
    in_thread: bool = False,
    tolerate: tuple[type[Exception], ...] = (),
) -> float:
    """Poll ``check`` until it returns something truthy; return how long that took.

    ``check`` may be plain or return an awaitable. ``in_thread`` runs a plain check in a worker
    thread (for checks that block: a subprocess, a file read while the loop must keep serving).
    Exceptions in ``tolerate`` (a component restarting under the check) count as "not yet"; the
    last one is named if the deadline passes, and so is ``what`` (called, if it is a function, to
    say what was last seen).
    """
    start = time.monotonic()
    last_error: Exception | None = None
    while True:
        try:
            result = await asyncio.to_thread(check) if in_thread else check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return time.monotonic() - start
        except AssertionError:
            raise
        except tolerate as e:
            last_error = e
        if time.monotonic() - start > timeout:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            said = what() if callable(what) else what
            raise AssertionError(f"not true within {timeout:.0f}s: {said}{detail}")
        await asyncio.sleep(interval)
