"""Appending one event to the log until JetStream acks it: retry with backoff, never drop.

An event is done only when the ack is back. Transient failures (NATS down, a timeout, the stream
missing after a server lost its store) are retried forever with capped exponential backoff and
jitter; only an object the wire contract refuses is given up on, with one log line and a metric,
because retrying cannot make it valid. Retries are safe: the deterministic Nats-Msg-Id makes a
re-sent event a duplicate that JetStream stores once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from broadcaster import metrics
from broadcaster.settings import Settings
from wire.contract import ContractError, parse_event_type
from wire.eventlog import ensure_streams, publish_event

__all__ = ["Backoff", "Publisher"]

log = logging.getLogger(__name__)

# What a lost connection, a restarting server or a missing stream look like from nats-py.
TRANSIENT = (nats.errors.Error, TimeoutError, OSError)


class Backoff:
    """Capped exponential backoff with jitter; :meth:`reset` after a success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        # Half fixed, half random: spread retries of many processes without ever going to zero.
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self._next = self.initial


class Publisher:
    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.settings = settings

    async def publish(
        self, event_type: str, obj: dict[str, Any], old: dict[str, Any] | None = None
    ) -> bool:
        """Publish until acked; False when the contract refuses the object (logged, counted)."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while True:
            try:
                ack = await publish_event(
                    self.js,
                    self.settings.log,
                    event_type,
                    obj,
                    old,
                    timeout=self.settings.publish_timeout,
                )
            except ContractError as e:
                kind, _ = parse_event_type(event_type)
                metrics.INVALID_OBJECTS.labels(kind=str(kind)).inc()
                log.error(
                    "object refused by the wire contract, skipped",
                    extra={"event_type": event_type, "object": _name(obj), "error": str(e)},
                )
                return False
            except TRANSIENT as e:
                metrics.PUBLISH_ERRORS.inc()
                delay = backoff.next_delay()
                log.warning(
                    "publish failed, retrying",
                    extra={
                        "event_type": event_type,
                        "object": _name(obj),
                        "error": _describe(e),
                        "retry_in": round(delay, 2),
                    },
                )
                await asyncio.sleep(delay)
                if isinstance(e, nats.errors.NoRespondersError):
                    await self._recreate_streams()
                continue
            metrics.EVENTS_PUBLISHED.labels(event_type=event_type).inc()
            metrics.LAST_PUBLISH.set_to_current_time()
            log.info(
                "event published",
                extra={
                    "event_type": event_type,
                    "object": _name(obj),
                    "resource_version": (obj.get("metadata") or {}).get("resourceVersion", ""),
                    "seq": ack.seq,
                    "duplicate": bool(ack.duplicate),
                },
            )
            return True

    async def _recreate_streams(self) -> None:
        # No responders on a stream subject: the stream is gone (a server lost its store).
        try:
            await ensure_streams(self.js, self.settings.log, self.settings.kinds)
        except TRANSIENT as e:
            log.warning("cannot recreate streams", extra={"error": _describe(e)})


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def _describe(error: BaseException) -> str:
    return (str(error) or type(error).__name__).replace("\n", " ")
