"""Running a long-lived asyncio process until SIGTERM or SIGINT, then stopping it in one place.

A signal sets the ``stopping`` event; the main coroutine watches it, stops taking work, finishes
what is in flight and returns. A second signal means "now": the main task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

__all__ = ["run_until_signalled"]

log = logging.getLogger(__name__)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run ``main(stopping)`` on a fresh loop; return its exit code (0 for None)."""
    return asyncio.run(_run(main)) or 0


async def _run(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int | None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    task = asyncio.current_task()

    def on_signal(sig: signal.Signals) -> None:
        if stopping.is_set():
            log.warning("second signal, stopping now", extra={"signal": sig.name})
            if task is not None:
                task.cancel()
            return
        log.info("signal received, draining", extra={"signal": sig.name})
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await main(stopping)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
