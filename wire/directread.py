"""Reading a stream or a bucket with batched direct gets: no consumer, nothing left behind.

A node identity may create no consumer (:mod:`wire.permissions`: a consumer's config can name any
deliver subject, and the server stores a push delivery into whatever stream captures it), so
whatever a node reads in whole (the Fleet log at replay, the node images, its own ledger keys)
goes through ``$JS.API.DIRECT.GET.<stream>``: one request answers up to ``batch`` messages from a
start sequence, filtered by subject, then a ``204`` end-of-batch status; the reader asks again
after the last sequence until the server says nothing is left. The answers travel back to the
requester only (JetStream lives in its own account, see :mod:`wire.permissions`). The stream must
allow direct gets (every image-syncer stream and bucket does).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

__all__ = ["DirectMessage", "read_direct", "read_keys", "read_last"]

_END_OF_BATCH = "204"
_NOT_FOUND = "404"
# Headers the server adds to each answer (not the stored message's own).
_SERVER_HEADERS = frozenset(
    {
        "Nats-Stream",
        "Nats-Subject",
        "Nats-Sequence",
        "Nats-Time-Stamp",
        "Nats-Num-Pending",
        "Nats-Last-Sequence",
        "Nats-UpTo-Sequence",
    }
)


@dataclass(frozen=True)
class DirectMessage:
    """One stored message: its sequence, subject, server time, data and its own headers."""

    seq: int
    subject: str
    time: datetime | None
    data: bytes
    headers: dict[str, str]


def _client(js: JetStreamContext) -> Client:
    nc: Client = js._nc  # nats-py keeps the connection there and offers no accessor
    return nc


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        # RFC 3339 with nanoseconds; Python keeps microseconds.
        head, _, rest = text.partition(".")
        fraction = "".join(c for c in rest if c.isdigit())[:6]
        zone = rest[len(rest.rstrip("Z")) :] or "+00:00"
        return datetime.fromisoformat(f"{head}.{fraction or '0'}{zone.replace('Z', '+00:00')}")
    except ValueError:
        return None


async def read_direct(
    js: JetStreamContext,
    stream: str,
    *,
    subject: str = ">",
    start_seq: int = 1,
    batch: int = 1000,
    timeout: float = 5.0,
) -> AsyncIterator[DirectMessage]:
    """Yield the messages of ``stream`` matching ``subject`` from ``start_seq``, in order.

    Raises ``nats.js.errors.NotFoundError`` when the stream does not exist and
    ``nats.errors.TimeoutError`` when the server stops answering.
    """
    seq = max(1, start_seq)
    while True:
        got = 0
        request = {"seq": seq, "next_by_subj": subject, "batch": batch}
        # Closed with this generator: a reader that stops early leaves no subscription behind.
        async with contextlib.aclosing(_answers(js, stream, request, timeout)) as answers:
            async for message in answers:
                got += 1
                seq = message.seq
                yield message
        if got < batch:
            return
        seq += 1


async def read_last(
    js: JetStreamContext, stream: str, subject: str, *, batch: int = 1000, timeout: float = 5.0
) -> list[DirectMessage]:
    """The newest message of each subject of ``stream`` matching ``subject`` (a wildcard
    filter), in sequence order, at most ``batch``: one request, however long the history.

    Raises as :func:`read_direct` does.
    """
    request = {"multi_last": [subject], "batch": batch}
    return [message async for message in _answers(js, stream, request, timeout)]


async def _answers(
    js: JetStreamContext, stream: str, request: dict[str, object], timeout: float
) -> AsyncGenerator[DirectMessage]:
    """One batched direct get: its messages, until the server's end of batch (or nothing)."""
    nc = _client(js)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    got = 0
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except nats.errors.TimeoutError:
                if got == 0:
                    await js.stream_info(stream)  # NotFoundError when it is gone
                raise
            headers = dict(msg.headers or {})
            status = headers.get("Status")
            if status in (_END_OF_BATCH, _NOT_FOUND):
                return  # the batch is complete, or nothing (more) matches
            if status:
                raise nats.js.errors.APIError(
                    code=int(status), description=headers.get("Description", "")
                )
            got += 1
            yield DirectMessage(
                seq=int(headers.get("Nats-Sequence", "0")),
                subject=headers.get("Nats-Subject", ""),
                time=_time(headers.get("Nats-Time-Stamp")),
                data=msg.data,
                headers={k: v for k, v in headers.items() if k not in _SERVER_HEADERS},
            )
    finally:
        await _unsubscribe(sub)


async def _unsubscribe(sub: Subscription) -> None:
    with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
        await sub.unsubscribe()


async def read_keys(
    js: JetStreamContext, bucket: str, key_filter: str, *, timeout: float = 5.0
) -> dict[str, DirectMessage]:
    """The current value of every key of ``bucket`` matching ``key_filter`` (deleted keys
    left out): what a KV watch's initial values give, without a consumer."""
    prefix = f"$KV.{bucket}."
    found: dict[str, DirectMessage] = {}
    async for message in read_direct(
        js, f"KV_{bucket}", subject=prefix + key_filter, timeout=timeout
    ):
        key = message.subject.removeprefix(prefix)
        if message.headers.get("KV-Operation") in ("DEL", "PURGE"):
            found.pop(key, None)
        else:
            found[key] = message
    return found
