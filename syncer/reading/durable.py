"""The node's durable pull consumer ``syncer-<node>``: create it, bind to it, keep it there.

It is (re)created to start right after the sequence the node has folded. It is memory-backed
with one replica (thousands of R3 durables are JetStream clustering's known pressure point) and
expires after ``inactive_threshold`` when its node disappears. Whether it still exists is this
module's question; what to do when it is lost is the caller's (:meth:`Durable.recover` calls
``on_lost``): a lost durable may mean a NATS restart or a stream lost and created again, and
only a fold of the whole log tells which sequence to start after. Its pending counts are the
node's lag, published as gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from ops.logs import describe_error
from ops.retry import Backoff, retry
from ops.serving import Health
from syncer import metrics
from syncer.reading.longpoll import Poll, drain, long_poll
from syncer.settings import ConsumerSettings, durable_name
from wire.durables import DurableLimits, durable_config
from wire.natsconn import RETRYABLE, is_connected

__all__ = ["Durable"]

log = logging.getLogger(__name__)

# An R1 consumer whose only server died never answers, not even "not found": when connected and
# this many checks in a row went unanswered, it is treated as gone.
_UNANSWERED_MEANS_GONE = 3


class Durable:
    def __init__(
        self,
        js: JetStreamContext,
        settings: ConsumerSettings,
        *,
        node: str,
        prefix: str,
        stream: str,
        subject: str,
    ) -> None:
        self._js = js
        self._settings = settings
        self._node = node
        self._prefix = prefix
        self.stream = stream
        self.subject = subject
        self.name = durable_name(node)
        self._unanswered = 0  # consecutive unanswered existence checks
        self._sub: Any = None

    def config(self, start_seq: int) -> ConsumerConfig:
        s = self._settings
        limits = DurableLimits(s.ack_wait, s.max_ack_pending, s.inactive_threshold)
        return durable_config(self._node, self._prefix, limits, start_seq)

    async def start(self, after_seq: int) -> None:
        """(Re)create the durable to deliver what comes after ``after_seq``, and bind to it.

        With ``--consumer-provisioned`` (per-node identities) the node may not create it: it binds
        to the one made at its login, and the caller skips what it delivers up to ``after_seq``.
        A missing one is made again at the next login, so the syncer reconnects.
        """
        if self._settings.provisioned:
            await self._bind_provisioned()
            return
        # The start sequence of an existing consumer cannot be changed: replace it.
        try:
            # A consumer whose only server is gone cannot be deleted (the request times out);
            # creating it again places it on a live server.
            with contextlib.suppress(nats.js.errors.NotFoundError, nats.errors.TimeoutError):
                await self._js.delete_consumer(self.stream, self.name)
            await self._js.add_consumer(self.stream, self.config(after_seq + 1))
        except Exception:
            metrics.NATS_ERRORS.labels("consumer_create").inc()
            raise
        await self.unbind()
        self._sub = await self._js.pull_subscribe_bind(durable=self.name, stream=self.stream)
        log.info(
            "consumer ready",
            extra={"consumer": self.name, "stream": self.stream, "start_seq": after_seq + 1},
        )

    async def _bind_provisioned(self) -> None:
        try:
            await self._js.consumer_info(self.stream, self.name)
        except nats.js.errors.NotFoundError:
            metrics.NATS_ERRORS.labels("consumer_missing").inc()
            log.warning(
                "consumer missing, reconnecting so that the login creates it",
                extra={"consumer": self.name, "stream": self.stream},
            )
            await self._js._nc.force_reconnect()
            raise
        await self.unbind()
        self._sub = await self._js.pull_subscribe_bind(durable=self.name, stream=self.stream)
        log.info("consumer bound", extra={"consumer": self.name, "stream": self.stream})

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        return list(await self._sub.fetch(batch=batch, timeout=timeout))

    async def long_poll(self, expiry: float, heartbeat: float) -> tuple[Poll, list[Msg]]:
        """The next event, held for by the server up to ``expiry`` (see syncer.reading.longpoll)."""
        return await long_poll(self._sub, expiry=expiry, heartbeat=heartbeat)

    async def waiting(self, batch: int) -> list[Msg]:
        """The events already waiting behind the one a long poll brought, up to ``batch``."""
        return await drain(self._sub, batch)

    async def unbind(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def recover(
        self, health: Health, stopping: asyncio.Event, on_lost: Callable[[], Awaitable[None]]
    ) -> None:
        """Make sure the durable exists, calling ``on_lost`` (which must start it again) when
        it does not; retried until NATS answers and ``on_lost`` succeeds, or the syncer stops."""

        async def attempt() -> bool:
            if not await self._exists():
                log.warning("consumer lost", extra={"consumer": self.name, "stream": self.stream})
                await on_lost()
            health.set("nats", True)
            return True

        def report(error: BaseException, delay: float) -> None:
            # Waiting for NATS is not a stuck loop: a pod restart would not help.
            health.beat("consumer", allowance=60.0)
            health.set("nats", False, describe_error(error))
            log.warning("consumer unavailable", extra={"error": repr(error), "retry_in": delay})

        await retry(
            attempt,
            retry_on=RETRYABLE,
            backoff=Backoff(0.5, 10.0, jitter=False),
            on_retry=report,
            stopping=stopping,
        )

    async def _exists(self) -> bool:
        """Whether the durable is there; raises while that cannot be told yet."""
        try:
            await self._js.consumer_info(self.stream, self.name)
        except nats.js.errors.NotFoundError:
            return False
        except nats.errors.TimeoutError:
            self._unanswered += 1
            if self._unanswered < _UNANSWERED_MEANS_GONE or not is_connected(self._js):
                raise
            self._unanswered = 0
            return False
        self._unanswered = 0
        return True

    async def refresh_lag(self) -> None:
        """Publish the durable's num_pending / num_ack_pending as gauges."""
        try:
            info = await self._js.consumer_info(self.stream, self.name)
        except Exception:
            metrics.NATS_ERRORS.labels("consumer_info").inc()
            raise
        metrics.CONSUMER_LAG.set(info.num_pending or 0)
        metrics.CONSUMER_ACK_PENDING.set(info.num_ack_pending or 0)
