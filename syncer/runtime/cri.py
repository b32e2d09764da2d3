"""An asyncio client for the CRI ImageService (runtime.v1), the syncer's only way to touch images.

Of the RuntimeService it calls Version (which runtime this is: pinning differs per runtime) and
ListContainers: containerd does not refuse to remove an image a running container uses, so
``--remove-unused`` asks which images containers hold first.

It hides gRPC behind a few coroutines (their answers are the plain values of
:mod:`syncer.runtime.criobjects`, re-exported here) and two exceptions: ``RuntimeUnavailable`` when
the runtime cannot be reached (socket absent, runtime restarting: the caller retries and reports
not-ready) and ``CriError`` for everything the runtime answered with an error (bad reference,
registry refused, pull timed out). Every call carries a deadline. Registry credentials travel in
``AuthConfig`` and never appear in a repr, a log line or an error message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from syncer.cri_api import api_pb2
from syncer.cri_api.api_pb2_grpc import ImageServiceStub, RuntimeServiceStub
from syncer.runtime.criobjects import (
    ImageFilesystem,
    RegistryAuth,
    RuntimeContainer,
    RuntimeImage,
    RuntimeVersion,
    images_in_use,
)

__all__ = [
    "CriClient",
    "CriError",
    "ImageFilesystem",
    "RegistryAuth",
    "RuntimeContainer",
    "RuntimeImage",
    "RuntimeUnavailable",
    "RuntimeVersion",
]

# Reconnect quickly after a runtime restart: gRPC's default backoff grows to two minutes.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # ListImages on a busy node can exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
_REDACTED = "<redacted>"
_RUNTIME_SERVICE_RPCS = frozenset({"ListContainers", "Version"})
# The CRI API version the syncer speaks, sent in VersionRequest as the kubelet does.
_CRI_API_VERSION = "v1"


class CriError(Exception):
    """The runtime answered a CRI call with an error; the message names the rpc and the image."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RuntimeUnavailable(CriError):
    """The runtime cannot be reached (socket absent, not answering); worth retrying later."""


def socket_path(target: str) -> Path | None:
    """The unix socket behind a target (``unix:///x.sock``, ``unix:/x.sock``, ``/x.sock``)."""
    if target.startswith("unix://"):
        return Path(target.removeprefix("unix://"))
    if target.startswith("unix:"):
        return Path(target.removeprefix("unix:"))
    if target.startswith("/"):
        return Path(target)
    return None


def grpc_target(target: str) -> str:
    path = socket_path(target)
    return f"unix://{path}" if path is not None and path.is_absolute() else target


