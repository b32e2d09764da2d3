"""Which of two observations of one object (one namespace/name) is newer.

Several observers feed the log: this broadcaster's list and watch, another broadcaster's (during
a rolling update, or a deposed HA leader), and the log itself. One that is behind must never
overwrite one that is ahead, so every decision to publish asks :func:`newer` first.

- Same uid: the higher resourceVersion wins, and a delete wins a tie (it is the delete of that
  version). A tombstone is not final: an object that leaves a label selector is reported deleted
  and comes back, same uid, at a higher resourceVersion. The catch-up stamps the deletes it
  infers with the list's resourceVersion (the object was gone by then), so a list older than
  that cannot bring the object back. A resourceVersion that is not a number (an API server not
  backed by etcd may use opaque ones) falls back to ``generation``; when nothing can tell, a
  delete wins over a live object, a tombstone stays, and a live observation is trusted.
- Different uids under one name: the object created later is newer. Both resourceVersions come
  from the same etcd revision counter, and the later object was created after the earlier one
  was deleted, so its every resourceVersion is higher; without numbers, ``creationTimestamp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Recorded", "newer", "observed_at", "resource_version"]

Object = dict[str, Any]


@dataclass(frozen=True)
class Recorded:
    """The newest message the log holds for one object: the object, its sequence, its action."""

    obj: Object
    seq: int
    deleted: bool = False
    # Older messages of the object still in the log (a purge that did not happen).
    leftovers: int = 0


def _meta(obj: Object) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def resource_version(obj: Object) -> int | None:
    """The resourceVersion as a number, None when it is opaque."""
    value = str(_meta(obj).get("resourceVersion", ""))
    return int(value) if value.isdigit() else None


def newer(obj: Object, deleted: bool, than: Recorded | None) -> bool:
    """Whether ``obj`` (deleted or not) says something newer than ``than`` about the object."""
    if than is None:
        return True
    uid, recorded_uid = _meta(obj).get("uid", ""), _meta(than.obj).get("uid", "")
    if uid and uid == recorded_uid:
        order = _compare_numbers(resource_version(obj), resource_version(than.obj))
        if order is None:
            if than.deleted or deleted:
                return not than.deleted
            return _compare_versions(obj, than.obj) > 0
        if than.deleted:
            return order > 0 and not deleted
        return order > 0 or (order == 0 and deleted)
    order = _compare_numbers(resource_version(obj), resource_version(than.obj))
    if order is None:
        created, recorded_created = (
            str(_meta(o).get("creationTimestamp") or "") for o in (obj, than.obj)
        )
        if created and recorded_created and created != recorded_created:
            # RFC 3339 in UTC with second resolution, as the API server writes it: sortable.
            order = 1 if created > recorded_created else -1
    return order is None or order > 0


def _compare_versions(obj: Object, recorded: Object) -> int:
    order = _compare_numbers(resource_version(obj), resource_version(recorded))
    if order is not None:
        return order
    generation, recorded_generation = (_meta(o).get("generation") for o in (obj, recorded))
    if isinstance(generation, int) and isinstance(recorded_generation, int):
        order = _compare_numbers(generation, recorded_generation)
        if order:
            return order
    same = _meta(obj).get("resourceVersion") == _meta(recorded).get("resourceVersion")
    return 0 if same else 1


def _compare_numbers(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return None
    return (a > b) - (a < b)


def observed_at(obj: Object, list_version: str) -> Object:
    """``obj`` as a delete inferred from a list at ``list_version``: gone by that version."""
    listed, own = (int(list_version) if list_version.isdigit() else None), resource_version(obj)
    if listed is None or own is None or listed <= own:
        return obj
    return {**obj, "metadata": {**_meta(obj), "resourceVersion": str(listed)}}
