"""The HTTP endpoints every long-running process serves: /healthz, /readyz and /metrics.

Liveness means "the loops are turning": each loop calls ``health.beat(name)``, and /healthz fails
once a loop has been silent for longer than its allowance. Readiness means "this process can do
its job": each dependency (NATS, the runtime, the initial replay) reports itself with
``health.set(name, ok, reason)``, and /readyz fails while any is false. Both answer with a small
text body saying which check failed, for a person running curl.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from ops.buildinfo import record_build_info

__all__ = ["Health", "serve_http"]

log = logging.getLogger(__name__)


@dataclass
class Health:
    _ready: dict[str, tuple[bool, str]] = field(default_factory=dict)
    _beats: dict[str, tuple[float, float]] = field(default_factory=dict)

    def set(self, check: str, ok: bool, reason: str = "") -> None:
        self._ready[check] = (ok, reason)

    def beat(self, loop: str, allowance: float) -> None:
        """Loop ``loop`` is alive; it must beat again within ``allowance`` seconds."""
        self._beats[loop] = (time.monotonic(), allowance)

    def forget(self, loop: str) -> None:
        self._beats.pop(loop, None)

    def live(self) -> tuple[bool, str]:
        now = time.monotonic()
        stuck = [
            f"{name} silent for {now - at:.0f}s"
            for name, (at, allowance) in self._beats.items()
            if now - at > allowance
        ]
        return (not stuck, "; ".join(stuck) or "ok")

    def ready(self) -> tuple[bool, str]:
        failing = [
            f"{name}: {reason or 'not ready'}"
            for name, (ok, reason) in self._ready.items()
            if not ok
        ]
        return (not failing, "; ".join(failing) or "ok")


async def serve_http(
    host: str, port: int, health: Health, registry: CollectorRegistry = REGISTRY
) -> asyncio.Server:
    """Start serving; the caller closes the returned server on shutdown."""
    record_build_info()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            # Drain the headers; no endpoint takes a body.
            end_of_headers = (b"\r\n", b"\n", b"")
            while await asyncio.wait_for(reader.readline(), timeout=5) not in end_of_headers:
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            status, content_type, body = _respond(path, health, registry)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    log.info("serving health and metrics", extra={"addr": f"{host}:{port}"})
    return server


def _respond(path: str, health: Health, registry: CollectorRegistry) -> tuple[str, str, bytes]:
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
    if path in ("/healthz", "/livez"):
        ok, reason = health.live()
    elif path == "/readyz":
        ok, reason = health.ready()
    else:
        return "404 Not Found", "text/plain", b"not found\n"
    status = "200 OK" if ok else "503 Service Unavailable"
    return status, "text/plain; charset=utf-8", (reason + "\n").encode()


def parse_addr(addr: str) -> tuple[str, int]:
    """``:9090`` or ``0.0.0.0:9090`` -> (host, port); an empty host means all interfaces."""
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"address {addr!r} must be [host]:port, e.g. :9090")
    return host or "0.0.0.0", int(port)
