"""Replaying the whole Fleet log into a desired state: at start, on request, and to refold.

The whole compacted Fleet stream is read with an ordered ephemeral consumer and folded, so the
desired state equals the fold of the whole log whatever happened while the syncer was down;
compaction bounds this by the number of live Fleets. The live consumer then starts right after
the :class:`LogPosition` the replay returns: a sequence *and* the stream it belongs to (its
creation time), because a stream lost and created again restarts its sequences at 1 and a
sequence means nothing in another incarnation of the stream. At start the replay is retried
until it succeeds (the stream may not exist yet, NATS may be away), with ``replay`` readiness
false and saying why meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import nats.js.errors
from nats.js import JetStreamContext

from ops.retry import Backoff, retry
from ops.serving import Health
from syncer import metrics
from syncer.folding.desired import DesiredState
from syncer.folding.transitions import fold
from wire.contract import ContractError, decode_event
from wire.eventlog import read_log
from wire.natsconn import RETRYABLE

__all__ = ["LogPosition", "replay_log", "replay_until_done"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogPosition:
    """How far a fold went: ``seq`` of the stream incarnation created at ``stream_created``."""

    seq: int = 0
    stream_created: datetime | None = None


async def replay_log(
    js: JetStreamContext,
    stream: str,
    subject: str,
    desired: DesiredState,
    *,
    quiet: bool = False,
) -> LogPosition:
    """Fold every event of ``stream`` into ``desired``; the position of its last message.

    ``quiet`` folds without a line per Fleet (a refold reports what changed instead).
    """
    try:
        return await _replay(js, stream, subject, desired, quiet)
    except Exception:
        metrics.NATS_ERRORS.labels("replay").inc()
        raise


async def _replay(
    js: JetStreamContext, stream: str, subject: str, desired: DesiredState, quiet: bool
) -> LogPosition:
    info = await js.stream_info(stream)
    count = 0
    last_seq = 0
    async for stored in read_log(js, stream, subject=subject):
        count += 1
        last_seq = max(last_seq, stored.seq)
        try:
            event = decode_event(stored.data)
        except ContractError as e:
            log.warning(
                "skipping malformed event",
                extra={"seq": stored.seq, "subject": stored.subject, "reason": str(e)},
            )
            continue
        if quiet:
            desired.apply(event, stored.seq)
        else:
            fold(desired, event, stored.seq, replayed=True)
    last_seq = max(last_seq, info.state.last_seq)
    log.log(
        logging.DEBUG if quiet else logging.INFO,
        "replay done",
        extra={
            "events": count,
            "fleets": len(desired),
            "excluded": len(desired.excluded()),
            "last_seq": last_seq,
        },
    )
    return LogPosition(last_seq, info.created)


async def replay_until_done(
    replay: Callable[[], Awaitable[object]], stream: str, health: Health, stopping: asyncio.Event
) -> bool:
    """Run ``replay`` until it succeeds (True) or the syncer stops (False)."""

    def report(error: BaseException, delay: float) -> None:
        if isinstance(error, nats.js.errors.NotFoundError):
            reason = f"stream {stream} does not exist yet"
        else:
            reason = f"replay failed: {error!r}"
        health.set("replay", False, reason)
        log.warning("waiting to replay the log", extra={"reason": reason, "retry_in": delay})

    async def attempt() -> bool:
        await replay()
        return True

    done = await retry(
        attempt,
        retry_on=RETRYABLE,
        backoff=Backoff(0.5, 10.0, jitter=False),
        on_retry=report,
        stopping=stopping,
    )
    if not done:
        return False
    health.set("replay", True)
    return True
