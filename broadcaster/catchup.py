"""Catch-up: what to publish so the log matches the cluster after a list.

A watch only reports changes from the moment it starts. Whatever happened while the broadcaster
was away (stopped, crashed, or its watch expired with ``410 Gone``) is found by comparing the
freshly listed objects with the newest message the log holds for each object, and only what is
newer than the log (:func:`broadcaster.ordering.newer`) is published:

- listed, not live in the log -> ``added`` (unless the log's tombstone is newer: a stale list);
- listed, live in the log with an older version -> ``updated`` (old = what the log had);
- listed with a version the log already has, or an older one (another broadcaster published
  past our list) -> nothing;
- live in the log, in the watched scope, not listed, and older than the list -> ``deleted``
  (the delete we missed, stamped with the list's resourceVersion: the object was gone by then);
  newer than the list -> nothing: it was created after we listed and our watch will report it.

An object recreated under the same name (new uid) is published as the old one's delete, then
the new one's add. The scope is the watch target's namespace (or all namespaces): objects of
namespaces this process does not watch are not its to delete. Within a scope, an object that no
longer matches the label selector counts as deleted, as it would on a label-selected watch.

Reading the log also repairs it: an object that still has messages older than its newest (a
writer stopped between its ack and its purge) is compacted, so a leftover ``added`` cannot
become the object's state again once the tombstone above it expires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import msgspec
from nats.js import JetStreamContext

from broadcaster import metrics
from broadcaster.ordering import Recorded, newer, observed_at, resource_version
from broadcaster.settings import WatchTarget
from wire.contract import Action, ContractError, EventType, Kind, decode_event
from wire.eventlog import LogSettings, compact_object, last_message, read_log, stream_name

__all__ = ["LogView", "Publication", "key_of", "plan"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
Object = dict[str, Any]


@dataclass(frozen=True)
class Publication:
    type: EventType
    obj: Object
    old: Object | None = None

    @property
    def event_type(self) -> str:
        """The wire form of :attr:`type`, for log lines."""
        return str(self.type)


def key_of(obj: Object) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name", "")


class LogView:
    """The log as catch-up and forwarding read it, one kind at a time, repairing as it reads."""

    def __init__(self, js: JetStreamContext, settings: LogSettings) -> None:
        self.js, self.settings = js, settings

    async def recorded(self, kind: Kind) -> dict[Key, Recorded]:
        """The newest message of every object in the kind's stream, tombstones included."""
        state: dict[Key, Recorded] = {}
        async for message in read_log(self.js, stream_name(self.settings.prefix, kind)):
            parsed = _parse(kind, message.seq, message.subject, message.data)
            if parsed is not None:
                key, recorded = parsed
                before = state.get(key)
                leftovers = 0 if before is None else before.leftovers + 1
                state[key] = replace(recorded, leftovers=leftovers)
        return state

    async def recorded_object(self, kind: Kind, key: Key) -> Recorded | None:
        """The newest message of one object, after compacting whatever is older."""
        message = await last_message(self.js, self.settings, kind, *key)
        if message is None:
            return None
        # Whatever is older than the newest is redundant; usually there is nothing.
        await compact_object(self.js, self.settings, kind, *key, message.seq)
        parsed = _parse(kind, message.seq, message.subject, message.data)
        # An undecodable newest message says nothing about the object, but it is the one a
        # publish must expect, or every retry would conflict with it again.
        return Recorded({}, message.seq) if parsed is None else parsed[1]

    async def compact(self, kind: Kind, key: Key, newest_seq: int) -> None:
        await compact_object(self.js, self.settings, kind, *key, newest_seq)
        log.info(
            "leftover messages purged",
            extra={"kind": str(kind), "object": "/".join(key), "newest_seq": newest_seq},
        )


def _parse(kind: Kind, seq: int, subject: str, data: bytes) -> tuple[Key, Recorded] | None:
    try:
        event = decode_event(data)
        raw = _raw_object(data, event.action)
    except ContractError as e:
        metrics.INVALID_LOG_MESSAGES.labels(kind=str(kind)).inc()
        log.warning(
            "undecodable message in the log, ignored",
            extra={"seq": seq, "subject": subject, "error": str(e)},
        )
        return None
    key = (event.obj.metadata.namespace, event.obj.metadata.name)
    return key, Recorded(raw, seq, deleted=event.action is Action.DELETED)


def _raw_object(data: bytes, action: Action) -> Object:
    # decode_event validated the envelope; the raw dict is what gets re-published, untouched.
    message: Object = msgspec.json.decode(data)["message"]
    obj: Object = message["new_obj"] if action is Action.UPDATED else message
    return obj


def plan(
    target: WatchTarget,
    recorded: dict[Key, Recorded],
    listed: list[Object],
    list_version: str = "",
) -> list[Publication]:
    """The publications that bring the log from ``recorded`` to ``listed``, in a stable order.

    ``list_version`` is the list's resourceVersion: a live object the list lacks is deleted only
    if the log's version of it is not newer than the list.
    """
    kind = target.kind
    added, deleted = EventType(kind, Action.ADDED), EventType(kind, Action.DELETED)
    publications = []
    listed_keys = set()
    for obj in listed:
        key = key_of(obj)
        listed_keys.add(key)
        before = recorded.get(key)
        if not newer(obj, False, before):
            continue
        if before is None or before.deleted:
            publications.append(Publication(added, obj))
        elif _uid(before.obj) != _uid(obj):
            publications.append(Publication(deleted, before.obj))
            publications.append(Publication(added, obj))
        else:
            publications.append(Publication(EventType(kind, Action.UPDATED), obj, before.obj))
    list_rv = int(list_version) if list_version.isdigit() else None
    for key in sorted(recorded):
        before = recorded[key]
        in_scope = target.namespace is None or key[0] == target.namespace
        if before.deleted or not in_scope or key in listed_keys:
            continue
        version = resource_version(before.obj)
        if list_rv is not None and version is not None and version > list_rv:
            continue
        gone = observed_at(before.obj, list_version)
        publications.append(Publication(deleted, gone))
    return publications


def _uid(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("uid", ""))
