"""The syncer's own Node: its labels and taints, read from the API server without a client library.

Node targeting (``--respect-scheduling``) needs the node's labels and taints, and nothing else
from Kubernetes. One read-only ``GET /api/v1/nodes/<name>`` with the pod's service-account token
gives them, so the syncer keeps its image small (no ``kubernetes`` package) and its RBAC grows by
exactly ``get`` on ``nodes``. Labels and taints change rarely (a node pool relabelled, a node
cordoned), so a periodic re-read (``--node-refresh``, default ``1m``) is enough.

A failed read keeps the last known node: a blip in the API server must not make every Fleet look
unschedulable. The failure is logged once, and the recovery once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ops.lifecycle import sleep_unless_stopping
from syncer.folding.scheduling import NodeInfo, Taint, schedulable
from syncer.settings.fleets import FleetSettings
from wire.contract import PodSpec

__all__ = [
    "ApiCallError",
    "ApiEndpoint",
    "NodeInfoError",
    "NodeWatcher",
    "api_call",
    "fetch_node",
    "node_path",
    "watcher_for",
]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_REFRESH = 60.0
_MAX_BODY = 4 * 1024 * 1024


class NodeInfoError(RuntimeError):
    """The Node could not be read; the text names the URL and the cause, never the token."""


# How admission refusals begin their text: a ValidatingAdmissionPolicy's
# ("... is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: ...",
# dispatcher.go) and a validating webhook's ("admission webhook "w" denied the request: ...").
_ADMISSION_DENIALS = ("ValidatingAdmissionPolicy '", "admission webhook ")


class ApiCallError(NodeInfoError):
    """The API server answered with an error status (``code``: 404, 409, 403, ...).

    ``reason`` is the v1 Status ``reason`` when the answer had one (``Forbidden``,
    ``Invalid``, ...).
    """

    def __init__(self, message: str, code: int, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason

    @property
    def refused(self) -> bool:
        """Not allowed (RBAC, authentication or admission), as opposed to failed.

        An admission policy refuses with the reason its validation names (403 for Forbidden) or,
        when the validation names none or its expression fails to evaluate, 422 Invalid; a 422
        of an invalid object is not a refusal.
        """
        if self.code in (401, 403):
            return True
        return self.code == 422 and any(d in str(self) for d in _ADMISSION_DENIALS)


@dataclass(frozen=True)
class ApiEndpoint:
    """Where the API server is and how to prove who we are."""

    url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str] = os.environ, sa_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> ApiEndpoint:
        """From KUBERNETES_SERVICE_HOST/PORT and the mounted service account, as client-go does."""
        host = env.get("KUBERNETES_SERVICE_HOST")
        port = env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise NodeInfoError(
                "not running in a cluster: KUBERNETES_SERVICE_HOST/PORT are unset "
                "(give the API URL explicitly)"
            )
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", sa_dir / "token", sa_dir / "ca.crt")

    @classmethod
    def from_url(cls, url: str | None, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiEndpoint:
        """``url`` if given (tests, out-of-cluster), with the service account if it is mounted."""
        if not url:
            return cls.in_cluster(sa_dir=sa_dir)
        token, ca = sa_dir / "token", sa_dir / "ca.crt"
        return cls(url.rstrip("/"), token if token.exists() else None, ca if ca.exists() else None)


class _Metadata(msgspec.Struct):
    name: str
    labels: dict[str, str] | None = None


class _Taint(msgspec.Struct):
    key: str
    effect: str
    value: str = ""


class _NodeSpec(msgspec.Struct):
    taints: list[_Taint] | None = None


class _Node(msgspec.Struct):
    metadata: _Metadata
    spec: _NodeSpec = msgspec.field(default_factory=_NodeSpec)
    kind: str = "Node"


def parse_node(body: bytes) -> NodeInfo:
    """A v1 Node document to NodeInfo; NodeInfoError if it is not one."""
    try:
        node = msgspec.json.decode(body, type=_Node)
    except msgspec.DecodeError as e:
        raise NodeInfoError(f"the API server's answer is not a v1 Node: {e}") from e
    if node.kind != "Node":
        raise NodeInfoError(f"the API server answered a {node.kind!r}, not a Node")
    taints = tuple(Taint(t.key, t.effect, t.value) for t in node.spec.taints or ())
    return NodeInfo(node.metadata.name, dict(node.metadata.labels or {}), taints)


def api_call(
    endpoint: ApiEndpoint,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 10.0,
) -> bytes:
    """Blocking request to the API server; run it in a thread. Errors are :class:`ApiCallError`."""
    url = f"{endpoint.url}{path}"
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Accept": "application/json"}
    )
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    if endpoint.token_file is not None:
        # Re-read every time: bound service-account tokens are rotated in place by the kubelet.
        try:
            token = endpoint.token_file.read_text().strip()
        except OSError as e:
            raise NodeInfoError(f"cannot read token {endpoint.token_file}: {e.strerror}") from None
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if url.startswith("https://"):
        cafile = str(endpoint.ca_file) if endpoint.ca_file else None
        context = ssl.create_default_context(cafile=cafile)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            answer: bytes = response.read(_MAX_BODY)
            return answer
    except urllib.error.HTTPError as e:
        message, status_reason = _status_of(e)
        raise ApiCallError(f"{method} {url}: {e.code} {message}", e.code, status_reason) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NodeInfoError(f"{method} {url}: {reason}") from None


def node_path(name: str) -> str:
    return f"/api/v1/nodes/{urllib.parse.quote(name, safe='')}"


def fetch_node(endpoint: ApiEndpoint, name: str, *, timeout: float = 10.0) -> NodeInfo:
    """Blocking ``GET /api/v1/nodes/<name>``; run it in a thread."""
    return parse_node(api_call(endpoint, node_path(name), timeout=timeout))


def _status_of(error: urllib.error.HTTPError) -> tuple[str, str]:
    """The API server's own explanation (a v1 Status ``message``, else the HTTP reason) and the
    Status ``reason`` ("" when the body is no Status, e.g. the plain-text 404 page)."""
    try:
        status = json.loads(error.read(64 * 1024))
    except (OSError, ValueError):
        status = None
    if not isinstance(status, dict):
        status = {}
    message, reason = status.get("message"), status.get("reason")
    return str(message or error.reason)[:300], reason if isinstance(reason, str) else ""


class NodeWatcher:
    """The last known NodeInfo, refreshed every ``refresh`` seconds by :meth:`run`."""

    def __init__(
        self,
        endpoint: ApiEndpoint,
        name: str,
        *,
        refresh: float = DEFAULT_REFRESH,
        timeout: float = 10.0,
        on_change: Callable[[NodeInfo], None] | None = None,
        ignored_taints: frozenset[str] = frozenset(),
    ) -> None:
        self.endpoint = endpoint
        # The startup taint says "images not here yet"; a Fleet is not unschedulable for it.
        self.ignored_taints = ignored_taints
        self.name = name
        self.refresh = refresh
        self.timeout = timeout
        self.on_change = on_change
        self.current: NodeInfo | None = None
        self.failing = False

    async def refresh_once(self) -> bool:
        """Read the Node now; True if that worked. A failure keeps ``current``."""
        try:
            info = await asyncio.to_thread(
                fetch_node, self.endpoint, self.name, timeout=self.timeout
            )
        except NodeInfoError as e:
            if not self.failing:
                self.failing = True
                log.warning(
                    "node info unavailable, keeping the last known",
                    extra={"node": self.name, "error": str(e), "known": self.current is not None},
                )
            return False
        if self.failing:
            self.failing = False
            log.info("node info available again", extra={"node": self.name})
        if info != self.current:
            self.current = info
            log.info(
                "node info updated",
                extra={"node": self.name, "labels": len(info.labels), "taints": len(info.taints)},
            )
            if self.on_change is not None:
                self.on_change(info)
        return True

    async def run(self, stopping: asyncio.Event) -> None:
        """Refresh until ``stopping`` is set."""
        while not stopping.is_set():
            await self.refresh_once()
            await sleep_unless_stopping(stopping, self.refresh)

    def schedulable(self, pod_spec: PodSpec) -> tuple[bool, str]:
        """:func:`schedulable` against the last known node; admits all until one is known."""
        if self.current is None:
            return True, "node labels and taints not known yet"
        node = self.current
        if self.ignored_taints:
            kept = tuple(t for t in node.taints if t.key not in self.ignored_taints)
            node = dataclasses.replace(node, taints=kept)
        return schedulable(pod_spec, node)


def watcher_for(
    node: str, fleets: FleetSettings, *, taint: str, seed_label: str
) -> NodeWatcher | None:
    """The watcher of this node's labels and taints, when a setting needs them: scheduling
    (``--respect-scheduling``), the startup taint, a node label seeds are counted per."""
    if not fleets.respect_scheduling and not taint and not seed_label:
        return None
    endpoint = ApiEndpoint.from_url(fleets.kube_api_url)
    ignored = frozenset({taint}) if taint else frozenset()
    return NodeWatcher(endpoint, node, refresh=fleets.node_refresh, ignored_taints=ignored)
