"""The few NATS JWTs an auth callout reads and writes, encoded by hand on top of ``nkeys``.

A NATS JWT is a plain JWS: ``base64url(header).base64url(claims).base64url(signature)``, header
``{"typ":"JWT","alg":"ed25519-nkey"}``, the signature an ed25519 signature of the first two parts
by an nkey. The callout needs three claim sets of the v2 schema (nats-io/jwt): it decodes the
server's ``authorization_request`` and encodes a ``user`` and an ``authorization_response``. The one
Python package for this (``nats-jwt``) is young and little used, while the encoding is thirty
lines and the real nats-server checks it in the tests; ``nkeys`` (the NATS project's own) signs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import nkeys

__all__ = [
    "AuthRequest",
    "JwtError",
    "Signer",
    "decode_request",
    "encode_response",
    "encode_user",
    "new_account_seed",
]

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_NO_LIMIT = -1


class JwtError(ValueError):
    """A JWT that is not one, or not the kind expected; the text says which part is wrong."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_account_seed() -> str:
    """A fresh account nkey seed (``SA...``): the callout's signing key."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT)
    return seed.decode()


class Signer:
    """An account nkey that issues users; the server trusts its public key as the issuer."""

    def __init__(self, seed: str) -> None:
        try:
            self._keys = nkeys.from_seed(seed.strip().encode())
            self.public_key: str = self._keys.public_key.decode()
        except (nkeys.NkeysError, ValueError) as e:
            raise JwtError("the issuer seed is not an nkey seed") from e
        if not self.public_key.startswith("A"):
            raise JwtError("the issuer seed is not an account seed (SA...)")

    def encode(self, claims: dict[str, Any]) -> str:
        claims = {**claims, "iss": self.public_key, "iat": int(time.time())}
        # The claims' hash as their id, as nats-io/jwt computes it (SHA-512/256, base32).
        digest = hashlib.new("sha512_256", json.dumps(claims, sort_keys=True).encode()).digest()
        claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
        head = _b64(json.dumps(_HEADER).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = self._keys.sign(f"{head}.{body}".encode())
        return f"{head}.{body}.{_b64(signature)}"


@dataclass(frozen=True)
class AuthRequest:
    """What the server asks about one connecting client (its CONNECT options among them)."""

    server_id: str
    user_nkey: str
    token: str = field(default="", repr=False)
    client_host: str = ""
    client_name: str = ""


def _decode(token: str) -> dict[str, Any]:
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError(f"expected 3 dot-separated parts, got {len(parts)}")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, UnicodeDecodeError) as e:
        raise JwtError(f"undecodable JWT: {e}") from e
    if not isinstance(header, dict) or header.get("alg") != _HEADER["alg"]:
        raise JwtError("not an ed25519-nkey JWT")
    if not isinstance(claims, dict) or not isinstance(claims.get("nats"), dict):
        raise JwtError("no nats claims")
    return claims


def decode_request(data: bytes) -> AuthRequest:
    """The server's ``authorization_request`` (unencrypted: docs/security.md says why)."""
    try:
        claims = _decode(data.decode())
    except UnicodeDecodeError as e:
        raise JwtError("not text: an encrypted request (xkey) is not supported") from e
    nats = claims["nats"]
    if nats.get("type") != "authorization_request":
        raise JwtError(f"expected an authorization_request, got {nats.get('type')!r}")
    server_id = (nats.get("server_id") or {}).get("id", "")
    user_nkey = nats.get("user_nkey", "")
    if not server_id or not user_nkey:
        raise JwtError("authorization_request without server id or user nkey")
    options = nats.get("connect_opts") or {}
    client = nats.get("client_info") or {}
    return AuthRequest(
        server_id=server_id,
        user_nkey=user_nkey,
        token=options.get("auth_token") or "",
        client_host=client.get("host", ""),
        client_name=options.get("name") or client.get("name", ""),
    )


def encode_user(
    signer: Signer,
    request: AuthRequest,
    *,
    name: str,
    account: str,
    publish: tuple[str, ...],
    subscribe: tuple[str, ...],
    expires: int | None,
) -> str:
    """A user JWT for the connecting client: its account, allow-lists and expiry."""
    claims: dict[str, Any] = {
        "sub": request.user_nkey,
        "name": name,
        # Outside operator mode the audience names the account the user is placed into.
        "aud": account,
        "nats": {
            "pub": {"allow": list(publish)},
            "sub": {"allow": list(subscribe)},
            "subs": _NO_LIMIT,
            "data": _NO_LIMIT,
            "payload": _NO_LIMIT,
            "type": "user",
            "version": 2,
        },
    }
    if expires is not None:
        claims["exp"] = expires
    return signer.encode(claims)


def encode_response(
    signer: Signer, request: AuthRequest, *, user_jwt: str = "", error: str = ""
) -> bytes:
    """The answer to one request: a user JWT, or an error the server logs and refuses with."""
    nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user_jwt:
        nats["jwt"] = user_jwt
    if error:
        nats["error"] = error
    claims = {"sub": request.user_nkey, "aud": request.server_id, "nats": nats}
    return signer.encode(claims).encode()
