"""Asking the node's durable for the next event without costing the cluster anything while idle.

A syncer is idle nearly all of its life. A 1 s fetch in a loop is a JetStream request per second
per node, forever: 5,000 requests per second at 5,000 nodes to learn that nothing happened. So
the live loop long-polls: one pull request that the server holds for ``expiry`` (tens of seconds)
and answers with the next message the moment it is stored, so fan-out latency does not suffer.
While it holds the request the server sends an idle heartbeat every ``heartbeat`` seconds.

How a poll ends tells the loop what it needs to know, without any periodic ``consumer_info``:

- :attr:`Poll.MESSAGES`: an event (then :func:`drain` takes whatever else is already waiting, in
  batches, so a burst costs a few requests, not one per event);
- :attr:`Poll.IDLE`: the request expired (the server said so): the server and the durable are
  there and nothing happened. Silent, and the next poll starts at once;
- :attr:`Poll.SILENT`: two heartbeats in a row did not come: the server restarted, the
  connection moved, or the durable was deleted (the server drops the requests it held for it
  without a word). The caller checks the durable and re-creates it.

nats-py's ``fetch`` swallows heartbeats and notices their absence only when the whole expiry has
passed, so the pull request is made here on the subscription nats-py bound (its request subject
and inbox), and every status the server sends is looked at. Other statuses (a 409) are raised as
the server's error for the caller to log and recover from.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StatusCode

__all__ = ["DRAIN_WAIT", "Poll", "drain", "long_poll"]

# How long a drain waits for more of a burst before going back to long polls.
DRAIN_WAIT = 0.05
# Heartbeats missed in a row that make a poll SILENT.
_MISSED_HEARTBEATS = 2


class Poll(enum.Enum):
    MESSAGES = "messages"
    IDLE = "idle"
    SILENT = "silent"


async def long_poll(sub: Any, *, expiry: float, heartbeat: float) -> tuple[Poll, list[Msg]]:
    """One pull request held by the server for up to ``expiry`` seconds.

    ``sub`` is nats-py's pull subscription (``JetStreamContext.pull_subscribe_bind``).
    """
    queued = _queued(sub)
    if queued is not None:  # delivered to a request an earlier, cancelled poll made
        return Poll.MESSAGES, [queued]
    request = {
        "batch": 1,
        # A little under the expiry, as nats-py does, so the server answers before we give up.
        "expires": int(expiry * 1e9) - 100_000,
        "idle_heartbeat": int(heartbeat * 1e9),
    }
    await sub._nc.publish(sub._nms, json.dumps(request).encode(), sub._deliver)
    while True:
        try:
            msg = await sub._sub.next_msg(timeout=_MISSED_HEARTBEATS * heartbeat + 0.5)
        except (nats.errors.TimeoutError, TimeoutError):
            return Poll.SILENT, []
        status = JetStreamContext.is_status_msg(msg)
        if not status:
            return Poll.MESSAGES, [msg]
        if status == StatusCode.CONTROL_MESSAGE:
            continue  # the idle heartbeat: the server still holds the request
        if status in (StatusCode.REQUEST_TIMEOUT, StatusCode.NO_MESSAGES):
            return Poll.IDLE, []
        raise nats.js.errors.APIError.from_msg(msg)


def _queued(sub: Any) -> Msg | None:
    """A message already in the subscription's queue; status messages there are stale."""
    queue = sub._sub._pending_queue
    while not queue.empty():
        msg: Msg = queue.get_nowait()
        sub._sub._pending_size -= len(msg.data)
        if not JetStreamContext.is_status_msg(msg):
            return msg
    return None


async def drain(sub: Any, batch: int) -> list[Msg]:
    """What is already waiting, up to ``batch`` messages; empty once the burst is over."""
    try:
        msgs: list[Msg] = await sub.fetch(batch=batch, timeout=DRAIN_WAIT)
    except (nats.errors.TimeoutError, TimeoutError):
        return []
    return msgs
