"""The NATS auth callout: every connecting client becomes one identity with one role's permissions.

nats-server hands each CONNECT (except the callout's own user) to ``$SYS.REQ.USER.AUTH`` in the
callout account. Several replicas of this service share a queue group, so any one answers and none
is a single point of failure. For each request: the client's token goes to a Kubernetes
TokenReview (audience checked); the ServiceAccount picks the role (syncer, broadcaster, admin,
reader);
a syncer's node comes from the token's pod binding, never from the client; the answer is a user
JWT signed by the issuer key the server trusts, with that role's allow-lists from
:mod:`wire.permissions` and an expiry no later than the token's, so a rotated or revoked token
ends the session and the client reconnects with the new one. Anything else is refused with one
log line that says why (never the token).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from authcallout.natsjwt import (
    AuthRequest,
    JwtError,
    Signer,
    decode_request,
    encode_response,
    encode_user,
)
from authcallout.tokenreview import Identity, Refused, ReviewUnavailable, TokenReviewer
from ops.lifecycle import sleep_unless_stopping, until_stopping
from ops.serving import Health, parse_addr, serve_http
from wire.durables import ensure_node_durable
from wire.natsconn import NatsSettings, connect
from wire.nodestatus import StatusError
from wire.permissions import (
    ACCOUNT,
    JS_ACCOUNT,
    RolePermissions,
    admin_permissions,
    broadcaster_permissions,
    node_syncer_permissions,
    reader_permissions,
)

__all__ = ["AUTH_SUBJECT", "CalloutSettings", "Roles", "run", "serve"]

log = logging.getLogger(__name__)

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "image-syncer-auth"

REQUESTS = Counter(
    "image_syncer_auth_requests",
    "NATS connection attempts the callout answered, by result "
    "(authorized, refused, unavailable, malformed, error, provision_failed) and role.",
    ["result", "role"],
)


@dataclass(frozen=True)
class Roles:
    """Which ServiceAccounts (``namespace/name``) hold which role; any other is refused."""

    syncer: tuple[str, ...] = ("image-syncer-node/image-syncer-syncer",)
    broadcaster: tuple[str, ...] = ("image-syncer/image-syncer-broadcaster",)
    admin: tuple[str, ...] = ("image-syncer/image-syncer-admin",)
    # The staging Jobs of CD pipelines (deploy/rollout), one ServiceAccount per Fleet namespace:
    # none unless listed.
    reader: tuple[str, ...] = ()

    def permissions(self, identity: Identity, prefix: str) -> RolePermissions:
        ref = identity.account_ref
        if ref in self.syncer:
            if not identity.node:
                raise Refused(
                    f"service account {ref}: token not bound to a pod on a node "
                    "(a projected token, Kubernetes 1.30+)"
                )
            try:
                return node_syncer_permissions(identity.node, prefix)
            except StatusError as e:
                raise Refused(str(e)) from e
        if ref in self.broadcaster:
            return broadcaster_permissions(prefix, own_inbox=True)
        if ref in self.admin:
            return admin_permissions()
        if ref in self.reader:
            return reader_permissions(prefix)
        raise Refused(f"service account {ref} has no role here")


@dataclass(frozen=True)
class CalloutSettings:
    nats: NatsSettings
    issuer_seed_file: str
    audience: str = "nats"
    kubeconfig: str | None = None
    roles: Roles = field(default_factory=Roles)
    subject_prefix: str = "agones"
    # A session never outlives the token; this caps tokens that live longer (or carry no expiry).
    max_session: float = 3600.0
    max_concurrent: int = 32
    metrics_addr: str = ":8080"


def _user_name(role: RolePermissions, identity: Identity) -> str:
    return role.user if role.user.startswith("syncer:") else f"{role.user}:{identity.account_ref}"


class _Callout:
    def __init__(
        self, nc: Client, settings: CalloutSettings, signer: Signer, reviewer: TokenReviewer
    ) -> None:
        self.js = nc.jetstream(timeout=5.0)
        self.settings = settings
        self.signer = signer
        self.reviewer = reviewer
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_request(self, msg: Msg) -> None:
        # One request must not wait for another's TokenReview: answer each in its own task.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        async with self._slots:
            try:
                request = decode_request(msg.data)
            except JwtError as e:
                REQUESTS.labels("malformed", "").inc()
                log.warning("auth request undecodable, not answered", extra={"error": str(e)})
                return
            try:
                answer = await self._decide(request)
            except Exception as e:
                # A bug must not leave the client hanging until the server's timeout, unlogged.
                REQUESTS.labels("error", "").inc()
                log.exception("auth request failed", extra={"error": repr(e)})
                answer = encode_response(self.signer, request, error="auth callout error")
            try:
                await msg.respond(answer)
            except (nats.errors.Error, OSError) as e:
                log.warning("auth answer not sent", extra={"error": repr(e)})

    async def _decide(self, request: AuthRequest) -> bytes:
        where = {"client_host": request.client_host, "client_name": request.client_name}
        try:
            identity = await self.reviewer.review(request.token)
            role = self.settings.roles.permissions(identity, self.settings.subject_prefix)
        except Refused as e:
            REQUESTS.labels("refused", "").inc()
            log.warning("nats client refused", extra={"reason": str(e), **where})
            return encode_response(self.signer, request, error=f"refused: {e}")
        except ReviewUnavailable as e:
            REQUESTS.labels("unavailable", "").inc()
            log.warning("nats client not reviewed", extra={"reason": str(e), **where})
            return encode_response(self.signer, request, error="token review unavailable")
        if identity.node and role.user.startswith("syncer:"):
            await self._provision(identity.node)
        now = time.time()
        cap = now + self.settings.max_session
        expires = int(min(identity.expires or cap, cap))
        user = encode_user(
            self.signer,
            request,
            name=_user_name(role, identity),
            # The operator works inside the JetStream account; every other client outside it.
            account=JS_ACCOUNT if role.user == admin_permissions().user else ACCOUNT,
            publish=role.publish,
            subscribe=role.subscribe,
            expires=expires,
        )
        role_name = role.user.split(":", 1)[0]
        REQUESTS.labels("authorized", role_name).inc()
        log.info(
            "nats client authorized",
            extra={
                "role": role_name,
                "service_account": identity.account_ref,
                "node": identity.node or "",
                "expires_in": f"{expires - now:.0f}s",
                **where,
            },
        )
        return encode_response(self.signer, request, user_jwt=user)

    async def _provision(self, node: str) -> None:
        """The node's durable, which it may not create itself: made before it is let in."""
        try:
            if not await ensure_node_durable(self.js, node, self.settings.subject_prefix):
                log.warning("node durable not created: no Fleet stream yet", extra={"node": node})
        except (nats.errors.Error, TimeoutError, OSError) as e:
            # Let it in anyway: it reads the log and retries (reconnecting) until the durable is
            # there, rather than being locked out while NATS is slow.
            REQUESTS.labels("provision_failed", "syncer").inc()
            log.warning("node durable not created", extra={"node": node, "error": repr(e)})

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def serve(
    nc: Client, settings: CalloutSettings, signer: Signer, reviewer: TokenReviewer
) -> tuple[Subscription, _Callout]:
    """Subscribe the callout on ``nc``; returns (subscription, callout) for tests and ``run``."""
    callout = _Callout(nc, settings, signer, reviewer)
    sub = await nc.subscribe(AUTH_SUBJECT, queue=QUEUE, cb=callout.on_request)
    await nc.flush()
    return sub, callout


