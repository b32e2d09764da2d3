"""Image references in one normal form, so that the Fleet's spelling and the runtime's agree.

A Fleet may say ``nginx``; containerd reports ``docker.io/library/nginx:latest``. Comparing raw
strings would pull the same image forever, so every reference is parsed with docker-image-py
(a port of distribution/reference, the grammar the runtimes themselves use) and compared in its
fully qualified form. A reference pinned by digest is matched against the runtime's
``repo_digests``, a tagged one against its ``repo_tags``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from wire.imagerefs import InvalidImageReference, parse_reference

__all__ = ["Holding", "ImageRef", "InvalidImageReference", "PresentImages", "normalize"]


@dataclass(frozen=True, order=True)
class ImageRef:
    """A fully qualified reference: ``name`` includes the registry (``docker.io/library/nginx``)."""

    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def tagged(self) -> str | None:
        return f"{self.name}:{self.tag}" if self.tag else None

    @property
    def canonical(self) -> str | None:
        return f"{self.name}@{self.digest}" if self.digest else None

    @property
    def stored_name(self) -> str:
        """The name the runtime keeps for this reference: ``name@digest`` when it has a digest
        (containerd's CRI plugin drops the tag of ``name:tag@digest``, docker.ParseDockerRef),
        else ``name:tag``. Labels and lookups by name must use this one."""
        return self.canonical or self.tagged or str(self)

    @property
    def domain(self) -> str:
        return self.name.split("/", 1)[0]


@functools.lru_cache(maxsize=16384)
def normalize(text: str) -> ImageRef:
    """``nginx`` -> ``docker.io/library/nginx:latest``; raise InvalidImageReference if not one.

    The grammar is :func:`wire.imagerefs.parse_reference`'s (the broadcaster normalizes alike).
    Cached too: ImageRef is frozen, so sharing one instance is safe; failures are not cached.
    """
    name, tag, digest = parse_reference(text)
    return ImageRef(name=name, tag=tag, digest=digest)


class Holding(Protocol):
    """Anything that answers "does the node hold this image?": PresentImages, a set."""

    def __contains__(self, image: ImageRef, /) -> bool: ...


class PresentImages:
    """What the runtime holds, indexed for reference lookups (built from one ListImages)."""

    def __init__(self, tags: Iterable[str] = (), digests: Iterable[str] = ()) -> None:
        self._tags = {_quiet_normal(t) for t in tags} - {None}
        self._digests = {_quiet_normal(d) for d in digests} - {None}

    @classmethod
    def of(cls, images: Iterable[object]) -> PresentImages:
        """From RuntimeImage-like objects (``repo_tags``, ``repo_digests``)."""
        tags: list[str] = []
        digests: list[str] = []
        for image in images:
            tags.extend(getattr(image, "repo_tags", ()))
            digests.extend(getattr(image, "repo_digests", ()))
        return cls(tags, digests)

    def __contains__(self, ref: ImageRef) -> bool:
        # A digest names the content exactly, so it wins over a tag that may have moved.
        if ref.digest:
            return ImageRef(ref.name, None, ref.digest) in self._digests
        return ref in self._tags

    def add(self, ref: ImageRef) -> None:
        """Record a pull that just succeeded, until the next ListImages says otherwise."""
        if ref.digest:
            self._digests.add(ImageRef(ref.name, None, ref.digest))
        else:
            self._tags.add(ref)

    def discard(self, ref: ImageRef) -> None:
        """Forget a name of an image being removed, until the next ListImages says otherwise."""
        if ref.digest:
            self._digests.discard(ImageRef(ref.name, None, ref.digest))
        else:
            self._tags.discard(ref)

    def __len__(self) -> int:
        return len(self._tags) + len(self._digests)


def _quiet_normal(text: str) -> ImageRef | None:
    # The runtime may hold images with references we cannot parse (e.g. sha256:<id> only);
    # they simply match nothing.
    try:
        ref = normalize(text)
    except InvalidImageReference:
        return None
    if ref.digest:
        return ImageRef(ref.name, None, ref.digest)
    return ref
