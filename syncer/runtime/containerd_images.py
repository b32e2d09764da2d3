"""An asyncio client for containerd's native images service: read image records, set their labels.

CRI has no call that marks an image as pinned. containerd pins an image whose record carries the
label ``io.cri-containerd.pinned=pinned`` (its CRI plugin reports it as ``Image.pinned``, which
the kubelet's image garbage collector skips), and its native images service on the same socket
can set that label. The CRI plugin keeps its images in the containerd namespace ``k8s.io``; the
namespace travels as gRPC metadata on every call.

One pulled image is several records in containerd, one per name: the tag
(``docker.io/library/nginx:1.25``), the repo digest (``...nginx@sha256:...``) and the image id
(``sha256:...``), all pointing at the same target. :meth:`ContainerdImages.names_of` finds them
all by that target. Errors are the CRI client's (``CriError``, ``RuntimeUnavailable``), so a
caller handles one family of runtime errors.
"""

from __future__ import annotations

import builtins  # in the class below, `list` names a method
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from syncer.containerd_api import images_pb2
from syncer.containerd_api.images_pb2_grpc import ImagesStub
from syncer.runtime.cri import CriError, RuntimeUnavailable, grpc_target

__all__ = [
    "CRI_NAMESPACE",
    "PIN_LABEL",
    "PIN_VALUE",
    "ContainerdImages",
    "ImageRecord",
]

CRI_NAMESPACE = "k8s.io"
PIN_LABEL = "io.cri-containerd.pinned"
PIN_VALUE = "pinned"
_NAMESPACE_HEADER = "containerd-namespace"
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class ImageRecord:
    """One name of an image in containerd, the content it points at, and its labels."""

    name: str
    digest: str  # the target's digest (manifest or index): equal for every name of one image
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def pinned(self) -> bool:
        return self.labels.get(PIN_LABEL) == PIN_VALUE

    @classmethod
    def from_proto(cls, image: images_pb2.Image) -> ImageRecord:
        return cls(name=image.name, digest=image.target.digest, labels=dict(image.labels))


class ContainerdImages:
    """One channel to containerd's images service in one namespace; use it from one event loop."""

    def __init__(
        self, target: str, *, namespace: str = CRI_NAMESPACE, call_timeout: float = 30.0
    ) -> None:
        self.target = target
        self.namespace = namespace
        self.call_timeout = call_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: ImagesStub | None = None

    def __repr__(self) -> str:
        return f"ContainerdImages({self.target!r}, namespace={self.namespace!r})"

    def _service(self) -> ImagesStub:
        # Created lazily so the channel binds to the loop that uses it.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                grpc_target(self.target), options=_CHANNEL_OPTIONS
            )
            self._stub = ImagesStub(self._channel)
        return self._stub

    async def get(self, name: str) -> ImageRecord | None:
        """The record called ``name``, or None when containerd has none."""
        try:
            response = await self._call("Get", name, images_pb2.GetImageRequest(name=name))
        except CriError as e:
            if e.code is grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return ImageRecord.from_proto(response.image)

    async def list(self, *filters: str) -> list[ImageRecord]:
        """Records matching any of ``filters`` (containerd's filter syntax); all without one."""
        request = images_pb2.ListImagesRequest(filters=list(filters))
        response = await self._call("List", "", request)
        return [ImageRecord.from_proto(image) for image in response.images]

    async def names_of(self, name: str) -> builtins.list[ImageRecord]:
        """Every record pointing at the same content as ``name`` (itself included); [] if absent."""
        record = await self.get(name)
        if record is None:
            return []
        # A digest holds only [a-z0-9:], so it needs no quoting in a filter.
        return await self.list(f"target.digest=={record.digest}")

    async def set_label(self, name: str, key: str, value: str) -> None:
        """Set one label on the record ``name``, leaving its other labels as they are."""
        await self._update(name, key, {key: value})

    async def remove_label(self, name: str, key: str) -> None:
        """Remove one label from the record ``name``; nothing happens if the label or the record
        is not there (an image removed since carries no label to remove)."""
        try:
            await self._update(name, key, {})
        except CriError as e:
            if e.code is not grpc.StatusCode.NOT_FOUND:
                raise

    async def _update(self, name: str, key: str, labels: dict[str, str]) -> None:
        # With the mask "labels.<key>", containerd copies that one label from the request: set
        # when present, deleted when absent. Every other field and label stays untouched.
        request = images_pb2.UpdateImageRequest(image=images_pb2.Image(name=name, labels=labels))
        request.update_mask.paths.append(f"labels.{key}")
        await self._call("Update", name, request)

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def _call(self, rpc: str, name: str, request: object) -> Any:
        method = getattr(self._service(), rpc)
        metadata = ((_NAMESPACE_HEADER, self.namespace),)
        subject = f"containerd images.{rpc} {name}" if name else f"containerd images.{rpc}"
        try:
            return await method(request, timeout=self.call_timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            details = e.details() or ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                message = f"{subject}: runtime unavailable at {self.target}: {details}"
                raise RuntimeUnavailable(message, code) from None
            raise CriError(f"{subject}: {code.name}: {details}", code) from None
        except grpc.aio.UsageError as e:
            raise RuntimeUnavailable(f"{subject}: client closed") from e
