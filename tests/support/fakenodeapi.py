"""A fake API server for the syncer's own Node: GET /api/v1/nodes/<name>, bearer-token auth.

Answers as the real API server does for that one path: the v1 Node object, or a v1 Status object
(401 without the token, 404 for another node, 503 while ``down``), shapes from ``kubectl get node
-o json`` and the apimachinery ``metav1.Status`` type.
"""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["FakeApiServer", "OpenApiServer"]


class FakeApiServer:
    """GET /api/v1/nodes/<name> with bearer-token auth, answering v1 Node or v1 Status objects."""

    def __init__(self, node: dict[str, Any], token: str) -> None:
        self.nodes = {node["metadata"]["name"]: node}
        self.token = token
        self.requests: list[tuple[str, str | None]] = []
        self.down = False
        self.third_request = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Authorization")))
                if len(server.requests) >= 3:
                    server.third_request.set()
                server.answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        if self.down:
            return self._status(handler, 503, "ServiceUnavailable", "etcdserver: leader changed")
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(handler, 401, "Unauthorized", "Unauthorized")
        prefix = "/api/v1/nodes/"
        name = handler.path[len(prefix) :] if handler.path.startswith(prefix) else ""
        if name not in self.nodes:
            return self._status(handler, 404, "NotFound", f'nodes "{name}" not found')
        self._send(handler, 200, self.nodes[name])

    def _status(
        self, handler: BaseHTTPRequestHandler, code: int, reason: str, message: str
    ) -> None:
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        self._send(handler, code, status)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.httpd.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class OpenApiServer(FakeApiServer):
    """The fake API server without authentication (the syncer runs outside a cluster here)."""

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        name = handler.path.removeprefix("/api/v1/nodes/")
        if name not in self.nodes:
            return self._status(handler, 404, "NotFound", f'nodes "{name}" not found')
        self._send(handler, 200, self.nodes[name])
