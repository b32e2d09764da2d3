"""A fake Kubernetes API server for the resources image-syncer uses, speaking the real protocol.

No kube-apiserver can be installed here, so broadcaster tests drive this one through the real
``kubernetes`` client, and syncer tests through the syncer's own HTTP calls: the same URLs, query
parameters, list and watch bodies and status codes as a real API server, for the parts the two
use. What it models:

- ``fleets`` and ``gameservers`` (agones.dev/v1), ``deployments`` and ``events`` (apps/v1 and
  v1, namespaced) and ``nodes`` (v1, cluster-scoped): list, get, watch, create (POST), update
  (PUT, with resourceVersion conflict checks), delete (DELETE), and PATCH with a JSON merge
  patch or a JSON patch (RFC 6902, ``test`` included): a ``metadata.resourceVersion`` in the
  patched object is a precondition (409 Conflict when stale), a failed ``test`` is 422, as in
  the real server;
- one global, monotonically increasing resourceVersion (sent as an opaque string, as clients must
  treat it), a uid per object, ``generation`` only on the kinds whose strategy sets it (not Nodes
  or Events), and ``managedFields`` rewritten by every write (the field manager runs before
  admission on a real server);
- every error is the real ``metav1.Status`` (apimachinery ``api/errors``): ``kind``,
  ``apiVersion``, ``metadata: {}``, ``status: Failure``, ``message``, ``reason``, ``details``
  (``name``, ``group`` when not core, ``kind`` = the resource plural) and ``code``; the texts are
  the real ones (``nodes "x" not found``, ``Operation cannot be fulfilled on ...``). A path that
  no API group serves (an uninstalled CRD, :meth:`unserve`) gets what the real server's last
  handler sends: a plain-text ``404 page not found``;
- admission (:attr:`admission`): a test-supplied ValidatingAdmissionPolicy decision turned into
  the real refusal: ``<resource> "<name>" is forbidden: ValidatingAdmissionPolicy '<policy>'
  with binding '<binding>' denied request: <message>`` with the policy's reason and its code
  (Forbidden 403; Invalid, the reason of an evaluation error, 422);
- watch from a resourceVersion (history replay), from nothing or ``0`` (synthetic ADDED of the
  current state), ``timeoutSeconds``, ``allowWatchBookmarks``; a label-selected watch sends
  DELETED when an object stops matching and ADDED when it starts, as the watch cache does;
- ``410 Gone``: after :meth:`FakeKube.compact`, a watch from an older resourceVersion gets an
  ERROR event with an ``Expired`` Status, both on reconnect and mid-stream for a lagging watch;
  the watch request itself is answered 200 (the watch cache's ``errWatcher``); an exact list at a
  compacted resourceVersion gets HTTP 410 with etcd3's text;
- test controls: :meth:`hold_watches` (freeze delivery, to make a gap), :meth:`drop_watches`
  (end every open watch), :meth:`bookmark` (ask open watches for a BOOKMARK now),
  :meth:`before_next_patch` (a concurrent writer, run between a client's read and its patch),
  :meth:`forbid` (RBAC refuses a verb on a resource: 403 with the authorizer's Status);
- ``TokenReview`` (``authentication.k8s.io/v1``): tokens made by :meth:`issue_token` are
  ServiceAccount tokens bound to a pod on a node, JWT-shaped with their audiences and expiry; the
  review answers as the API server does: the user, its groups and pod-binding ``extra`` fields
  (credential-id, node-name, node-uid, pod-name, pod-uid, each a one-element list),
  and ``authenticated: false`` with an ``invalid bearer token`` error for an unknown or expired
  token or one whose audiences do not meet the requested ones.

tests/support/kubeshapes.py names the Kubernetes source of every shape;
tests/unit/test_fakekube_shapes.py holds the fake to them.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .selectors import SelectorError, parse_selector

__all__ = ["AdmissionAttributes", "Denial", "FakeKube"]

GROUP_VERSION = "agones.dev/v1"
KINDS = {
    "fleets": "Fleet",
    "gameservers": "GameServer",
    "deployments": "Deployment",
    "nodes": "Node",
    "events": "Event",
}
GROUP_VERSIONS = {
    "fleets": GROUP_VERSION,
    "gameservers": GROUP_VERSION,
    "deployments": "apps/v1",
    "nodes": "v1",
    "events": "v1",
}
CLUSTER_SCOPED = frozenset({"nodes"})
# The registry strategies that set metadata.generation (CRDs, Deployments); Nodes and Events have
# none.
WITH_GENERATION = frozenset({"fleets", "gameservers", "deployments"})
# Built-in kinds are decoded into Go structs and encoded again, so an empty list or a null
# (``omitempty``) comes back absent; custom resources are stored as sent.
BUILT_IN = frozenset({"nodes", "deployments", "events"})

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[a-z.]+/v1))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?$"
)


class ApiError(Exception):
    """A ``metav1.Status`` failure; ``details`` as ``StatusDetails`` (None: no details key)."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


