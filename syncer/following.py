"""Being told what changed instead of asking: a named push consumer over a few subjects.

A syncer follows two small things besides its Fleet stream: the node-wide images (the
node-images stream) and its replay request (``replay.<node>`` in the status bucket). Asking for
them on a timer costs the cluster a request per node per period forever; a held pull request
costs one per expiry. A push consumer costs nothing while idle: the server delivers the newest
message of each subject once, then every new one, and sends idle heartbeats (server to client,
not client messages) so a lost consumer is noticed.

The consumer is named after the node's durable (``syncer-<node>-images``) and created on
``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``: a node identity never needs the bare
``CONSUMER.CREATE.<stream>`` that ``kv.watch()`` and nats-py's ordered consumers send, and the
server refuses a body whose filter differs from the one in the subject. It is ephemeral: the
server removes it ``inactive`` seconds after nobody listens. Every (re)open creates it afresh,
so it delivers the current messages again: one left by a previous process (or by this one,
before the connection was cut) is waited out rather than deleted, so a node needs no right to
delete consumers. Callers treat a message they already applied as no news.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ops.lifecycle import sleep_unless_stopping
from ops.retry import Backoff
from wire.natsconn import RETRYABLE

__all__ = ["INACTIVE_THRESHOLD", "ConsumerBusy", "ConsumerLost", "PushedSubjects", "follow"]

log = logging.getLogger(__name__)

# Heartbeats missed in a row that mean the consumer (or its server) is gone.
_MISSED_HEARTBEATS = 2
# A consumer nobody listens to any more (its process stopped, its node vanished) goes away
# after this; a reopen waits at most this long (plus a margin) for the previous one to go.
INACTIVE_THRESHOLD = 10.0
_WAIT_OUT_MARGIN = 5.0


class ConsumerBusy(Exception):
    """The consumer of a previous listener did not go away in time; try again later."""


class ConsumerLost(Exception):
    """No message and no heartbeat for two heartbeat periods: the consumer must be re-created."""


class PushedSubjects:
    """The newest message of every subject under ``filter_subject`` of ``stream``, then each new
    one, pushed to this process by the consumer ``name``.

    :meth:`open` (again after :class:`ConsumerLost`), then :meth:`next` until it returns None
    (nothing within the timeout); :attr:`caught_up` says whether the messages that existed at
    :meth:`open` have all been delivered.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        filter_subject: str,
        name: str,
        *,
        heartbeat: float = 5.0,
        inactive: float = INACTIVE_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self.stream = stream
        self.filter_subject = filter_subject
        self.name = name
        self.heartbeat = heartbeat
        self.inactive = inactive
        self._clock = clock
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._last_heard = clock()
        self.caught_up = False

    async def open(self) -> None:
        """(Re)create the consumer; raises NotFoundError when the stream does not exist yet,
        :class:`ConsumerBusy` when a previous one of the same name does not go away."""
        await self.close()
        await self._wait_out_previous()
        nc = self._js._nc
        deliver = nc.new_inbox()
        self._queue = asyncio.Queue()
        # Subscribed before the consumer exists, so its first deliveries cannot be missed.
        self._sub = await nc.subscribe(deliver, cb=self._received)
        info = await self._js.add_consumer(
            self.stream,
            ConsumerConfig(
                name=self.name,
                description="image-syncer: newest of each subject, pushed",
                deliver_subject=deliver,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE,
                filter_subject=self.filter_subject,
                idle_heartbeat=self.heartbeat,
                inactive_threshold=self.inactive,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        self._last_heard = self._clock()
        self.caught_up = not info.num_pending

    async def _wait_out_previous(self) -> None:
        """Until no consumer of this name exists: created over, it would keep its place and
        not deliver the current messages again."""
        deadline = self._clock() + self.inactive + _WAIT_OUT_MARGIN
        while True:
            try:
                await self._js.consumer_info(self.stream, self.name)
            except nats.js.errors.NotFoundError:
                return  # no such consumer (or no such stream: add_consumer will say which)
            if self._clock() > deadline:
                raise ConsumerBusy(f"consumer {self.name} on {self.stream} is still there")
            await asyncio.sleep(1.0)

    @property
    def is_open(self) -> bool:
        return self._sub is not None

    async def _received(self, msg: Msg) -> None:
        self._queue.put_nowait(msg)

    async def next(self, timeout: float) -> Msg | None:
        """The next message, None if none came within ``timeout``; raises :class:`ConsumerLost`."""
        deadline = self._clock() + timeout
        while True:
            msg = self._queued()
            if msg is None:
                silence = self._last_heard + _MISSED_HEARTBEATS * self.heartbeat + 1.0
                if self._clock() > silence:
                    # A busy process may not have read what arrived: one turn of the loop first.
                    await asyncio.sleep(0)
                    if self._queue.empty():
                        raise ConsumerLost(f"consumer {self.name} on {self.stream} went silent")
                    continue
                wait = min(deadline, silence) - self._clock()
                if wait <= 0:
                    return None
                try:
                    msg = await asyncio.wait_for(self._queue.get(), wait)
                except TimeoutError:
                    continue
            self._last_heard = self._clock()
            if JetStreamContext.is_status_msg(msg):
                continue  # an idle heartbeat: the consumer is there
            if not msg.metadata.num_pending:
                self.caught_up = True
            return msg

    def _queued(self) -> Msg | None:
        """What already arrived, before judging silence: heartbeats that waited in the queue
        while this process was busy still say the consumer is there."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


async def follow(
    pushed: PushedSubjects,
    on_message: Callable[[Msg], Awaitable[None]],
    stopping: asyncio.Event,
    *,
    what: str,
    on_caught_up: Callable[[], None] = lambda: None,
    opened: bool = False,
    backoff: Backoff | None = None,
) -> None:
    """Hand every pushed message to ``on_message`` until ``stopping``, re-creating the consumer
    when it is lost and while NATS fails (with backoff: a stream nobody created yet is looked
    for again after 5 s, then ever more rarely, up to 5 minutes). ``opened``: the caller opened
    ``pushed`` already. ``on_caught_up`` is called each time the existing messages are in."""
    backoff = backoff or Backoff(5.0, 300.0)
    failing = False
    try:
        while not stopping.is_set():
            try:
                if not opened:
                    await pushed.open()
                opened = False
                if failing:
                    log.info("following again", extra={"what": what})
                    failing = False
                backoff.reset()
                await _deliver(pushed, on_message, stopping, on_caught_up)
            except ConsumerLost as e:
                log.info("consumer lost, re-creating it", extra={"what": what, "error": str(e)})
                continue
            except ConsumerBusy as e:
                log.info("consumer still in use, retrying", extra={"what": what, "error": str(e)})
            except nats.js.errors.NotFoundError:
                pass  # nothing was ever published there: look again later, quietly
            except RETRYABLE as e:
                if not failing:
                    log.warning(
                        "following failed, retrying", extra={"what": what, "error": repr(e)}
                    )
                failing = True
            await sleep_unless_stopping(stopping, backoff.next_delay())
    finally:
        await pushed.close()


async def _deliver(
    pushed: PushedSubjects,
    on_message: Callable[[Msg], Awaitable[None]],
    stopping: asyncio.Event,
    on_caught_up: Callable[[], None],
) -> None:
    announced = False
    while not stopping.is_set():
        if pushed.caught_up and not announced:
            on_caught_up()
            announced = True
        # Woken by the idle heartbeats anyway; a longer wait costs nothing, a shorter one would
        # wake thousands of simulated nodes (bench/scale) for nothing. Stopping ends the loop
        # through its cancel, or by this timeout if a cancel was lost.
        msg = await pushed.next(timeout=2 * pushed.heartbeat)
        if msg is not None:
            await on_message(msg)
