"""A CRI ImageService stand-in served over a real unix-socket gRPC server.

For a syncer subprocess that must talk real gRPC to a runtime holding many images without the
cost of pulling them into containerd first: it answers ListImages, ImageStatus, PullImage and
ImageFsInfo from memory, with the same protobuf messages containerd sends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import grpc.aio

from bench.fakeruntime import MemoryRuntime
from syncer.cri_api import api_pb2
from syncer.cri_api.api_pb2_grpc import ImageServiceServicer, add_ImageServiceServicer_to_server

__all__ = ["serve_cri"]


class _Service(ImageServiceServicer):
    def __init__(self, runtime: MemoryRuntime) -> None:
        self.runtime = runtime

    def _proto(self, image: object) -> api_pb2.Image:
        return api_pb2.Image(
            id=image.id,  # type: ignore[attr-defined]
            repo_tags=list(image.repo_tags),  # type: ignore[attr-defined]
            repo_digests=list(image.repo_digests),  # type: ignore[attr-defined]
            size=image.size,  # type: ignore[attr-defined]
        )

    async def ListImages(self, request, context):  # type: ignore[no-untyped-def]
        images = await self.runtime.list_images()
        return api_pb2.ListImagesResponse(images=[self._proto(i) for i in images])

    async def ImageStatus(self, request, context):  # type: ignore[no-untyped-def]
        image = await self.runtime.image_status(request.image.image)
        if image is None:
            return api_pb2.ImageStatusResponse()
        return api_pb2.ImageStatusResponse(image=self._proto(image))

    async def PullImage(self, request, context):  # type: ignore[no-untyped-def]
        ref = await self.runtime.pull_image(request.image.image, timeout=60)
        return api_pb2.PullImageResponse(image_ref=ref)

    async def ImageFsInfo(self, request, context):  # type: ignore[no-untyped-def]
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
