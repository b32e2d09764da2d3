"""List then watch one kind of Agones object, in a thread, handing what it sees to asyncio.

The ``kubernetes`` client is synchronous, so each watch target runs in a thread of its own and
hands :class:`Listed` snapshots and :class:`Change` events to the event loop through a bounded
asyncio queue. The thread blocks while the queue is full, so a slow NATS slows the watch down
instead of piling events up in memory.

The loop is the informer's: list (getting a resourceVersion), watch from it, and when a watch
request ends resume from the last resourceVersion seen (events and bookmarks alike). When the
server says ``410 Gone`` (history compacted past our resourceVersion) nothing can be resumed: the
thread lists again, and the catch-up turns the new list into the events that were missed.

A list answered 404 means the resource is not served at all: its CRD is not installed (Agones
not installed yet, or removed). The real server answers that with its plain-text ``404 page not
found``, which names nothing, so the watcher says it in one line naming the CRD
(``fleets.agones.dev``), at most every ``missing_crd_log_interval``, counts it in
``image_syncer_broadcaster_crd_missing_total``, keeps retrying, and says once when the CRD is
served again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3.exceptions
from kubernetes import client
from kubernetes.watch.watch import iter_resp_lines

from broadcaster import metrics
from broadcaster.settings import Settings, WatchTarget
from ops.logs import describe_error
from ops.retry import Backoff
from wire.contract import Kind

__all__ = ["Change", "Listed", "Watcher"]

log = logging.getLogger(__name__)

GROUP, VERSION = "agones.dev", "v1"
PLURALS = {Kind.FLEET: "fleets", Kind.GAMESERVER: "gameservers"}

# What a failed request looks like: an HTTP error status, a broken connection, a bad body.
_REQUEST_ERRORS = (client.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)


@dataclass(frozen=True)
class Listed:
    """The whole state of the target at ``resource_version``."""

    objects: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class Change:
    """One watch event: ``type`` is ADDED, MODIFIED or DELETED."""

    type: str
    obj: dict[str, Any]


class _Expired(Exception):
    """The watch's resourceVersion is gone from the server's history: relist."""


class _NotServed(Exception):
    """The resource is not served any more (its CRD was deleted): list, which says so."""


class _Stopped(Exception):
    """The watcher was stopped while handing an item over."""


class Watcher:
    def __init__(
        self,
        api: client.CustomObjectsApi,
        target: WatchTarget,
        settings: Settings,
        queue: asyncio.Queue[Listed | Change],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.api, self.target, self.settings = api, target, settings
        self.queue, self.loop = queue, loop
        self._stopping = threading.Event()
        self._response: Any = None
        self._crd = f"{PLURALS[target.kind]}.{GROUP}"
        self._crd_said_at: float | None = None  # monotonic time of the last "not installed" line
        self._thread = threading.Thread(target=self._run, name=f"watch {target}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop, cutting an open watch short; :meth:`join` waits for it."""
        self._stopping.set()
        response = self._response
        if response is not None:
            # Best effort: the blocked read ends either way, with an error or with the stream.
            with contextlib.suppress(Exception):
                response.shutdown()

    async def join(self, timeout: float) -> None:
        await asyncio.to_thread(self._thread.join, timeout)

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while not self._stopping.is_set():
            try:
                resource_version = self._list()
                backoff.reset()
                self._watch_from(resource_version)
            except _Stopped:
                return
            except _Expired:
                metrics.WATCH_RESTARTS.labels(kind=str(self.target.kind), reason="expired").inc()
                log.info("watch expired, relisting", extra={"target": str(self.target)})
            except _NotServed:
                metrics.WATCH_RESTARTS.labels(kind=str(self.target.kind), reason="error").inc()
            except _REQUEST_ERRORS as e:
                metrics.WATCH_RESTARTS.labels(kind=str(self.target.kind), reason="error").inc()
                delay = backoff.next_delay()
                if isinstance(e, client.ApiException) and e.status == 404:
                    self._crd_missing(delay)
                    self._stopping.wait(delay)
                    continue
                log.warning(
                    "list failed, retrying",
                    extra={
                        "target": str(self.target),
                        "error": _describe(e),
                        "retry_in": round(delay, 2),
                    },
                )
                self._stopping.wait(delay)
            except Exception:
                # A bug must not kill the thread silently: log it, back off, start over.
                log.exception("watcher failed, restarting", extra={"target": str(self.target)})
                self._stopping.wait(backoff.next_delay())

    def _crd_missing(self, retry_in: float) -> None:
        metrics.CRD_MISSING.labels(crd=self._crd).inc()
        now = time.monotonic()
        interval = self.settings.missing_crd_log_interval
        if self._crd_said_at is not None and now - self._crd_said_at < interval:
            return
        self._crd_said_at = now
        log.warning(
            "CRD not installed, is Agones installed? retrying",
            extra={
                "crd": self._crd,
                "target": str(self.target),
                "retry_in": round(retry_in, 2),
                "said_again_in": interval,
            },
        )

    def _call(self, **kwargs: Any) -> Any:
        common: dict[str, Any] = {
            "group": GROUP,
            "version": VERSION,
            "plural": PLURALS[self.target.kind],
            "label_selector": self.settings.label_selector or None,
        }
        if self.target.namespace is None:
            return self.api.list_cluster_custom_object(**common, **kwargs)
        return self.api.list_namespaced_custom_object(
            namespace=self.target.namespace, **common, **kwargs
        )

    def _list(self) -> str:
        listing = self._call(_request_timeout=(5.0, 60.0))
        if self._crd_said_at is not None:
            self._crd_said_at = None
            log.info("CRD installed, listing", extra={"crd": self._crd})
        resource_version = str(listing["metadata"]["resourceVersion"])
        objects = list(listing.get("items") or [])
        log.info(
            "listed",
            extra={
                "target": str(self.target),
                "objects": len(objects),
                "resource_version": resource_version,
            },
        )
        self._hand_over(Listed(objects, resource_version))
        return resource_version

    def _watch_from(self, resource_version: str) -> None:
        """Watch until stopped; raises _Expired when only a relist can go on."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while not self._stopping.is_set():
            try:
                for event in self._events(resource_version):
                    resource_version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._hand_over(Change(event["type"], event["object"]))
                    backoff.reset()
                reason = "closed"
            except client.ApiException as e:
                if e.status == 410:
                    raise _Expired from e
                if e.status == 404:
                    raise _NotServed from e
                reason = self._failed(e)
            except (urllib3.exceptions.HTTPError, OSError, ValueError, KeyError) as e:
                reason = self._failed(e)
            if self._stopping.is_set():
                return
            metrics.WATCH_RESTARTS.labels(kind=str(self.target.kind), reason=reason).inc()
            if reason == "error":
                self._stopping.wait(backoff.next_delay())

    def _failed(self, error: Exception) -> str:
        # Cutting the watch short is how stop() works: not worth a warning.
        if not self._stopping.is_set():
            log.warning(
                "watch failed", extra={"target": str(self.target), "error": _describe(error)}
            )
        return "error"

    def _events(self, resource_version: str) -> Iterator[dict[str, Any]]:
        timeout = max(1, int(self.settings.watch_timeout))
        response = self._call(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(5.0, timeout + self.settings.watch_grace),
        )
        self._response = response
        try:
            if not 200 <= response.status <= 299:
                raise client.ApiException(status=response.status, reason=response.reason)
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise client.ApiException(
                        status=status.get("code"),
                        reason=f"{status.get('reason')}: {status.get('message')}",
                    )
                yield event
        finally:
            self._response = None
            response.release_conn()

    def _hand_over(self, item: Listed | Change) -> None:
        """Block until the event loop took the item, or until stopping."""
        try:
            future = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        except RuntimeError as e:  # the loop is closed: the process is going away
            raise _Stopped from e
        while True:
            try:
                future.result(timeout=0.5)
                return
            except concurrent.futures.TimeoutError:
                if self._stopping.is_set():
                    future.cancel()
                    raise _Stopped from None


def _describe(error: BaseException) -> str:
    if isinstance(error, client.ApiException):
        # Never the body or headers: they may echo request details.
        return f"HTTP {error.status}: {error.reason}"
    return describe_error(error)
