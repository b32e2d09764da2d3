"""Catch-up: what to publish so the log matches the cluster after a list.

A watch only reports changes from the moment it starts. Whatever happened while the broadcaster
was away (stopped, crashed, or its watch expired with ``410 Gone``) is found by comparing the
freshly listed objects with the last state the log records for each object:

- listed, not live in the log -> ``added``;
- listed, live in the log with another resourceVersion -> ``updated`` (old = what the log had);
- live in the log, in the watched scope, not listed -> ``deleted`` (the delete we missed);
- same uid and resourceVersion -> nothing: the log already says it.

An object recreated under the same name (new uid) is published as the old one's delete, then
the new one's add. The scope is the watch target's namespace (or all namespaces): objects of
namespaces this process does not watch are not its to delete. Within a scope, an object that no
longer matches the label selector counts as deleted, as it would on a label-selected watch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.js import JetStreamContext

from broadcaster import metrics
from broadcaster.settings import WatchTarget
from wire.contract import Action, ContractError, Kind, decode_event
from wire.eventlog import LogSettings, read_log, stream_name

__all__ = ["Publication", "plan", "recorded_state"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
Object = dict[str, Any]


@dataclass(frozen=True)
class Publication:
    event_type: str
    obj: Object
    old: Object | None = None


def key_of(obj: Object) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name", "")


def _meta(obj: Object, field: str) -> str:
    return str((obj.get("metadata") or {}).get(field, ""))


async def recorded_state(
    js: JetStreamContext, settings: LogSettings, kind: Kind
) -> dict[Key, Object]:
    """Fold the kind's stream into the last recorded object per live key (deleted keys left out)."""
    state: dict[Key, Object | None] = {}
    async for message in read_log(js, stream_name(settings.prefix, kind)):
        try:
            event = decode_event(message.data)
            raw = _raw_object(message.data, event.action)
        except ContractError as e:
            metrics.INVALID_LOG_MESSAGES.labels(kind=str(kind)).inc()
            log.warning(
                "undecodable message in the log, ignored",
                extra={"seq": message.seq, "subject": message.subject, "error": str(e)},
            )
            continue
        key = (event.obj.metadata.namespace, event.obj.metadata.name)
        state[key] = None if event.action is Action.DELETED else raw
    return {key: obj for key, obj in state.items() if obj is not None}


def _raw_object(data: bytes, action: Action) -> Object:
    # decode_event validated the envelope; the raw dict is what gets re-published, untouched.
    message: Object = msgspec.json.decode(data)["message"]
    obj: Object = message["new_obj"] if action is Action.UPDATED else message
    return obj


def plan(
    target: WatchTarget, recorded: dict[Key, Object], listed: list[Object]
) -> list[Publication]:
    """The publications that bring the log from ``recorded`` to ``listed``, in a stable order."""
    kind = target.kind
    publications = []
    listed_keys = set()
    for obj in listed:
        key = key_of(obj)
        listed_keys.add(key)
        before = recorded.get(key)
        if before is None:
            publications.append(Publication(f"{kind}.events.added", obj))
        elif _meta(before, "uid") != _meta(obj, "uid"):
            publications.append(Publication(f"{kind}.events.deleted", before))
            publications.append(Publication(f"{kind}.events.added", obj))
        elif _meta(before, "resourceVersion") != _meta(obj, "resourceVersion"):
            publications.append(Publication(f"{kind}.events.updated", obj, before))
    for key in sorted(recorded):
        in_scope = target.namespace is None or key[0] == target.namespace
        if in_scope and key not in listed_keys:
            publications.append(Publication(f"{kind}.events.deleted", recorded[key]))
    return publications
