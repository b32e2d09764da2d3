"""A fake Kubernetes API server for the agones.dev/v1 resources, speaking the real wire protocol.

No kube-apiserver can be installed here, so broadcaster tests drive this one through the real
``kubernetes`` client: the same URLs, query parameters, list and watch bodies and status codes as
a real API server, for the parts the broadcaster uses. What it models:

- ``fleets`` and ``gameservers``, cluster-wide and namespaced: list, get, watch, create (POST),
  update (PUT, with resourceVersion conflict checks) and delete (DELETE);
- one global, monotonically increasing resourceVersion, and a uid per object;
- watch from a resourceVersion (history replay), from nothing or ``0`` (synthetic ADDED of the
  current state), ``timeoutSeconds``, ``allowWatchBookmarks``; a label-selected watch sends
  DELETED when an object stops matching and ADDED when it starts, as the watch cache does;
- ``410 Gone``: after :meth:`FakeKube.compact`, a watch from an older resourceVersion gets an
  ERROR event with an ``Expired`` Status, both on reconnect and mid-stream for a lagging watch;
  an exact list at a compacted resourceVersion gets HTTP 410;
- test controls: :meth:`hold_watches` (freeze delivery, to make a gap), :meth:`drop_watches`
  (end every open watch), :meth:`bookmark` (ask open watches for a BOOKMARK now).
"""

from __future__ import annotations

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
KINDS = {"fleets": "Fleet", "gameservers": "GameServer"}

_PATH = re.compile(
    r"^/apis/agones\.dev/v1(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?$"
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


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"].get("namespace", "default"), obj["metadata"]["name"]


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

    def _record(self, plural: str, type_: str, old: dict | None, new: dict) -> None:
        self._history.append(_Change(self._rv, plural, type_, old, copy.deepcopy(new)))
        self._cond.notify_all()

    def create(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        with self._cond:
            if _key(obj) in self._objects[plural]:
                raise ApiError(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
            self._rv += 1
            obj["apiVersion"], obj["kind"] = GROUP_VERSION, KINDS[plural]
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
        obj["metadata"].setdefault("namespace", "default")
        with self._cond:
            current = self._objects[plural].get(_key(obj))
            if current is None:
                raise ApiError(404, "NotFound", f'{plural} "{obj["metadata"]["name"]}" not found')
            wanted = obj["metadata"].get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified; please retry")
            self._rv += 1
            obj["apiVersion"], obj["kind"] = GROUP_VERSION, KINDS[plural]
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
                "apiVersion": GROUP_VERSION,
                "kind": f"{KINDS[plural]}List",
                "metadata": {"resourceVersion": str(self._rv), "continue": ""},
                "items": [o for o in items if matches(o)],
            }

    def watch(self, plural: str, namespace: str | None, query: dict[str, str]) -> Iterator[dict]:
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


def _rv(change: _Change) -> int:
    return change.rv


def _bookmark(plural: str, rv: int) -> dict[str, Any]:
    return {
        "kind": KINDS[plural],
        "apiVersion": GROUP_VERSION,
        "metadata": {"resourceVersion": str(rv)},
    }


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
        if not match or match["plural"] not in KINDS:
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
            return json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as e:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {e}") from e

    def _serve(self, method: str) -> None:
        try:
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
        if method == "GET":
            obj = kube.get(plural, ns or "default", name)
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
