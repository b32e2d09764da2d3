"""Remove one taint from this node, and nothing else, however others write to the Node meanwhile.

The startup-taint gate removes its taint with a read-modify-write: read the Node, drop every taint
with the gate's key, and send the remaining list back as a JSON merge patch that carries the
``resourceVersion`` that was read. The API server treats that resourceVersion as a precondition:
if anyone changed the Node in between (the kubelet's heartbeat does not touch ``spec``, but an
operator, the cloud controller or the node lifecycle controller may add a taint), it answers
``409 Conflict`` instead of overwriting their change, and we read again. A merge patch replaces
a list whole, which is why the precondition matters: without it a concurrently added taint
would be lost.

The patch touches ``spec.taints`` only, which is what the shipped ValidatingAdmissionPolicy
allows the syncer's service account to change, on its own Node only.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import Any

from syncer.node.nodeinfo import ApiCallError, ApiEndpoint, NodeInfoError, api_call, node_path

__all__ = ["CONFLICT_ATTEMPTS", "Removal", "remove_taint"]

log = logging.getLogger(__name__)

# Conflicts come from other writers and clear at once; more than a few in a row means a
# controller fighting us, and the next gate cycle tries again anyway.
CONFLICT_ATTEMPTS = 5
MERGE_PATCH = "application/merge-patch+json"


class Removal(enum.Enum):
    REMOVED = "removed"
    ABSENT = "absent"  # the node did not carry the taint (any more): nothing to do


def remove_taint(
    endpoint: ApiEndpoint,
    node: str,
    key: str,
    *,
    timeout: float = 10.0,
    attempts: int = CONFLICT_ATTEMPTS,
    on_conflict: Any = None,
) -> Removal:
    """Blocking (run it in a thread): drop every taint with ``key`` from ``node``.

    Raises NodeInfoError (ApiCallError with the status code when the server refused) when the
    node cannot be read or patched, or when it kept changing under us ``attempts`` times.
    """
    path = node_path(node)
    for _ in range(attempts):
        current = _decode(api_call(endpoint, path, timeout=timeout))
        metadata = current.get("metadata") or {}
        taints = (current.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if not (isinstance(t, dict) and t.get("key") == key)]
        if len(kept) == len(taints):
            return Removal.ABSENT
        patch = {
            "metadata": {"resourceVersion": metadata.get("resourceVersion", "")},
            "spec": {"taints": kept},
        }
        try:
            api_call(
                endpoint,
                path,
                method="PATCH",
                body=json.dumps(patch).encode(),
                content_type=MERGE_PATCH,
                timeout=timeout,
            )
        except ApiCallError as e:
            if e.code != 409:
                raise
            log.info(
                "node changed while removing the taint, reading it again", extra={"node": node}
            )
            if on_conflict is not None:
                on_conflict()
            continue
        return Removal.REMOVED
    raise NodeInfoError(f"node {node} changed under every one of {attempts} attempts to untaint it")


def _decode(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise NodeInfoError(f"the API server's answer is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind", "Node") != "Node":
        raise NodeInfoError("the API server's answer is not a v1 Node")
    return doc
