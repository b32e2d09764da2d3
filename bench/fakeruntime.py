"""A light in-memory CRI runtime with the ``CriClient`` interface, for simulated nodes.

Benchmarks that run hundreds of nodes in one process, or that must take the runtime out of the
figure, use this instead of containerd: it answers at once, "pulls" by recording the image and
the moment, and lists what it holds as a runtime would (tags in normalized form).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable

from syncer.folding.references import normalize
from syncer.runtime.cri import ImageFilesystem, RegistryAuth, RuntimeImage

__all__ = ["MemoryRuntime"]


class MemoryRuntime:
    def __init__(
        self,
        present: Iterable[str] = (),
        on_pull: Callable[[str, float], None] = lambda ref, at: None,
    ) -> None:
        self.images: dict[str, RuntimeImage] = {}
        self.pulled: dict[str, float] = {}
        self._on_pull = on_pull
        for ref in present:
            self._hold(ref)

    def _hold(self, ref: str) -> RuntimeImage:
        tag = str(normalize(ref))
        digest = "sha256:" + hashlib.sha256(tag.encode()).hexdigest()
        image = RuntimeImage(id=digest, repo_tags=(tag,), repo_digests=(), size=1024)
        self.images[tag] = image
        return image

    async def check(self, *, timeout: float | None = None) -> None:
        return None

    async def list_images(self) -> list[RuntimeImage]:
        return list(self.images.values())

    async def image_status(self, ref: str) -> RuntimeImage | None:
        return self.images.get(str(normalize(ref)))

    async def pull_image(
        self, ref: str, auth: RegistryAuth | None = None, *, timeout: float
    ) -> str:
        image = self._hold(ref)
        now = time.perf_counter()
        self.pulled[ref] = now
        self._on_pull(ref, now)
        return image.id

    async def remove_image(self, ref: str) -> None:
        self.images.pop(str(normalize(ref)), None)

    async def image_fs_info(self) -> list[ImageFilesystem]:
        return [ImageFilesystem("/var/lib/containerd", 1024 * len(self.images), 0, 0)]

    async def close(self) -> None:
        return None
