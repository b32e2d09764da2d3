"""How every process of the project connects to NATS: servers, credentials, reconnection.

Long-running processes retry the first connection (NATS may start after them in a cluster) and
reconnect forever; one-shot CLI commands fail fast with one clear line instead.

With a token file (a Kubernetes projected ServiceAccount token, rotated by the kubelet) the file is
read again on every (re)connect, and a session that the server ends because its authorization
expired (the auth callout bounds it by the token's lifetime) reconnects with the fresh token
instead of closing the client for good, as nats-py would on any other server error.

What nats.py raises when a server is unreachable, restarting or lost its store is one tuple,
:data:`RETRYABLE`, so every retry loop agrees on which failures are worth another try.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field, replace
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from ops.logs import describe_error
from ops.retry import Backoff, retry

__all__ = [
    "RETRYABLE",
    "NatsSettings",
    "NatsUnavailable",
    "connect",
    "is_connected",
    "next_reconnect",
    "read_token_file",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"

# What a lost connection, a restarting server or a missing stream look like from nats.py.
RETRYABLE = (nats.errors.Error, TimeoutError, OSError)


class NatsUnavailable(ConnectionError):
    """No NATS server answered; the message names the servers tried (never credentials)."""


@dataclass(frozen=True)
class NatsSettings:
    servers: tuple[str, ...] = (DEFAULT_URL,)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None
    # Reply subjects start here; per-identity permissions admit only the identity's own prefix.
    inbox_prefix: str | None = None
    connect_timeout: float = 2.0

    def with_inbox(self, prefix: str) -> NatsSettings:
        """These settings with a role's inbox prefix, unless one was set explicitly."""
        return self if self.inbox_prefix else replace(self, inbox_prefix=prefix)

    def safe_servers(self) -> str:
        """The servers for logs, without any user:password@ that a URL may carry."""
        return ",".join(_strip_userinfo(s) for s in self.servers)


def read_token_file(path: str) -> str:
    """The token as the file holds it now; an unreadable file is an empty token (refused)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        log.warning("nats token file unreadable", extra={"path": path, "error": describe_error(e)})
        return ""


# What nats-server says before it closes a connection whose user JWT expired.
_EXPIRED = "authentication expired"


class _Client(Client):
    """nats-py's client, except that an expired session reconnects instead of closing, and
    that a waiter can learn of the next reconnect (``next_reconnect``)."""

    def __init__(self) -> None:
        super().__init__()
        # Set at the next reconnect, then replaced by a fresh one for the one after.
        self.next_reconnect = asyncio.Event()
        # Set once this process drains or closes the connection itself: the disconnect that
        # follows is the clean stop, not news worth a warning.
        self.stopping = False

    async def drain(self) -> None:
        self.stopping = True
        await super().drain()

    async def close(self) -> None:
        self.stopping = True
        await super().close()

    def _mark_reconnected(self) -> None:
        done, self.next_reconnect = self.next_reconnect, asyncio.Event()
        done.set()

    async def _process_err(self, err_msg: str) -> None:
        if _EXPIRED in err_msg.lower():
            # The server closes the socket next; the read loop's reconnect takes over from there.
            log.info("nats session expired, reconnecting with a fresh token")
            return
        await super()._process_err(err_msg)


async def _open(options: dict[str, Any]) -> Client:
    client = _Client()
    report = options.get("reconnected_cb")
    report_disconnect = options.get("disconnected_cb")

    async def reconnected() -> None:
        client._mark_reconnected()
        if report is not None:
            await report()

    async def disconnected() -> None:
        if client.stopping:
            log.debug("nats connection closed")
        elif report_disconnect is not None:
            await report_disconnect()

    await client.connect(
        **{**options, "reconnected_cb": reconnected, "disconnected_cb": disconnected}
    )
    return client


def _strip_userinfo(url: str) -> str:
    scheme, sep, rest = url.rpartition("://")
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}{sep}{host}"


async def connect(settings: NatsSettings, *, name: str, retry_forever: bool = False) -> Client:
    """Connect with the project's defaults; raise NatsUnavailable unless ``retry_forever``."""
    if not retry_forever:
        return await _connect_once(settings, name)

    def report(error: BaseException, delay: float) -> None:
        log.warning(
            "nats unreachable, retrying servers=%s error=%r retry_in=%.1fs",
            settings.safe_servers(),
            describe_error(error),
            delay,
        )

    return await retry(
        lambda: _open(_options(settings, name)),
        retry_on=RETRYABLE,
        backoff=Backoff(0.5, 10.0, jitter=False),
        on_retry=report,
    )


def is_connected(js: JetStreamContext) -> bool:
    """Whether the connection under ``js`` is up (nats.py keeps it in a private attribute)."""
    return bool(js._nc.is_connected)


def next_reconnect(js: JetStreamContext) -> asyncio.Event:
    """Set when the connection under ``js`` next reconnects: requests in flight on the old
    connection (a held pull request) are lost then. Never set for a client not made here."""
    nc = js._nc
    return nc.next_reconnect if isinstance(nc, _Client) else asyncio.Event()


async def _connect_once(settings: NatsSettings, name: str) -> Client:
    # nats-py retries the first connection forever when reconnects are unlimited (its server
    # pool never runs dry), so a one-shot command bounds the attempt itself, stays quiet about
    # the failed tries and reports the last one; once connected it reconnects like any client.
    failures: list[BaseException] = []
    connected = False
    options = _options(settings, name)
    report = options["error_cb"]

    async def error(e: Exception) -> None:
        if connected:
            await report(e)
        else:
            failures.append(e)

    report_disconnect = options["disconnected_cb"]
    client: Client | None = None

    async def disconnected() -> None:
        # A one-shot command closing its own connection is not news.
        if client is None or not client.is_closed:
            await report_disconnect()

    options["error_cb"] = error
    options["disconnected_cb"] = disconnected
    try:
        client = await asyncio.wait_for(_open(options), settings.connect_timeout + 1)
    except RETRYABLE as e:
        # A server's own refusal (authorization, TLS) says more than the reset that follows it.
        refusals = [f for f in failures if isinstance(f, nats.errors.Error)]
        cause = (refusals or failures or [e])[-1]
        raise NatsUnavailable(
            f"cannot connect to NATS at {settings.safe_servers()}: {describe_error(cause)}"
        ) from e
    connected = True
    return client


def _options(settings: NatsSettings, name: str) -> dict[str, Any]:
    async def disconnected() -> None:
        log.warning("nats disconnected", extra={"servers": settings.safe_servers()})

    async def reconnected() -> None:
        log.info("nats reconnected", extra={"servers": settings.safe_servers()})

    async def error(e: Exception) -> None:
        log.warning("nats error", extra={"error": describe_error(e)})

    options: dict[str, Any] = {
        "servers": list(settings.servers),
        "name": name,
        "connect_timeout": settings.connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password or ""
    if settings.token:
        options["token"] = settings.token
    if settings.token_file:
        token_file = settings.token_file
        options["token"] = lambda: read_token_file(token_file)
    if settings.inbox_prefix:
        options["inbox_prefix"] = settings.inbox_prefix
    if settings.creds_file:
        options["user_credentials"] = settings.creds_file
    if settings.tls_ca:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca)
    return options
