"""Appending one event to the log until JetStream settles it: stored, refused for good, or stale.

An event is done only when JetStream has answered. Transient failures (NATS down, a timeout, the
stream missing after a server lost its store) are retried forever with capped exponential backoff
and jitter; retries are safe because the deterministic Nats-Msg-Id makes a re-sent event a
duplicate that JetStream stores once. Two answers end the attempt instead:

- a conflict: the object's newest message is no longer the one the caller expected, so the event
  was computed from a stale view; the caller reads the log again and decides (see forwarding);
- a permanent refusal, which no retry can change: an object the wire contract refuses, one too
  large for a message even trimmed, a JetStream API error of the 4xx kind (bad request, over the
  stream's max message size). One log line, one metric, and the forwarder moves on, so one bad
  object never holds back the events behind it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from broadcaster import metrics
from broadcaster.settings import Settings
from ops.logs import describe_error
from ops.retry import Backoff, retry
from wire.contract import ContractError, EventType
from wire.eventlog import (
    EventTooLarge,
    LogConflict,
    ensure_node_images_stream,
    ensure_streams,
    publish_event,
)
from wire.natsconn import RETRYABLE

__all__ = ["Outcome", "Published", "Publisher", "refusal"]

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # stored before (a retry, another broadcaster): nothing new
    CONFLICT = "conflict"  # the log moved on since the caller looked: not stored
    REFUSED = "refused"  # permanently: logged and counted, not stored


@dataclass(frozen=True)
class Published:
    outcome: Outcome
    seq: int = 0


def refusal(error: BaseException) -> str | None:
    """Why ``error`` can never succeed on a retry (a metric label), None when it may."""
    if isinstance(error, ContractError):
        return "contract"
    if isinstance(error, EventTooLarge | nats.errors.MaxPayloadError):
        return "too_large"
    if isinstance(error, nats.js.errors.APIError):
        # 4xx: the request itself is wrong (over the stream's max message size, a header the
        # stream does not allow). 404 is left to retry: the stream may come back.
        code = error.code or 0
        if 400 <= code < 500 and code != 404:
            return "rejected"
    return None


class _Refused(Exception):
    """Raised out of an attempt that no retry can make succeed; ``reason`` is the label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Publisher:
    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        *,
        streams_recreated: Callable[[], None] | None = None,
    ) -> None:
        self.js = js
        self.settings = settings
        # Told after the streams were re-created: the sidecar's image must be published again.
        self.streams_recreated = streams_recreated

    async def publish(
        self,
        event_type: EventType | str,
        obj: dict[str, Any],
        old: dict[str, Any] | None = None,
        *,
        expected_last_seq: int | None = None,
    ) -> Published:
        """Publish until JetStream settles it; ``expected_last_seq`` as in publish_event."""
        event_type = EventType.of(event_type)
        streams_lost = False

        async def attempt() -> PubAck:
            if streams_lost:
                await self._recreate_streams()
            try:
                return await publish_event(
                    self.js,
                    self.settings.log,
                    event_type,
                    obj,
                    old,
                    timeout=self.settings.publish_timeout,
                    expected_last_seq=expected_last_seq,
                )
            except (ContractError, EventTooLarge, *RETRYABLE) as e:
                reason = refusal(e)
                if reason is not None:
                    raise _Refused(reason) from e
                raise

        def report(error: BaseException, delay: float) -> None:
            nonlocal streams_lost
            # No responders on a stream subject: the stream is gone (a server lost its store).
            # nats-py reports that as NoStreamResponseError ("no response from stream").
            streams_lost = isinstance(
                error, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError
            )
            metrics.PUBLISH_ERRORS.inc()
            log.warning(
                "publish failed, retrying",
                extra={
                    "event_type": str(event_type),
                    "object": _name(obj),
                    "error": describe_error(error),
                    "retry_in": round(delay, 2),
                },
            )

        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        try:
            ack = await retry(attempt, retry_on=RETRYABLE, backoff=backoff, on_retry=report)
        except LogConflict:
            metrics.PUBLISH_CONFLICTS.inc()
            return Published(Outcome.CONFLICT)
        except _Refused as e:
            self._refused(event_type, obj, e.reason, e.__cause__ or e)
            return Published(Outcome.REFUSED)
        metrics.EVENTS_PUBLISHED.labels(event_type=str(event_type)).inc()
        metrics.LAST_PUBLISH.set_to_current_time()
        log.info(
            "event published",
            extra={
                "event_type": str(event_type),
                "object": _name(obj),
                "resource_version": (obj.get("metadata") or {}).get("resourceVersion", ""),
                "seq": ack.seq,
                "duplicate": bool(ack.duplicate),
            },
        )
        return Published(Outcome.DUPLICATE if ack.duplicate else Outcome.STORED, ack.seq)

    def _refused(
        self, event_type: EventType, obj: dict[str, Any], reason: str, error: BaseException
    ) -> None:
        kind = event_type.kind
        if reason == "contract":
            metrics.INVALID_OBJECTS.labels(kind=str(kind)).inc()
        metrics.EVENTS_REFUSED.labels(kind=str(kind), reason=reason).inc()
        log.error(
            "event refused for good, skipped",
            extra={
                "event_type": str(event_type),
                "object": _name(obj),
                "reason": reason,
                "error": describe_error(error),
            },
        )

    async def _recreate_streams(self) -> None:
        """All of the broadcaster's streams: a server that lost its store lost them all."""
        try:
            await ensure_streams(self.js, self.settings.log, self.settings.kinds)
            if self.settings.sidecar.namespace:
                await ensure_node_images_stream(self.js, self.settings.log)
        except RETRYABLE as e:
            log.warning("cannot recreate streams", extra={"error": describe_error(e)})
            return
        if self.streams_recreated is not None:
            self.streams_recreated()


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}"
