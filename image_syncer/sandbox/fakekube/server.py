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
- one global, monotonically increasing resourceVersion, and a uid per object;
- watch from a resourceVersion (history replay), from nothing or ``0`` (synthetic ADDED of the
  current state), ``timeoutSeconds``, ``allowWatchBookmarks``; a label-selected watch sends
  DELETED when an object stops matching and ADDED when it starts, as the watch cache does;
- ``410 Gone``: after :meth:`FakeKube.compact`, a watch from an older resourceVersion gets an
  ERROR event with an ``Expired`` Status, both on reconnect and mid-stream for a lagging watch;
  an exact list at a compacted resourceVersion gets HTTP 410;
- test controls: :meth:`hold_watches` (freeze delivery, to make a gap), :meth:`drop_watches`
  (end every open watch), :meth:`bookmark` (ask open watches for a BOOKMARK now),
  :meth:`before_next_patch` (a concurrent writer, run between a client's read and its patch);
- ``TokenReview`` (``authentication.k8s.io/v1``): tokens made by :meth:`issue_token` are
  ServiceAccount tokens bound to a pod on a node, JWT-shaped with their audiences and expiry; the
  review answers as the API server does: the user, its groups and pod-binding ``extra`` fields,
  and ``authenticated: false`` with an ``invalid bearer token`` error for an unknown or expired
  token or one whose audiences do not meet the requested ones.
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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .selectors import SelectorError, parse_selector

__all__ = ["FakeKube"]

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

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[a-z.]+/v1))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?$"
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


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
    namespace: str
    service_account: str
    node: str | None
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
        self._tokens: dict[str, _Token] = {}
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

    def create(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        _scope(plural, meta)
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        with self._cond:
            if _key(obj) in self._objects[plural]:
                raise ApiError(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
            self._rv += 1
            obj["apiVersion"], obj["kind"] = GROUP_VERSIONS[plural], KINDS[plural]
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(self._rv),
                generation=1,
                creationTimestamp=_now(),
            )
            self._objects[plural][_key(obj)] = obj
            self._record(plural, "ADDED", None, obj)
            return copy.deepcopy(obj)

    def update(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        _scope(plural, obj["metadata"])
        with self._cond:
            current = self._objects[plural].get(_key(obj))
            if current is None:
                raise ApiError(404, "NotFound", f'{plural} "{obj["metadata"]["name"]}" not found')
            wanted = obj["metadata"].get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified; please retry")
            self._rv += 1
            obj["apiVersion"], obj["kind"] = GROUP_VERSIONS[plural], KINDS[plural]
            meta = obj["metadata"]
            for kept in ("uid", "creationTimestamp", "generation"):
                meta[kept] = current["metadata"][kept]
            if obj.get("spec") != current.get("spec"):
                meta["generation"] = current["metadata"]["generation"] + 1
            meta["resourceVersion"] = str(self._rv)
            self._objects[plural][_key(obj)] = obj
            self._record(plural, "MODIFIED", current, obj)
            return copy.deepcopy(obj)

    def delete(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            current = self._objects[plural].pop((namespace, name), None)
            if current is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            self._rv += 1
            gone = copy.deepcopy(current)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(plural, "DELETED", current, gone)
            return copy.deepcopy(gone)

    def patch(
        self, plural: str, namespace: str, name: str, content_type: str, patch: Any
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
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            if content_type == "application/merge-patch+json":
                patched = _merge_patch(current, patch)
            elif content_type == "application/json-patch+json":
                patched = _json_patch(current, patch)
            else:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format: {content_type}",
                )
            patched["metadata"]["name"] = name
            if namespace:
                patched["metadata"]["namespace"] = namespace
            # A resourceVersion the patch left in the object is a precondition; none means "any".
            if patched["metadata"].get("resourceVersion") == current["metadata"]["resourceVersion"]:
                patched["metadata"].pop("resourceVersion")
            return self.update(plural, patched)

    def before_next_patch(self, hook: Any) -> None:
        """Run ``hook`` (another writer) when the next PATCH arrives, before it applies."""
        with self._cond:
            self._before_patch.append(hook)

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
        """A projected token for a pod of ``service_account`` on ``node`` (as the kubelet gets)."""
        expires = time.time() + expires_in
        claims = {
            "aud": list(audiences),
            "exp": int(expires),
            "iat": int(time.time()),
            "iss": "https://kubernetes.default.svc",
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
                **({"node": {"name": node, "uid": str(uuid.uuid4())}} if node else {}),
            },
        }
        signature = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        token = f"{_b64({'alg': 'RS256', 'kid': 'fake'})}.{_b64(claims)}.{signature}"
        with self._cond:
            self._tokens[token] = _Token(namespace, service_account, node, audiences, expires)
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
        extra: dict[str, list[str]] = {
            "authentication.kubernetes.io/pod-name": [f"{token.service_account}-pod"],
            "authentication.kubernetes.io/pod-uid": [str(uuid.uuid4())],
        }
        if token.node:
            extra["authentication.kubernetes.io/node-name"] = [token.node]
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{token.namespace}:{token.service_account}",
                "uid": str(uuid.uuid4()),
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{token.namespace}",
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": granted,
        }

    # --- list and watch ---------------------------------------------------------------------

    def list(self, plural: str, namespace: str | None, query: dict[str, str]) -> dict[str, Any]:
        matches = _matcher(namespace, query.get("labelSelector"))
        with self._cond:
            rv = query.get("resourceVersion")
            exact = query.get("resourceVersionMatch") == "Exact"
            if rv and exact and int(rv) < self._compacted:
                raise ApiError(410, "Expired", f"too old resource version: {rv} ({self._rv})")
            items = [copy.deepcopy(o) for _, o in sorted(self._objects[plural].items())]
            return {
                "apiVersion": GROUP_VERSIONS[plural],
                "kind": f"{KINDS[plural]}List",
                "metadata": {"resourceVersion": str(self._rv), "continue": ""},
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
        message = f"too old resource version: {rv} ({self._compacted})"
        return ApiError(410, "Expired", message).status()


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
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    for op in ops:
        parent, last = _pointer(doc, op.get("path", ""))
        kind = op.get("op")
        try:
            if kind == "test":
                if _get(parent, last) != op.get("value"):
                    raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
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
                raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"{kind} {op.get('path')}: path not found") from None
    return doc


def _pointer(doc: Any, path: str) -> tuple[Any, str]:
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    if not tokens:
        raise ApiError(422, "Invalid", "a JSON patch may not replace the whole object")
    node = doc
    try:
        for token in tokens[:-1]:
            node = node[int(token)] if isinstance(node, list) else node[token]
    except (KeyError, IndexError, ValueError, TypeError):
        raise ApiError(422, "Invalid", f"path {path} not found") from None
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
        raise ApiError(400, "BadRequest", str(e)) from e

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
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource {parts.path}"
            )
        return match["plural"], match["ns"], match["name"], query

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
            raise ApiError(400, "BadRequest", f"invalid JSON body: {e}") from e

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
            kind = "WATCH" if query.get("watch") in ("true", "1") else method
            if method == "GET" and name is None and kind == "GET":
                kind = "LIST"
            with self.kube._cond:
                self.kube.requests.append((kind, self.path))
            if kind == "WATCH":
                return self._stream(self.kube.watch(plural, namespace, query))
            self._send_json(*self._dispatch(method, plural, namespace, name, query))
        except ApiError as e:
            self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _dispatch(
        self, method: str, plural: str, ns: str | None, name: str | None, query: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        kube = self.kube
        if method == "GET" and name is None:
            return 200, kube.list(plural, ns, query)
        if method == "GET" and name is not None:
            obj = kube.get(plural, ns or "", name)
            if obj is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            return 200, obj
        if method == "POST" and name is None and ns is not None:
            body = self._body()
            body.setdefault("metadata", {})["namespace"] = ns
            return 201, kube.create(plural, body)
        if method == "PUT" and name is not None and ns is not None:
            body = self._body()
            body.setdefault("metadata", {}).update(namespace=ns, name=name)
            return 200, kube.update(plural, body)
        if method == "PATCH" and name is not None:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            return 200, kube.patch(plural, ns or "", name, content_type, self._body())
        if method == "DELETE" and name is not None and ns is not None:
            return 200, kube.delete(plural, ns, name)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {self.path}")

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