class CriClient:
    """One channel to a CRI runtime; create it anywhere, use it from one event loop."""

    def __init__(self, target: str, *, call_timeout: float = 30.0) -> None:
        self.target = target
        self.call_timeout = call_timeout
        self._socket = socket_path(target)
        self._channel: grpc.aio.Channel | None = None
        self._stub: ImageServiceStub | None = None
        self._runtime_stub: RuntimeServiceStub | None = None

    def __repr__(self) -> str:
        return f"CriClient({self.target!r})"

    def _open(self) -> grpc.aio.Channel:
        # Created lazily so the channel binds to the loop that uses it, not to the constructor's.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                grpc_target(self.target), options=_CHANNEL_OPTIONS
            )
        return self._channel

    def _service(self) -> ImageServiceStub:
        if self._stub is None:
            self._stub = ImageServiceStub(self._open())
        return self._stub

    def _runtime_service(self) -> RuntimeServiceStub:
        if self._runtime_stub is None:
            self._runtime_stub = RuntimeServiceStub(self._open())
        return self._runtime_stub

    async def check(self, *, timeout: float | None = None) -> None:
        """Raise RuntimeUnavailable, with the reason, unless the runtime answers ImageService."""
        self._require_socket()
        await self._call("ImageFsInfo", "", api_pb2.ImageFsInfoRequest(), timeout=timeout)

    async def list_images(self) -> list[RuntimeImage]:
        response = await self._call("ListImages", "", api_pb2.ListImagesRequest())
        return [RuntimeImage.from_proto(image) for image in response.images]

    async def image_status(self, ref: str) -> RuntimeImage | None:
        """The image if the runtime holds it, None if it does not."""
        request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref))
        response = await self._call("ImageStatus", ref, request)
        if not response.HasField("image"):
            return None
        return RuntimeImage.from_proto(response.image)

    async def pull_image(
        self, ref: str, auth: RegistryAuth | None = None, *, timeout: float
    ) -> str:
        """Pull ``ref`` within ``timeout`` seconds; returns the image ref the runtime reports."""
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
        if auth is not None:
            request.auth.CopyFrom(auth.to_proto())
        secrets = auth.secrets() if auth is not None else ()
        response: api_pb2.PullImageResponse = await self._call(
            "PullImage", ref, request, timeout=timeout, secrets=secrets
        )
        return response.image_ref

    async def remove_image(self, ref: str) -> None:
        request = api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref))
        await self._call("RemoveImage", ref, request)

    async def image_fs_info(self) -> list[ImageFilesystem]:
        response = await self._call("ImageFsInfo", "", api_pb2.ImageFsInfoRequest())
        return [
            ImageFilesystem(
                mountpoint=usage.fs_id.mountpoint,
                used_bytes=usage.used_bytes.value,
                inodes_used=usage.inodes_used.value,
                timestamp_ns=usage.timestamp,
            )
            for usage in response.image_filesystems
        ]

    async def version(self) -> RuntimeVersion:
        """The runtime's name and version (RuntimeService.Version)."""
        request = api_pb2.VersionRequest(version=_CRI_API_VERSION)
        response = await self._call("Version", "", request)
        return RuntimeVersion(
            name=response.runtime_name,
            version=response.runtime_version,
            api_version=response.runtime_api_version,
        )

    async def list_containers(self) -> list[RuntimeContainer]:
        """Every container the runtime knows, in any state (RuntimeService.ListContainers)."""
        response = await self._call("ListContainers", "", api_pb2.ListContainersRequest())
        return [RuntimeContainer.from_proto(c) for c in response.containers]

    async def images_in_use(self) -> frozenset[str]:
        """Ids and references of the images held by containers that have not exited."""
        return images_in_use(await self.list_containers())

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._stub = self._runtime_stub = None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> CriClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _require_socket(self) -> None:
        if self._socket is not None and not self._socket.exists():
            raise RuntimeUnavailable(f"CRI socket {self._socket} does not exist")

    async def _call(
        self,
        rpc: str,
        image: str,
        request: object,
        *,
        timeout: float | None = None,
        secrets: tuple[str, ...] = (),
    ) -> Any:  # the response message type depends on the rpc
        service = self._runtime_service() if rpc in _RUNTIME_SERVICE_RPCS else self._service()
        method = getattr(service, rpc)
        deadline = self.call_timeout if timeout is None else timeout
        try:
            return await method(request, timeout=deadline)
        except grpc.aio.AioRpcError as e:
            raise self._translate(e, rpc, image, deadline, secrets) from None
        except grpc.aio.UsageError as e:  # the channel was closed under us
            raise RuntimeUnavailable(f"CRI {rpc} on {self.target}: client closed") from e

    def _translate(
        self,
        error: grpc.aio.AioRpcError,
        rpc: str,
        image: str,
        deadline: float,
        secrets: tuple[str, ...],
    ) -> CriError:
        # `from None` above: the AioRpcError's own text may carry what the runtime echoed back, and
        # chaining it would show it unredacted in tracebacks.
        code = error.code()
        details = _redact(error.details() or "", secrets)
        subject = f"CRI {rpc} {image}" if image else f"CRI {rpc}"
        if code in _UNREACHABLE:
            if self._socket is not None and not self._socket.exists():
                details = f"CRI socket {self._socket} does not exist"
            message = f"{subject}: runtime unavailable at {self.target}: {details}"
            return RuntimeUnavailable(message, code)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            # Only a pull may legitimately take long; any other call that times out, or a pull that
            # never got a connection, means the runtime is not answering.
            if rpc != "PullImage" or not self._connected():
                message = f"{subject}: runtime at {self.target} did not answer within {deadline:g}s"
                return RuntimeUnavailable(message, code)
            return CriError(f"{subject}: pull did not finish within {deadline:g}s", code)
        return CriError(f"{subject}: {code.name}: {details}", code)

    def _connected(self) -> bool:
        channel = self._channel
        return (
            channel is not None
            and channel.get_state(try_to_connect=False) is grpc.ChannelConnectivity.READY
        )


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    return text
