"""Build tiny OCI images and push them to a registry over its HTTP API, with no Docker at all.

Tests need images that exist only in their own registry, unique per test so that one test's pull
never satisfies another's, and benchmarks need images of a chosen size. An image here is one
gzipped tar layer holding one file, a config naming that layer's diff_id, and an OCI manifest:
the smallest thing containerd will pull and unpack.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import platform
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from image_syncer.sandbox.registry import basic_auth_header

__all__ = ["OciImage", "PushFailed", "build_image", "push_image"]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}


class PushFailed(RuntimeError):
    """The registry refused part of a push; the message says which request and why."""


@dataclass(frozen=True)
class OciImage:
    """The three documents of an image, ready to upload."""

    layer: bytes
    config: bytes
    manifest: bytes

    @property
    def digest(self) -> str:
        return _digest(self.manifest)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer_tar(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("payload")
        info.size = len(payload)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def build_image(*, layer_bytes: int | None = None, unique: bool = True) -> OciImage:
    """An image whose layer holds ``layer_bytes`` bytes (random, so incompressible) or a marker.

    With ``unique`` the content differs on every call, so the manifest digest does too; without it,
    equal arguments give the same digest (gzip's mtime is pinned).
    """
    marker = uuid.uuid4().hex.encode() if unique else b"image-syncer"
    if layer_bytes is None:
        payload = b"image-syncer test image " + marker + b"\n"
    else:
        payload = (marker + os.urandom(layer_bytes) if unique else b"\0" * layer_bytes)[
            :layer_bytes
        ]
    tar = _layer_tar(payload)
    layer = gzip.compress(tar, mtime=0)
    arch = _ARCHITECTURES.get(platform.machine(), platform.machine())
    config = _json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/payload"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(tar)]},
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": _digest(layer), "size": len(layer)}],
        }
    )
    return OciImage(layer=layer, config=config, manifest=manifest)


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def push_image(
    registry_address: str,
    repository: str,
    tag: str,
    *,
    layer_bytes: int | None = None,
    unique: bool = True,
    auth: tuple[str, str] | None = None,
    image: OciImage | None = None,
) -> str:
    """Push a fresh image (or ``image``) as ``repository:tag``; returns its manifest digest."""
    image = image or build_image(layer_bytes=layer_bytes, unique=unique)
    session = _RegistrySession(f"http://{registry_address}", repository, auth)
    session.upload_blob(image.layer)
    session.upload_blob(image.config)
    session.put_manifest(tag, image.manifest)
    return image.digest


class _RegistrySession:
    """The few Distribution API calls a push needs (blob upload, manifest put)."""

    def __init__(self, base: str, repository: str, auth: tuple[str, str] | None) -> None:
        self.base = base
        self.repository = repository
        self.headers = {"Authorization": basic_auth_header(auth)} if auth else {}

    def upload_blob(self, data: bytes) -> None:
        digest = _digest(data)
        start = self._send("POST", f"/v2/{self.repository}/blobs/uploads/", b"", {})
        location = urllib.parse.urljoin(self.base, start.headers["Location"])
        separator = "&" if "?" in location else "?"
        target = f"{location}{separator}digest={urllib.parse.quote(digest)}"
        self._send("PUT", target, data, {"Content-Type": "application/octet-stream"})

    def put_manifest(self, tag: str, manifest: bytes) -> None:
        path = f"/v2/{self.repository}/manifests/{tag}"
        self._send("PUT", path, manifest, {"Content-Type": MANIFEST_TYPE})

    def _send(
        self, method: str, target: str, body: bytes, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        url = target if target.startswith("http") else self.base + target
        request = urllib.request.Request(
            url, data=body, method=method, headers={**self.headers, **headers}
        )
        try:
            response: http.client.HTTPResponse
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                return response
        except urllib.error.HTTPError as e:
            # The URL carries no credentials (they travel in a header), so it is safe to show.
            reason = e.read(500).decode(errors="replace")
            where = urllib.parse.urlsplit(url).path
            raise PushFailed(f"{method} {where} -> {e.code} {e.reason}: {reason}") from None