class NotServed(Exception):
    """No API group serves this path: the real server's last handler answers plain text."""


def _group(plural: str) -> str:
    version = GROUP_VERSIONS[plural]
    return version.split("/")[0] if "/" in version else ""


def _qualified(plural: str) -> str:
    """``schema.GroupResource.String()``: ``nodes``, ``fleets.agones.dev``."""
    group = _group(plural)
    return f"{plural}.{group}" if group else plural


def _details(plural: str, name: str) -> dict[str, Any]:
    """``StatusDetails`` of one object: its name, API group (omitted when core) and resource."""
    group = _group(plural)
    return {"name": name, **({"group": group} if group else {}), "kind": plural}


def _not_found(plural: str, name: str) -> ApiError:
    """apimachinery ``errors.NewNotFound``."""
    message = f'{_qualified(plural)} "{name}" not found'
    return ApiError(404, "NotFound", message, _details(plural, name))


def _conflict(plural: str, name: str) -> ApiError:
    """``errors.NewConflict`` with the registry's ``OptimisticLockErrorMsg``."""
    message = (
        f'Operation cannot be fulfilled on {_qualified(plural)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    return ApiError(409, "Conflict", message, _details(plural, name))


def _invalid(message: str) -> ApiError:
    """``errors.NewGenericServerResponse(422, ...)`` as the PATCH handler returns it."""
    return ApiError(422, "Invalid", message, {})


@dataclass(frozen=True)
class Denial:
    """A ValidatingAdmissionPolicy's refusal: the failed validation's message and reason."""

    policy: str
    binding: str
    message: str
    reason: str = "Invalid"  # what the API server uses when the validation names none


@dataclass(frozen=True)
class AdmissionAttributes:
    """What a validating admission policy sees of one write (``request``, ``object``, ...)."""

    operation: str
    plural: str
    name: str
    user: dict[str, Any] | None  # the token's userInfo; None for an anonymous request
    obj: dict[str, Any]
    old: dict[str, Any] | None


# dispatcher.go reasonToCode: the HTTP code of a refusal with this reason.
_REASON_CODES = {"Forbidden": 403, "Unauthorized": 401, "RequestEntityTooLarge": 413}


def _denied(plural: str, name: str, denial: Denial) -> ApiError:
    """The validating-policy dispatcher's refusal (``admission.NewForbidden`` re-labelled)."""
    text = (
        f"ValidatingAdmissionPolicy '{denial.policy}' with binding '{denial.binding}' denied "
        f"request: {denial.message}"
    )
    details = {**_details(plural, name), "causes": [{"message": text}]}
    code = _REASON_CODES.get(denial.reason, 422)
    message = f'{_qualified(plural)} "{name}" is forbidden: {text}'
    return ApiError(code, denial.reason, message, details)


@dataclass(frozen=True)
class _Change:
    rv: int
    plural: str
    type: str
    old: dict[str, Any] | None
    new: dict[str, Any]


_TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class _Token:
    user: dict[str, Any]  # the userInfo the API server derives from it
    audiences: tuple[str, ...]
    expires: float


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKube:
    """The store and the controls; :meth:`start` serves it on a free loopback port."""

    def __init__(self, directory: Path, *, bookmark_interval: float | None = None) -> None:
        self.directory = directory
        self.bookmark_interval = bookmark_interval
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in KINDS}
        self._history: list[_Change] = []
        self._compacted = 0
        self._drop_epoch = 0
        self._bookmark_epoch = 0
        self._held = False
        self._closed = False
        self.open_watches = 0
        self.bookmarks_sent = 0
        self.requests: list[tuple[str, str]] = []
        self._before_patch: list[Any] = []
        self._forbidden: dict[tuple[str, str], str] = {}
        self._tokens: dict[str, _Token] = {}
        self._unserved: set[str] = set()
        # The validating admission in force: None admits everything (no policy installed).
        self.admission: Callable[[AdmissionAttributes], Denial | None] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeKube:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._write_kubeconfig()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def _write_kubeconfig(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        # YAML is a superset of JSON, so the client reads this as any kubeconfig.
        self.kubeconfig.write_text(json.dumps(config, indent=2))

    # --- the store --------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def _record(
        self, plural: str, type_: str, old: dict[str, Any] | None, new: dict[str, Any]
    ) -> None:
        self._history.append(_Change(self._rv, plural, type_, old, copy.deepcopy(new)))
        self._cond.notify_all()

    def create(
        self, plural: str, obj: dict[str, Any], *, manager: str = "kubectl", user: Any = None
    ) -> dict[str, Any]:
        """POST: ``manager`` is the field manager, ``user`` the userInfo admission sees."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        _scope(plural, meta)
        if not meta.get("name"):
            raise _name_required(plural)
        with self._cond:
            if _key(obj) in self._objects[plural]:
                message = f'{_qualified(plural)} "{meta["name"]}" already exists'
                raise ApiError(409, "AlreadyExists", message, _details(plural, meta["name"]))
            obj["apiVersion"], obj["kind"] = GROUP_VERSIONS[plural], KINDS[plural]
            if plural in BUILT_IN:
                obj = _omit_empty(obj)
                meta = obj["metadata"]
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
            if plural in WITH_GENERATION:
                meta["generation"] = 1
            _managed_by(obj, manager)
            self._admit("CREATE", plural, user, obj, None)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._objects[plural][_key(obj)] = obj
            self._record(plural, "ADDED", None, obj)
            return copy.deepcopy(obj)

    def update(
        self, plural: str, obj: dict[str, Any], *, manager: str = "kubectl", user: Any = None
    ) -> dict[str, Any]:
        """PUT, with the resourceVersion of ``obj`` (when set) as a precondition."""
        obj = copy.deepcopy(obj)
        _scope(plural, obj["metadata"])
        name = obj["metadata"]["name"]
        with self._cond:
            current = self._objects[plural].get(_key(obj))
            if current is None:
                raise _not_found(plural, name)
            wanted = obj["metadata"].get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise _conflict(plural, name)
            obj["apiVersion"], obj["kind"] = GROUP_VERSIONS[plural], KINDS[plural]
            if plural in BUILT_IN:
                obj = _omit_empty(obj)
            meta = obj["metadata"]
            for kept in ("uid", "creationTimestamp", "generation", "managedFields"):
                if kept in current["metadata"]:
                    meta[kept] = copy.deepcopy(current["metadata"][kept])
            if "generation" in meta and obj.get("spec") != current.get("spec"):
                meta["generation"] = current["metadata"]["generation"] + 1
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
            _managed_by(obj, manager)
            self._admit("UPDATE", plural, user, obj, current)
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            self._objects[plural][_key(obj)] = obj
            self._record(plural, "MODIFIED", current, obj)
            return copy.deepcopy(obj)

    def _admit(
        self,
        operation: str,
        plural: str,
        user: Any,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
    ) -> None:
        """Validating admission, after the field manager and before the write is stored."""
        if self.admission is None:
            return
        name = obj["metadata"]["name"]
        attributes = AdmissionAttributes(
            operation, plural, name, user, copy.deepcopy(obj), copy.deepcopy(old)
        )
        denial = self.admission(attributes)
        if denial is not None:
            raise _denied(plural, name, denial)

    def delete(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            current = self._objects[plural].pop((namespace, name), None)
            if current is None:
                raise _not_found(plural, name)
            self._rv += 1
            gone = copy.deepcopy(current)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(plural, "DELETED", current, gone)
            return copy.deepcopy(gone)

    def patch(
        self,
        plural: str,
        namespace: str,
        name: str,
        content_type: str,
        patch: Any,
        *,
        manager: str = "kubectl",
        user: Any = None,
    ) -> dict[str, Any]:
        """Apply a merge or JSON patch to the stored object, as the API server's PATCH does."""
        if plural in CLUSTER_SCOPED:
            namespace = ""
        with self._cond:
            hooks, self._before_patch = self._before_patch, []
        for hook in hooks:
            hook()
        with self._cond:
            current = self._objects[plural].get((namespace, name))
            if current is None:
                raise _not_found(plural, name)
            if content_type == "application/merge-patch+json":
                patched = _merge_patch(current, patch)
            elif content_type == "application/json-patch+json":
                patched = _json_patch(current, patch)
            else:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types "
                    f"include: application/json-patch+json, application/merge-patch+json, "
                    f"application/apply-patch+yaml (got {content_type})",
                    {},
                )
            patched["metadata"]["name"] = name
            if namespace:
                patched["metadata"]["namespace"] = namespace
            # A resourceVersion the patch left in the object is a precondition; none means "any".
            if patched["metadata"].get("resourceVersion") == current["metadata"]["resourceVersion"]:
                patched["metadata"].pop("resourceVersion")
            return self.update(plural, patched, manager=manager, user=user)

    def before_next_patch(self, hook: Any) -> None:
        """Run ``hook`` (another writer) when the next PATCH arrives, before it applies."""
        with self._cond:
            self._before_patch.append(hook)

    def forbid(
        self, verb: str, plural: str, user: str = "system:serviceaccount:ci:deployer"
    ) -> None:
        """From now on refuse ``verb`` (get, list, watch, patch...) on ``plural`` to everyone."""
        with self._cond:
            self._forbidden[(verb, plural)] = user

    def check_allowed(
        self, verb: str, plural: str, namespace: str | None, name: str | None
    ) -> None:
        """403 as the API server's RBAC authorizer answers it, if :meth:`forbid` said so.

        The message is apimachinery's ``NewForbidden`` (``<resource>.<group> "<name>" is
        forbidden: ``) around the RBAC authorizer's reason, as kubectl shows it.
        """
        with self._cond:
            user = self._forbidden.get((verb, plural))
        if user is None:
            return
        subject = f'{_qualified(plural)} "{name}"' if name else _qualified(plural)
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        raise ApiError(
            403,
            "Forbidden",
            f'{subject} is forbidden: User "{user}" cannot {verb} resource "{plural}" in API '
            f'group "{_group(plural)}" {scope}',
            _details(plural, name or ""),
        )

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._objects[plural].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects(self, plural: str = "fleets") -> list[dict[str, Any]]:
        with self._cond:
            return [copy.deepcopy(o) for _, o in sorted(self._objects[plural].items())]

    # --- test controls ----------------------------------------------------------------------

    def compact(self) -> int:
        """Forget all history, as etcd compaction does; older resourceVersions now get 410."""
        with self._cond:
            self._compacted = self._rv
            self._history.clear()
            self._cond.notify_all()
            return self._compacted

    def drop_watches(self) -> None:
        """End every open watch (cleanly, as an API server restart or timeout does)."""
        with self._cond:
            self._drop_epoch += 1
            self._cond.notify_all()

    def bookmark(self) -> None:
        with self._cond:
            self._bookmark_epoch += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold_watches(self) -> Iterator[None]:
        """Deliver nothing to watches (open or new) inside the block: the gap of a slow watcher."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.open_watches >= count, timeout=timeout):
                raise TimeoutError(f"{self.open_watches} open watches, wanted {count}")

    def unserve(self, plural: str) -> None:
        """Serve ``plural`` no more, as when its CRD is not installed (Agones missing)."""
        with self._cond:
            self._unserved.add(plural)

    def serve(self, plural: str) -> None:
        with self._cond:
            self._unserved.discard(plural)

    def served(self, plural: str) -> bool:
        with self._cond:
            return plural not in self._unserved

    def list_calls(self, plural: str = "fleets") -> int:
        with self._cond:
            return sum(1 for method, path in self.requests if method == "LIST" and plural in path)

    # --- ServiceAccount tokens and TokenReview ----------------------------------------------

    def issue_token(
        self,
        namespace: str,
        service_account: str,
        *,
        node: str | None = None,
        audiences: tuple[str, ...] = ("nats",),
        expires_in: float = 3600.0,
    ) -> str:
        """A projected token for a pod of ``service_account`` on ``node`` (as the kubelet gets).

        The user it authenticates as is the real one (pkg/serviceaccount claims.go): the
        ServiceAccount's name, uid and groups, and as ``extra`` the token's id
        (``credential-id: JTI=...``), its pod and, when bound to one, its node (Kubernetes
        1.30+), each a one-element list.
        """
        expires = time.time() + expires_in
        pod = f"{service_account}-{uuid.uuid4().hex[:5]}"
        ids = {k: str(uuid.uuid4()) for k in ("sa", "pod", "node", "jti")}
        claims = {
            "aud": list(audiences),
            "exp": int(expires),
            "iat": int(time.time()),
            "iss": "https://kubernetes.default.svc",
            "jti": ids["jti"],
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod, "uid": ids["pod"]},
                "serviceaccount": {"name": service_account, "uid": ids["sa"]},
                **({"node": {"name": node, "uid": ids["node"]}} if node else {}),
            },
        }
        extra = {"authentication.kubernetes.io/credential-id": [f"JTI={ids['jti']}"]}
        if node:
            extra["authentication.kubernetes.io/node-name"] = [node]
            extra["authentication.kubernetes.io/node-uid"] = [ids["node"]]
        extra["authentication.kubernetes.io/pod-name"] = [pod]
        extra["authentication.kubernetes.io/pod-uid"] = [ids["pod"]]
        user = {
            "username": f"system:serviceaccount:{namespace}:{service_account}",
            "uid": ids["sa"],
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            "extra": extra,
        }
        signature = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        token = f"{_b64({'alg': 'RS256', 'kid': 'fake'})}.{_b64(claims)}.{signature}"
        with self._cond:
            self._tokens[token] = _Token(user, audiences, expires)
        return token

    def revoke_token(self, token: str) -> None:
        """The token's pod is gone: the API server no longer vouches for its bound token."""
        with self._cond:
            self._tokens.pop(token, None)

    def review(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The ``status`` of a TokenReview for ``spec`` (``token``, optional ``audiences``)."""
        with self._cond:
            token = self._tokens.get(spec.get("token") or "")
        wanted = list(spec.get("audiences") or ["https://kubernetes.default.svc"])
        if token is None:
            return _refused("token has been invalidated")
        if token.expires <= time.time():
            return _refused("square/go-jose/jwt: validation failed, token is expired (exp)")
        granted = [a for a in wanted if a in token.audiences]
        if not granted:
            return _refused(
                f"token audiences {json.dumps(list(token.audiences))} is invalid for the target "
                f"audiences {json.dumps(wanted)}"
            )
        return {"authenticated": True, "user": copy.deepcopy(token.user), "audiences": granted}

    def user_for(self, authorization: str | None) -> dict[str, Any] | None:
        """Who an API request is from: None without a token, ApiError 401 for a bad one."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        review = self.review({"token": token.strip()}) if scheme.lower() == "bearer" else {}
        if not review.get("authenticated"):
            # authentication/request/... unauthorized: no details, message "Unauthorized".
            raise ApiError(401, "Unauthorized", "Unauthorized")
        user: dict[str, Any] = review["user"]
        return user

    # --- list and watch ---------------------------------------------------------------------

    def list(self, plural: str, namespace: str | None, query: dict[str, str]) -> dict[str, Any]:
        matches = _matcher(namespace, query.get("labelSelector"))
        with self._cond:
            rv = query.get("resourceVersion")
            exact = query.get("resourceVersionMatch") == "Exact"
            if rv and exact and int(rv) < self._compacted:
                # etcd3 errors.go, interpretListError on ErrCompacted.
                message = "The resourceVersion for the provided list is too old."
                raise ApiError(410, "Expired", message)
            items = [copy.deepcopy(o) for _, o in sorted(self._objects[plural].items())]
            return {
                "apiVersion": GROUP_VERSIONS[plural],
                "kind": f"{KINDS[plural]}List",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": [o for o in items if matches(o)],
            }

    def watch(
        self, plural: str, namespace: str | None, query: dict[str, str]
    ) -> Iterator[dict[str, Any]]:
        """The events of one watch request, ending on timeout, drop, expiry or shutdown."""
        matches = _matcher(namespace, query.get("labelSelector"))
        bookmarks = query.get("allowWatchBookmarks") == "true"
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        with self._cond:
            self.open_watches += 1
            self._cond.notify_all()
            drop_epoch, bookmark_epoch = self._drop_epoch, self._bookmark_epoch
        try:
            start = query.get("resourceVersion") or "0"
            if start == "0":
                with self._cond:
                    initial = [copy.deepcopy(o) for _, o in sorted(self._objects[plural].items())]
                    cursor = self._rv
                for obj in initial:
                    if matches(obj):
                        yield {"type": "ADDED", "object": obj}
            else:
                cursor = int(start)
            last_bookmark = time.monotonic()
            while True:
                with self._cond:
                    self._cond.wait(timeout=0.1)
                    if self._closed or self._drop_epoch != drop_epoch:
                        return
                    if time.monotonic() >= deadline:
                        return
                    if self._held:
                        continue
                    if cursor < self._compacted:
                        yield {"type": "ERROR", "object": self._expired(cursor)}
                        return
                    changes = self._history[bisect.bisect_right(self._history, cursor, key=_rv) :]
                    cursor = self._rv
                    want_bookmark = bookmarks and (
                        self._bookmark_epoch != bookmark_epoch
                        or (
                            self.bookmark_interval is not None
                            and time.monotonic() - last_bookmark >= self.bookmark_interval
                        )
                    )
                    bookmark_epoch = self._bookmark_epoch
                for change in changes:
                    if change.plural == plural and (event := _event_for(change, matches)):
                        yield event
                if want_bookmark:
                    last_bookmark = time.monotonic()
                    yield {"type": "BOOKMARK", "object": _bookmark(plural, cursor)}
                    # Counted once written: a test may then cut the watch and rely on it.
                    with self._cond:
                        self.bookmarks_sent += 1
        finally:
            with self._cond:
                self.open_watches -= 1
                self._cond.notify_all()

    def _expired(self, rv: int) -> dict[str, Any]:
        # watch_cache.go: the oldest resourceVersion it could still serve from, minus one.
        message = f"too old resource version: {rv} ({self._compacted})"
        return ApiError(410, "Expired", message).status()


def _name_required(plural: str) -> ApiError:
    """``errors.NewInvalid`` for a create without a name (validation of ObjectMeta)."""
    group, kind = _group(plural), KINDS[plural]
    detail = "Required value: name or generateName is required"
    message = f'{f"{kind}.{group}" if group else kind} "" is invalid: metadata.name: {detail}'
    cause = {"reason": "FieldValueRequired", "message": detail, "field": "metadata.name"}
    details = {**({"group": group} if group else {}), "kind": kind, "causes": [cause]}
    return ApiError(422, "Invalid", message, details)


def _managed_by(obj: dict[str, Any], manager: str) -> None:
    """Record ``manager``'s write in managedFields, as the field manager does before admission.

    Coarse on purpose: the entry names the top-level sections written, not every field (no
    consumer reads fieldsV1; what matters is that the list exists and changes on every write).
    """
    fields: dict[str, Any] = {
        f"f:{k}": {} for k in obj if k not in ("apiVersion", "kind", "metadata", "status")
    }
    entry = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": obj["apiVersion"],
        "time": _now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }
    meta = obj["metadata"]
    kept = [e for e in meta.get("managedFields") or [] if e.get("manager") != manager]
    meta["managedFields"] = [*kept, entry]


