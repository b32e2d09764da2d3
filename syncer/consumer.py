"""The node's view of the event log: a full replay at start, then a per-node durable consumer.

Replay. On start the whole compacted Fleet stream is read with an ordered ephemeral consumer and
folded, so the desired state equals the fold of the whole log whatever happened while the syncer
was down; compaction bounds this by the number of live Fleets.

Live. Then the node's durable pull consumer ``syncer-<node>`` is (re)created to start right
after the replayed sequence. It is memory-backed with one replica (thousands of R3 durables are
JetStream clustering's known pressure point) and expires after ``inactive_threshold`` when its
node disappears. If it is lost (a NATS restart drops memory consumers) it is re-created after the
last folded sequence, so nothing is skipped.

Acknowledgement. An event is acked once its images are present, or once a failed pull is
recorded and left to the retry machinery (backoff plus the periodic reconcile); a long pull keeps
its message alive with in-progress signals. An unreachable runtime naks it with a delay.
Messages that cannot be used are terminated with one log line and a metric; nothing stops the
loop.

Rebuild. An operator's replay request (``image-syncer replay --node``) folds the whole log again
into a fresh state while the live loop is paused, swaps it in, and restarts the durable after the
replayed sequence: whatever happened to the stream behind the syncer's back, the node's desired
state is the fold of the log as it is now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ops.serving import Health
from syncer import metrics
from syncer.desired import Applied, DesiredState, Outcome, Transition
from syncer.puller import Puller
from syncer.reconcile import Reconciler
from syncer.references import ImageRef
from syncer.settings import SyncerSettings
from wire.contract import ContractError, Event, Kind, decode_event, subject_filter
from wire.eventlog import read_log, stream_name

__all__ = ["FleetConsumer", "report_transition"]

log = logging.getLogger(__name__)

_FETCH_TIMEOUT = 1.0
# Check that the durable still exists after this many idle fetches (a NATS restart drops it);
# rare enough that thousands of idle nodes do not load the JetStream API.
_IDLE_CHECK_EVERY = 30
_UNANSWERED_MEANS_GONE = 3
_NAK_DELAY = 5.0


class FleetConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        settings: SyncerSettings,
        desired: DesiredState,
        reconciler: Reconciler,
        puller: Puller,
        health: Health,
        *,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._js = js
        self._on_change = on_change
        # Held by the live loop around each fetch and by a rebuild, so they never interleave.
        self._pause = asyncio.Lock()
        self._settings = settings
        self._desired = desired
        self._reconciler = reconciler
        self._puller = puller
        self._health = health
        self.stream = stream_name(settings.subject_prefix, Kind.FLEET)
        self.subject = subject_filter(settings.subject_prefix, Kind.FLEET)
        self.durable = settings.durable
        self.last_seq = 0
        self._settling: set[asyncio.Task[None]] = set()
        self._unanswered = 0  # consecutive unanswered durable checks
        self._sub: Any = None

    # --- replay ---------------------------------------------------------------------------

    async def replay(self, into: DesiredState | None = None) -> int:
        """Fold the whole log (into ``into``, default the live state); return the sequence the
        live consumer must start after."""
        desired = self._desired if into is None else into
        try:
            return await self._replay(desired)
        except Exception:
            metrics.NATS_ERRORS.labels("replay").inc()
            raise

    async def _replay(self, desired: DesiredState) -> int:
        info = await self._js.stream_info(self.stream)
        count = 0
        async for stored in read_log(self._js, self.stream, subject=self.subject):
            count += 1
            self.last_seq = max(self.last_seq, stored.seq)
            try:
                event = decode_event(stored.data)
            except ContractError as e:
                log.warning(
                    "skipping malformed event",
                    extra={"seq": stored.seq, "subject": stored.subject, "reason": str(e)},
                )
                continue
            applied = desired.apply(event, stored.seq)
            if applied.outcome is not Outcome.DELETED:  # a replayed tombstone is old news
                self._report(applied, event)
        self.last_seq = max(self.last_seq, info.state.last_seq)
        log.info(
            "replay done",
            extra={
                "events": count,
                "fleets": len(desired),
                "excluded": len(desired.excluded()),
                "last_seq": self.last_seq,
            },
        )
        return self.last_seq

    async def rebuild(self) -> None:
        """Replay the whole log into a fresh state, swap it in, restart the durable after it.

        The live loop is paused meanwhile; an error leaves the current state untouched.
        """
        async with self._pause:
            fresh = DesiredState(admit=self._desired.admit)
            before = len(self._desired)
            await self.replay(into=fresh)
            self._desired.replace_with(fresh)
            await self.start_durable()
        log.info(
            "desired state rebuilt from the whole log",
            extra={"fleets_before": before, "fleets": len(self._desired)},
        )
        self._on_change()

    async def refresh_lag(self) -> None:
        """Publish the durable's num_pending / num_ack_pending as gauges."""
        try:
            info = await self._js.consumer_info(self.stream, self.durable)
        except Exception:
            metrics.NATS_ERRORS.labels("consumer_info").inc()
            raise
        metrics.CONSUMER_LAG.set(info.num_pending or 0)
        metrics.CONSUMER_ACK_PENDING.set(info.num_ack_pending or 0)

    # --- the durable ----------------------------------------------------------------------

    def consumer_config(self, start_seq: int) -> ConsumerConfig:
        s = self._settings
        return ConsumerConfig(
            durable_name=self.durable,
            description=f"image-syncer node {s.node_name}",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start_seq),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait,
            max_deliver=-1,
            max_ack_pending=s.max_ack_pending,
            filter_subject=self.subject,
            inactive_threshold=s.inactive_threshold,
            mem_storage=True,
            num_replicas=1,
        )

    async def start_durable(self) -> None:
        """(Re)create the durable to deliver what comes after ``last_seq``, and bind to it."""
        # The start sequence of an existing consumer cannot be changed: replace it.
        try:
            # A consumer whose only server is gone cannot be deleted (the request times out);
            # creating it again places it on a live server.
            with contextlib.suppress(nats.js.errors.NotFoundError, nats.errors.TimeoutError):
                await self._js.delete_consumer(self.stream, self.durable)
            await self._js.add_consumer(self.stream, self.consumer_config(self.last_seq + 1))
        except Exception:
            metrics.NATS_ERRORS.labels("consumer_create").inc()
            raise
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._sub = await self._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        log.info(
            "consumer ready",
            extra={"consumer": self.durable, "stream": self.stream, "start_seq": self.last_seq + 1},
        )

    async def _durable_exists(self) -> bool:
        """Whether the durable is there; raises while that cannot be told yet.

        An R1 consumer whose only server died never answers, not even "not found": when we are
        connected and three checks in a row went unanswered, it is treated as gone.
        """
        try:
            await self._js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            return False
        except nats.errors.TimeoutError:
            self._unanswered += 1
            if self._unanswered < _UNANSWERED_MEANS_GONE or not self._js._nc.is_connected:
                raise
            self._unanswered = 0
            return False
        self._unanswered = 0
        return True

    async def _recover(self, stopping: asyncio.Event) -> None:
        delay = 0.5
        while not stopping.is_set():
            try:
                if not await self._durable_exists():
                    log.warning("consumer lost, re-creating", extra={"consumer": self.durable})
                    await self.start_durable()
                self._health.set("nats", True)
                return
            except (nats.errors.Error, TimeoutError, OSError) as e:
                # Waiting for NATS is not a stuck loop: a pod restart would not help.
                self._health.beat("consumer", allowance=60.0)
                self._health.set("nats", False, str(e) or type(e).__name__)
                log.warning("consumer unavailable", extra={"error": repr(e), "retry_in": delay})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                delay = min(delay * 2, 10.0)

    # --- live -----------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and handle events until ``stopping``; then wait for the events being settled."""
        idle = 0
        batch = min(64, self._settings.max_ack_pending)
        while not stopping.is_set():
            self._health.beat("consumer", allowance=60.0)
            async with self._pause:
                idle = await self._fetch_once(batch, idle, stopping)
        self._health.forget("consumer")

    async def _fetch_once(self, batch: int, idle: int, stopping: asyncio.Event) -> int:
        try:
            messages = await self._sub.fetch(batch=batch, timeout=_FETCH_TIMEOUT)
        except nats.errors.TimeoutError:
            idle += 1
            if idle % _IDLE_CHECK_EVERY == 0:
                await self._recover(stopping)
            return idle
        except Exception as e:
            metrics.NATS_ERRORS.labels("fetch").inc()
            log.warning("fetch failed", extra={"error": repr(e), "consumer": self.durable})
            await self._recover(stopping)
            return idle
        for msg in messages:
            await self.dispatch(msg)
        return 0

    async def drain(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def dispatch(self, msg: Msg) -> None:
        """Fold one message in delivery order; ack it at once when its images are all present.

        Only an event that needs pulls gets a task of its own (settled in the background, so a
        slow pull never holds up the events behind it); the common case, images already on the
        node, costs no task at all.
        """
        try:
            event = decode_event(msg.data)
        except ContractError as e:
            self._terminate(msg, "malformed", str(e))
            return
        seq = msg.metadata.sequence.stream
        self.last_seq = max(self.last_seq, seq)
        applied = self._desired.apply(event, seq)
        self._report(applied, event)
        self._on_change()
        if applied.outcome is Outcome.NOT_A_FLEET:
            self._terminate(msg, "not_a_fleet", f"{event.event_type} on the Fleet stream")
            return
        if applied.outcome is not Outcome.APPLIED:
            result = "stale" if applied.outcome is Outcome.STALE else "acked"
            await self._ack(msg, event.event_type, result)
            return
        missing = self._missing(applied)
        if not missing:
            await self._ack(msg, event.event_type, "acked")
            return
        self._spawn(self._settle(msg, event, missing))

    def _missing(self, applied: Applied) -> list[ImageRef]:
        """The event's images the node lacks; the present ones get the seed's log line."""
        missing = []
        for image in sorted(applied.images):
            if self._reconciler.is_present(image):
                log.info(
                    "image already present", extra={"fleet": applied.fleet, "image": str(image)}
                )
                self._reconciler.mark_reported(applied.fleet, image)
            else:
                missing.append(image)
        return missing

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, msg: Msg, event: Event, missing: list[ImageRef]) -> None:
        pulls = [self._puller.ensure(image) for image in missing]
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        try:
            results = await asyncio.gather(*(asyncio.shield(p) for p in pulls))
        finally:
            heartbeat.cancel()
        retry = [r for r in results if r.transient or r.error == "stopping"]
        if retry:
            await self._nak(msg, event.event_type, 0.0 if retry[0].deferred else _NAK_DELAY)
        else:
            # Failures are logged by the puller's result handler and retried by the reconcile.
            await self._ack(msg, event.event_type, "acked")

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(1.0, self._settings.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

    async def _ack(self, msg: Msg, event_type: str, result: str) -> None:
        try:
            await msg.ack()
        except nats.errors.Error as e:
            # Redelivered later and folded again: harmless, the fold is idempotent.
            metrics.NATS_ERRORS.labels("ack").inc()
            log.warning("ack failed", extra={"error": repr(e)})
            result = "ack_failed"
        metrics.EVENTS.labels(event_type, result).inc()

    async def _nak(self, msg: Msg, event_type: str, delay: float) -> None:
        try:
            await msg.nak(delay=delay or None)
        except nats.errors.Error:
            metrics.NATS_ERRORS.labels("nak").inc()
        metrics.EVENTS.labels(event_type, "nakked").inc()

    def _terminate(self, msg: Msg, reason: str, detail: str) -> None:
        seq = msg.metadata.sequence.stream if msg.reply else None
        log.warning(
            "message terminated",
            extra={"reason": reason, "detail": detail, "subject": msg.subject, "seq": seq},
        )
        metrics.TERMINATED.labels(reason).inc()
        metrics.EVENTS.labels("unknown", "terminated").inc()

        async def term() -> None:
            with contextlib.suppress(nats.errors.Error):
                await msg.term()

        self._spawn(term())

    def _report(self, applied: Applied, event: Event) -> None:
        if applied.transition is not None:
            report_transition(applied.transition)
        for skipped in applied.skipped:
            log.warning(
                "invalid image reference",
                extra={
                    "fleet": applied.fleet,
                    "container": skipped.container,
                    "image": skipped.image,
                    "reason": skipped.reason,
                },
            )
        if applied.outcome is Outcome.DELETED:
            log.info("fleet deleted", extra={"fleet": applied.fleet})
        elif applied.outcome is Outcome.NO_IMAGES:
            log.warning("fleet has no images", extra={"fleet": applied.fleet})
        elif applied.outcome is Outcome.NOT_A_FLEET:
            log.warning(
                "not a fleet, skipped", extra={"object": applied.fleet, "type": event.event_type}
            )


def report_transition(change: Transition) -> None:
    """One line per change of a Fleet's admission on this node."""
    if change.admitted:
        log.info("fleet included", extra={"fleet": change.fleet, "reason": change.reason})
    else:
        log.info(
            "fleet excluded, treated as deleted on this node",
            extra={"fleet": change.fleet, "reason": change.reason},
        )
