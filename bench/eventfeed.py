"""Synthetic Fleet events, encoded exactly as the broadcaster encodes them, published in bulk.

A benchmark needs tens of thousands to a million events in the log before it measures anything.
``wire.eventlog.publish_event`` awaits each ack in turn, which on two cores would take longer than
the benchmark itself; here the very same subject, envelope bytes and headers are published with
the acks collected asynchronously on one inbox, with a bounded window of unacked messages, which
is how JetStream's own async publish works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from image_syncer.fleets import build_fleet
from wire.contract import HEADER_UID, encode_event, event_headers, subject_for

__all__ = ["Outgoing", "added_events", "fleet_name", "fleets", "publish_bulk", "update_events"]

_UPDATED = "fleet.events.updated"


@dataclass(frozen=True)
class Outgoing:
    """One event ready for the wire."""

    subject: str
    payload: bytes
    headers: dict[str, str]


def fleet_name(i: int) -> str:
    return f"fleet-{i:07d}"


def fleets(count: int, image_of: Any = None, *, version: int = 1) -> list[dict[str, Any]]:
    """``count`` Fleets; ``image_of(i)`` names Fleet i's image (distinct per Fleet by default)."""
    image_of = image_of or (lambda i: f"registry.example/game-{i}:v1")
    return [
        build_fleet(fleet_name(i), [image_of(i)], resource_version=str(version))
        for i in range(count)
    ]


def encode(prefix: str, event_type: str, obj: dict[str, Any], old: Any = None) -> Outgoing:
    meta = obj["metadata"]
    return Outgoing(
        subject_for(prefix, event_type, meta["namespace"], meta["name"]),
        encode_event(event_type, obj, old),
        event_headers(event_type, obj),
    )


def added_events(prefix: str, objs: Iterable[dict[str, Any]]) -> Iterator[Outgoing]:
    for obj in objs:
        yield encode(prefix, "fleet.events.added", obj)


def update_events(
    prefix: str, objs: list[dict[str, Any]], total: int, *, first_version: int = 2
) -> Iterator[Outgoing]:
    """``total`` updates spread round-robin over ``objs``, each a new resourceVersion."""
    # Each Fleet's payload is encoded once and its resourceVersion patched per event: the bytes
    # are identical to encode_event's (same keys, same order), at a fraction of the CPU.
    templates = []
    for obj in objs:
        new = {**obj, "metadata": {**obj["metadata"], "resourceVersion": "@RV@"}}
        templates.append(encode(prefix, _UPDATED, new, obj))
    for n in range(total):
        template = templates[n % len(templates)]
        rv = str(first_version + n // len(templates))
        uid = template.headers[HEADER_UID]
        headers = event_headers(_UPDATED, {"metadata": {"uid": uid, "resourceVersion": rv}})
        yield Outgoing(template.subject, template.payload.replace(b"@RV@", rv.encode()), headers)


async def publish_bulk(
    nc: Client, events: Iterable[Outgoing], *, window: int = 2000, timeout: float = 60.0
) -> int:
    """Publish ``events`` with at most ``window`` unacked; return how many the stream stored.

    Raises if any publish is refused (an error ack) or acks stop coming for ``timeout`` s.
    """
    inbox = nc.new_inbox()
    slots = asyncio.Semaphore(window)
    stored = 0
    errors: list[str] = []

    async def on_ack(msg: Msg) -> None:
        nonlocal stored
        if b'"error"' in msg.data:
            errors.append(msg.data.decode(errors="replace"))
        elif b'"duplicate"' not in msg.data:
            stored += 1
        slots.release()

    sub = await nc.subscribe(inbox + ".*", cb=on_ack)
    try:
        sent = 0
        for n, event in enumerate(events):
            await _acquire(slots, timeout)
            await nc.publish(
                event.subject, event.payload, reply=f"{inbox}.{n}", headers=event.headers
            )
            sent += 1
        for _ in range(window):
            await _acquire(slots, timeout)
    finally:
        await sub.unsubscribe()
    if errors:
        raise RuntimeError(f"{len(errors)} of {sent} publishes refused, first: {errors[0]}")
    return stored


async def _acquire(slots: asyncio.Semaphore, timeout: float) -> None:
    if not slots.locked():
        await slots.acquire()
        return
    try:
        await asyncio.wait_for(slots.acquire(), timeout)
    except TimeoutError:
        raise RuntimeError(f"no publish ack for {timeout:g}s") from None
