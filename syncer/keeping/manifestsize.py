"""How many bytes a pull will put on the disk, read from the image's manifest before it starts.

The disk budget (:mod:`syncer.keeping.diskbudget`) must charge a pull with what it will add, before
it adds it: a reading of the disk shows a pull only once it is done, so pulls admitted together, or
one large pull, would pass a budget that only reads the disk. The runtime cannot say (CRI has
no "size of a reference"), but the registry can: the manifest lists every layer's compressed
size. So, before a pull, one ``GET /v2/<repository>/manifests/<tag or digest>`` (an index is
followed to this node's platform), with the credentials the pull itself would use
(:mod:`syncer.pulling.registryauth`): anonymous, Basic, or the Bearer token flow of the
distribution spec (a token from the challenge's realm, asked with Basic credentials when there
are some). The answer is cached per reference, a tag for a while (it may move), a digest for
good.

A size is an estimate and a safety net only: any failure (a registry that needs a login flow
this does not speak, a timeout, a manifest we cannot read) gives None, and the budget then
charges the pull nothing of its own and relies on its readings. Credentials go only to the
registry and its token realm (https, or plain http on loopback as containerd allows), never into
a log line or an error text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import platform
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from syncer.folding.references import ImageRef
from syncer.runtime.cri import RegistryAuth

__all__ = ["ManifestSizes"]

log = logging.getLogger(__name__)

_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
# A manifest is a few kB; an index of many platforms a few tens. Refuse more: it is not one.
_MAX_BODY = 4 * 1024 * 1024
_TAG_TTL = 600.0
_MAX_CACHED = 4096
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')

Auths = Callable[[ImageRef], Sequence[RegistryAuth]]


class ManifestSizes:
    """``await sizes.of(image)``: the compressed bytes of ``image``'s layers and config, or None."""

    def __init__(
        self,
        auth_for: Auths = lambda _: (),
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth_for = auth_for
        self._timeout = timeout
        self._clock = clock
        self._cache: dict[ImageRef, tuple[int | None, float]] = {}  # size, expiry

    async def of(self, image: ImageRef) -> int | None:
        cached = self._cache.get(image)
        now = self._clock()
        if cached is not None and cached[1] > now:
            return cached[0]
        # As the pull itself (syncer.pulling.puller): each credential in turn, anonymous without
        # any.
        auths: list[RegistryAuth | None] = [*self._auth_for(image)] or [None]
        size: int | None
        try:
            size = await asyncio.wait_for(
                _in_daemon_thread(_size_of, image, auths, self._timeout), self._timeout * 2
            )
        except (_Refused, OSError, ValueError, KeyError, TypeError, TimeoutError) as e:
            # The text names the image and the problem, never a header or a credential.
            log.debug("image size unknown", extra={"image": str(image), "error": _safe(e)})
            size = None
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        # Unknown is remembered a while too: a registry we cannot ask is not asked per pull.
        ttl = _TAG_TTL if size is None or not image.digest else float("inf")
        self._cache[image] = (size, now + ttl)
        return size


async def _in_daemon_thread(work: Callable[..., int], *args: Any) -> int:
    """``work(*args)`` in a daemon thread: a registry that holds the connection open must not
    hold up the process's exit, as a thread of the default executor would (it is joined)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        def on_loop() -> None:
            if not done.done():  # the awaiting coroutine may have given up
                setter(value)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(on_loop)

    def run() -> None:
        try:
            value = work(*args)
        except BaseException as e:  # handed to the awaiting coroutine
            deliver(done.set_exception, e)
        else:
            deliver(done.set_result, value)

    threading.Thread(target=run, name="manifest size", daemon=True).start()
    return await done


class _Refused(Exception):
    """The registry answered with an error status (its body and headers are not kept)."""

    def __init__(self, code: int, challenge: str = "") -> None:
        super().__init__(f"HTTP {code}")
        self.code = code
        self.challenge = challenge


def _safe(error: BaseException) -> str:
    if isinstance(error, (_Refused, ValueError)):
        return str(error)
    return type(error).__name__


def _size_of(image: ImageRef, auths: Sequence[RegistryAuth | None], timeout: float) -> int:
    registry = _Registry(image, timeout)
    last: Exception | None = None
    for auth in auths:
        try:
            manifest = registry.manifest(image.digest or image.tag or "latest", auth)
            if "manifests" in manifest:  # an index: this node's platform
                manifest = registry.manifest(_platform_digest(manifest), auth)
            return _manifest_bytes(manifest)
        except _Refused as e:
            if e.code not in (401, 403):
                raise
            last = e  # the next credentials, if any
    assert last is not None
    raise last


def _manifest_bytes(manifest: dict[str, Any]) -> int:
    blobs = [manifest["config"], *manifest["layers"]]
    sizes = [blob["size"] for blob in blobs]
    if not all(isinstance(size, int) and size >= 0 for size in sizes):
        raise ValueError("manifest sizes are not byte counts")
    return sum(sizes)


def _platform_digest(index: dict[str, Any]) -> str:
    arch = _ARCHITECTURES.get(platform.machine(), platform.machine())
    for entry in index["manifests"]:
        found = entry.get("platform") or {}
        if found.get("os") == "linux" and found.get("architecture") == arch:
            digest = entry["digest"]
            if not isinstance(digest, str) or not digest.startswith("sha256:"):
                raise ValueError("index entry without a sha256 digest")
            return digest
    raise ValueError(f"no linux/{arch} manifest in the index")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header to another host: not followed."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class _Registry:
    """The two or three HTTP requests of one manifest read, as containerd would send them."""

    def __init__(self, image: ImageRef, timeout: float) -> None:
        host, _, repository = image.name.partition("/")
        self.host = "registry-1.docker.io" if host == "docker.io" else host
        self.scheme = "http" if _loopback(self.host) else "https"
        self.repository = repository
        self.timeout = timeout

    def manifest(self, reference: str, auth: RegistryAuth | None) -> dict[str, Any]:
        url = f"{self.scheme}://{self.host}/v2/{self.repository}/manifests/{reference}"
        headers = {"Accept": _ACCEPT}
        try:
            return _json(self._get(url, headers))
        except _Refused as e:
            if e.code != 401:
                raise
            challenge = e.challenge
        headers["Authorization"] = self._authorization(challenge, auth)
        return _json(self._get(url, headers))

    def _authorization(self, challenge: str, auth: RegistryAuth | None) -> str:
        scheme, _, params = challenge.partition(" ")
        if auth is not None and auth.registry_token:
            return f"Bearer {auth.registry_token}"
        basic = _basic(auth)
        if scheme.lower() == "basic":
            if basic is None:
                raise ValueError("the registry asks for credentials and there are none")
            return basic
        if scheme.lower() != "bearer":
            raise ValueError(f"unsupported registry auth scheme {scheme[:20]!r}")
        fields = dict(_CHALLENGE_PARAM.findall(params))
        realm = fields.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme != "https" and not (parts.scheme == "http" and _loopback(parts.hostname)):
            raise ValueError("token realm is not https")
        query = {k: fields[k] for k in ("service", "scope") if k in fields}
        query.setdefault("scope", f"repository:{self.repository}:pull")
        url = f"{realm}?{urllib.parse.urlencode(query)}"
        answer = _json(self._get(url, {"Authorization": basic} if basic else {}))
        token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ValueError("the token realm gave no token")
        return f"Bearer {token}"

    def _get(self, url: str, headers: dict[str, str]) -> bytes:
        request = urllib.request.Request(url, headers=headers)
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                body: bytes = response.read(_MAX_BODY + 1)
        except urllib.error.HTTPError as e:
            with e:  # closes its connection
                raise _Refused(e.code, e.headers.get("WWW-Authenticate", "")) from None
        if len(body) > _MAX_BODY:
            raise ValueError("manifest answer too large")
        return body


def _basic(auth: RegistryAuth | None) -> str | None:
    if auth is None:
        return None
    if auth.auth:
        return f"Basic {auth.auth}"
    if auth.username:
        pair = f"{auth.username}:{auth.password}".encode()
        return f"Basic {base64.b64encode(pair).decode()}"
    return None


def _json(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("answer is not a JSON object")
    return value


def _loopback(host: str | None) -> bool:
    name = (host or "").rsplit(":", 1)[0].strip("[]")
    return name in ("localhost", "::1") or name.startswith("127.")