def load_signer(path: str) -> Signer:
    with open(path, encoding="utf-8") as f:
        return Signer(f.read())


async def run(settings: CalloutSettings, stopping: asyncio.Event) -> int:
    """Answer auth requests until ``stopping``; the exit code."""
    signer = load_signer(settings.issuer_seed_file)
    reviewer = TokenReviewer(settings.kubeconfig, settings.audience)
    health = Health()
    health.set("nats", False, "not connected")
    server = None
    if settings.metrics_addr:
        host, port = parse_addr(settings.metrics_addr)
        server = await serve_http(host, port, health)
    try:
        nc = await until_stopping(stopping, connect(settings.nats, name="auth", retry_forever=True))
        if nc is None:
            return 0
        sub, callout = await serve(nc, settings, signer, reviewer)
        health.set("nats", True)
        log.info(
            "auth callout serving",
            extra={"issuer": signer.public_key, "audience": settings.audience, "queue": QUEUE},
        )
        while not stopping.is_set():
            # Ready only while connected: a rollout waits for a replica that can answer, and the
            # operator sees which one is cut off.
            connected = nc.is_connected
            health.set("nats", connected, "" if connected else "disconnected, reconnecting")
            health.beat("callout", allowance=30.0)
            await sleep_unless_stopping(stopping, 1.0)
        # Leave the queue group first, so its other members take the new requests, then answer
        # what is in flight.
        await sub.unsubscribe()
        await callout.drain()
        await nc.close()
        return 0
    finally:
        if server is not None:
            server.close()
