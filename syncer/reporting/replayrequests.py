"""Honouring an operator's replay requests in the running syncer.

A request found at start is honoured by the start-up replay itself (the log is read whole
anyway) and completed once that replay is done; one that arrives while the syncer runs makes the
consumer rebuild the desired state from the whole log. The id of the request honoured last is
part of the node's status, so ``image-syncer replay`` can tell when its request was done. The KV
mechanics (where requests wait, how they are completed) are :mod:`syncer.reporting.replaykv`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext

from syncer import metrics
from syncer.reporting.replaykv import (
    PendingReplay,
    complete_replay,
    pending_replay,
    watch_replay_requests,
)
from wire.nodestatus import StatusSettings

__all__ = ["ReplayRequests"]

log = logging.getLogger(__name__)


class ReplayRequests:
    def __init__(
        self,
        js: JetStreamContext,
        node: str,
        settings: StatusSettings,
        *,
        rebuild: Callable[[], Awaitable[None]],
        on_rebuilt: Callable[[], None] = lambda: None,
    ) -> None:
        self._js = js
        self._node = node
        self._settings = settings
        self._rebuild = rebuild
        self._on_rebuilt = on_rebuilt
        self._at_start: PendingReplay | None = None
        self.honoured = ""  # the id of the request honoured last

    async def find_pending(self) -> None:
        """Before the start-up replay: note a request waiting for this node, if any."""
        try:
            self._at_start = await pending_replay(self._js, self._node, settings=self._settings)
        except Exception as e:
            # The start-up replay happens anyway; only the request's bookkeeping is lost.
            metrics.NATS_ERRORS.labels("replay_request").inc()
            log.warning("cannot read replay requests", extra={"error": repr(e)})
            return
        if self._at_start is not None:
            log.info(
                "replay requested, honoured by the start-up replay",
                extra={"node": self._node, "request": self._at_start.request.id},
            )

    async def complete_pending(self) -> None:
        """After the start-up replay: the request found before it is done."""
        if self._at_start is None:
            return
        self.honoured = self._at_start.request.id
        try:
            await complete_replay(self._js, self._node, self._at_start, settings=self._settings)
        except Exception as e:
            metrics.NATS_ERRORS.labels("replay_request").inc()
            log.warning("cannot complete the replay request", extra={"error": repr(e)})

    async def watch(self, stopping: asyncio.Event) -> None:
        """Rebuild on every new request until ``stopping``."""
        ignore = [self._at_start.request.id] if self._at_start is not None else []
        await watch_replay_requests(
            self._js,
            self._node,
            self._on_request,
            stopping=stopping,
            settings=self._settings,
            ignore=ignore,
        )

    async def _on_request(self, pending: PendingReplay) -> None:
        log.info(
            "replaying the whole log on request",
            extra={"node": self._node, "request": pending.request.id},
        )
        await self._rebuild()
        metrics.REPLAYS.labels("request").inc()
        self.honoured = pending.request.id
        self._on_rebuilt()
