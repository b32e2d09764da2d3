"""Asking the node's durable for the next event without costing the cluster anything while idle.

A syncer is idle nearly all of its life. A 1 s fetch in a loop is a JetStream request per second
per node, forever: 5,000 requests per second at 5,000 nodes to learn that nothing happened. So
the live loop long-polls: one pull request that the server holds for ``expiry`` (tens of seconds)
and answers with the next message the moment it is stored, so fan-out latency does not suffer.
While it holds the request the server sends an idle heartbeat every ``heartbeat`` seconds.

How a poll ends tells the loop what it needs to know, without any periodic ``consumer_info``:

- :attr:`Poll.MESSAGES`: an event (then :func:`drain` takes whatever else is already waiting, in
  batches, so a burst costs a few requests, not one per event);
- :attr:`Poll.IDLE`: the request expired after heartbeats came: the server and the durable are
  there and nothing happened. Silent, and the next poll starts at once;
- :attr:`Poll.SILENT`: the request expired and not even a heartbeat came: the server restarted,
  the connection moved, or the durable is gone. The caller checks the durable and re-creates it.

Errors the server answers with (a deleted consumer's 409, a closed connection) are raised for
the caller to log and recover from. nats-py raises a plain ``TimeoutError`` (not its own
``nats.errors.TimeoutError``) when a batch fetch sees nothing at all: that is SILENT too, never a
log line of its own.
"""

from __future__ import annotations

import enum
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

__all__ = ["DRAIN_WAIT", "Poll", "drain", "long_poll"]

# How long a drain waits for more of a burst before going back to long polls.
DRAIN_WAIT = 0.05


class Poll(enum.Enum):
    MESSAGES = "messages"
    IDLE = "idle"
    SILENT = "silent"


async def long_poll(sub: Any, *, expiry: float, heartbeat: float) -> tuple[Poll, list[Msg]]:
    """One pull request held by the server for up to ``expiry`` seconds."""
    try:
        msgs: list[Msg] = await sub.fetch(batch=1, timeout=expiry, heartbeat=heartbeat)
    except nats.js.errors.FetchTimeoutError:
        return Poll.IDLE, []
    except (nats.errors.TimeoutError, TimeoutError):
        return Poll.SILENT, []
    return Poll.MESSAGES, msgs


async def drain(sub: Any, batch: int) -> list[Msg]:
    """What is already waiting, up to ``batch`` messages; empty once the burst is over."""
    try:
        msgs: list[Msg] = await sub.fetch(batch=batch, timeout=DRAIN_WAIT)
    except (nats.errors.TimeoutError, TimeoutError):
        return []
    return msgs