def _omit_empty(doc: Any) -> Any:
    """What a Go round trip does to a built-in object: nulls and empty lists disappear.

    (Empty maps of ``omitempty`` map fields too: labels and annotations. An empty struct, such
    as ``spec: {}``, stays.)
    """
    if isinstance(doc, list):
        return [_omit_empty(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {}
    for key, value in doc.items():
        if value is None or value == [] or (value == {} and key in ("labels", "annotations")):
            continue
        out[key] = _omit_empty(value)
    return out


def _scope(plural: str, meta: dict[str, Any]) -> None:
    if plural in CLUSTER_SCOPED:
        meta.pop("namespace", None)
    else:
        meta.setdefault("namespace", "default")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _json_patch(target: dict[str, Any], ops: Any) -> dict[str, Any]:
    """RFC 6902 add, remove, replace and test; a failed op is 422, as the API server answers."""
    doc = copy.deepcopy(target)
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations", {})
    for op in ops:
        parent, last = _pointer(doc, op.get("path", ""))
        kind = op.get("op")
        try:
            if kind == "test":
                if _get(parent, last) != op.get("value"):
                    raise _invalid(f"testing value {op['path']} failed")
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind in ("add", "replace"):
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(index, op["value"])
                    else:
                        parent[index] = op["value"]
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = op["value"]
            else:
                raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}", {})
        except (KeyError, IndexError, ValueError, TypeError):
            raise _invalid(f"{kind} {op.get('path')}: path not found") from None
    return doc


def _pointer(doc: Any, path: str) -> tuple[Any, str]:
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    if not tokens:
        raise _invalid("a JSON patch may not replace the whole object")
    node = doc
    try:
        for token in tokens[:-1]:
            node = node[int(token)] if isinstance(node, list) else node[token]
    except (KeyError, IndexError, ValueError, TypeError):
        raise _invalid(f"path {path} not found") from None
    return node, tokens[-1]


def _get(parent: Any, last: str) -> Any:
    try:
        return parent[int(last)] if isinstance(parent, list) else parent[last]
    except (KeyError, IndexError, ValueError, TypeError):
        return None


def _rv(change: _Change) -> int:
    return change.rv


def _bookmark(plural: str, rv: int) -> dict[str, Any]:
    return {
        "kind": KINDS[plural],
        "apiVersion": GROUP_VERSIONS[plural],
        "metadata": {"resourceVersion": str(rv)},
    }


def _refused(reason: str) -> dict[str, Any]:
    return {"user": {}, "error": f"[invalid bearer token, {reason}]"}


def _matcher(namespace: str | None, selector: str | None) -> Any:
    try:
        labels_match = parse_selector(selector)
    except SelectorError as e:
        raise ApiError(400, "BadRequest", str(e), {}) from e

    def matches(obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        return labels_match(meta.get("labels") or {})

    return matches


def _event_for(change: _Change, matches: Any) -> dict[str, Any] | None:
    """What a filtered watch sees of one change: objects entering or leaving the filter count."""
    was, now = matches(change.old), matches(change.new)
    if change.type == "MODIFIED":
        if was and now:
            return {"type": "MODIFIED", "object": change.new}
        if now:
            return {"type": "ADDED", "object": change.new}
        if was:
            return {"type": "DELETED", "object": change.new}
        return None
    return {"type": change.type, "object": change.new} if now else None


# Request kind -> the RBAC verb it needs (a list and a get are both GETs).
_VERBS = {
    "GET": "get",
    "LIST": "list",
    "WATCH": "watch",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}


def _handler_for(kube: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.kube = kube
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: FakeKube

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _route(self) -> tuple[str, str | None, str | None, dict[str, str]]:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        match = _PATH.match(parts.path)
        if not match or GROUP_VERSIONS.get(match["plural"]) != (match["core"] or match["group"]):
            raise NotServed(parts.path)
        if not self.kube.served(match["plural"]):
            raise NotServed(parts.path)
        if "limit" in query or "continue" in query:
            # Paging is not modelled; no consumer pages. Refused loudly rather than ignored.
            raise ApiError(400, "BadRequest", "fakekube: limit/continue are not modelled", {})
        return match["plural"], match["ns"], match["name"], query

    def _manager(self) -> str:
        """The default field manager: the User-Agent up to its first '/' (apiserver's rule)."""
        return (self.headers.get("User-Agent") or "unknown").split("/")[0]

    def _send_not_found_page(self) -> None:
        """``http.NotFound``: what the API server's last handler (notfoundhandler) writes."""
        data = b"404 page not found\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
            return body
        except json.JSONDecodeError as e:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {e}", {}) from e

    def _serve(self, method: str) -> None:
        try:
            if urlsplit(self.path).path == _TOKENREVIEWS and method == "POST":
                with self.kube._cond:
                    self.kube.requests.append(("CREATE", self.path))
                body = self._body()
                body["status"] = self.kube.review(body.get("spec") or {})
                body.setdefault("metadata", {})
                return self._send_json(201, body)
            plural, namespace, name, query = self._route()
            user = self.kube.user_for(self.headers.get("Authorization"))
            kind = "WATCH" if query.get("watch") in ("true", "1") else method
            if method == "GET" and name is None and kind == "GET":
                kind = "LIST"
            with self.kube._cond:
                self.kube.requests.append((kind, self.path))
            self.kube.check_allowed(_VERBS[kind], plural, namespace, name)
            if kind == "WATCH":
                return self._stream(self.kube.watch(plural, namespace, query))
            self._send_json(*self._dispatch(method, plural, namespace, name, query, user))
        except NotServed:
            self._send_not_found_page()
        except ApiError as e:
            self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _dispatch(
        self,
        method: str,
        plural: str,
        ns: str | None,
        name: str | None,
        query: dict[str, str],
        user: dict[str, Any] | None,
    ) -> tuple[int, dict[str, Any]]:
        kube = self.kube
        writer: dict[str, Any] = {"manager": self._manager(), "user": user}
        if method == "GET" and name is None:
            return 200, kube.list(plural, ns, query)
        if method == "GET" and name is not None:
            obj = kube.get(plural, ns or "", name)
            if obj is None:
                raise _not_found(plural, name)
            return 200, obj
        # A namespaced resource needs its namespace in the path, a cluster-scoped one has none.
        scoped = (ns is None) == (plural in CLUSTER_SCOPED)
        if method == "POST" and name is None and scoped:
            body = self._body()
            body.setdefault("metadata", {})["namespace"] = ns
            return 201, kube.create(plural, body, **writer)
        if method == "PUT" and name is not None and scoped:
            body = self._body()
            body.setdefault("metadata", {}).update(namespace=ns, name=name)
            return 200, kube.update(plural, body, **writer)
        if method == "PATCH" and name is not None and scoped:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            return 200, kube.patch(plural, ns or "", name, content_type, self._body(), **writer)
        if method == "DELETE" and name is not None and scoped:
            return 200, kube.delete(plural, ns or "", name)
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            {},
        )

    def _stream(self, events: Iterator[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for event in events:
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            events.close()  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")
