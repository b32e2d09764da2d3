"""A CRI ImageService stand-in served over a real unix-socket gRPC server.

For a syncer subprocess that must talk real gRPC to a runtime holding many images without the
cost of pulling them into containerd first: it answers ListImages, ImageStatus, PullImage,
RemoveImage and ImageFsInfo from memory, with the same protobuf messages containerd sends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.fakeruntime import MemoryRuntime
from syncer.cri_api import api_pb2
from syncer.cri_api.api_pb2_grpc import ImageServiceServicer, add_ImageServiceServicer_to_server
from syncer.runtime.cri import RuntimeImage

__all__ = ["serve_cri"]


_Context = grpc.aio.ServicerContext[Any, Any]


class _Service(ImageServiceServicer):
    def __init__(self, runtime: MemoryRuntime) -> None:
        self.runtime = runtime

    def _proto(self, image: RuntimeImage) -> api_pb2.Image:
        return api_pb2.Image(
            id=image.id,
            repo_tags=list(image.repo_tags),
            repo_digests=list(image.repo_digests),
            size=image.size,
        )

    async def ListImages(
        self, request: api_pb2.ListImagesRequest, context: _Context
    ) -> api_pb2.ListImagesResponse:
        images = await self.runtime.list_images()
        return api_pb2.ListImagesResponse(images=[self._proto(i) for i in images])

    async def ImageStatus(
        self, request: api_pb2.ImageStatusRequest, context: _Context
    ) -> api_pb2.ImageStatusResponse:
        image = await self.runtime.image_status(request.image.image)
        if image is None:
            return api_pb2.ImageStatusResponse()
        return api_pb2.ImageStatusResponse(image=self._proto(image))

    async def PullImage(
        self, request: api_pb2.PullImageRequest, context: _Context
    ) -> api_pb2.PullImageResponse:
        ref = await self.runtime.pull_image(request.image.image, timeout=60)
        return api_pb2.PullImageResponse(image_ref=ref)

    async def RemoveImage(
        self, request: api_pb2.RemoveImageRequest, context: _Context
    ) -> api_pb2.RemoveImageResponse:
        await self.runtime.remove_image(request.image.image)
        return api_pb2.RemoveImageResponse()

    async def ImageFsInfo(
        self, request: api_pb2.ImageFsInfoRequest, context: _Context
    ) -> api_pb2.ImageFsInfoResponse:
        return api_pb2.ImageFsInfoResponse()


@contextlib.asynccontextmanager
async def serve_cri(socket: Path, present: Iterable[str]) -> AsyncIterator[MemoryRuntime]:
    """Serve a MemoryRuntime holding ``present`` on ``unix://<socket>`` for the block."""
    runtime = MemoryRuntime(present)
    server = grpc.aio.server()
    add_ImageServiceServicer_to_server(_Service(runtime), server)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    try:
        yield runtime
    finally:
        await server.stop(grace=None)
