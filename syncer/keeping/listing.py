"""What one ListImages answer says to the cleanup: which image each name is, which images a live
Fleet or a container keeps, and which no record of ours owns.

Names are compared normalized, by the name containerd stores (``name@digest`` for a digest
reference): removing by any name drops every name of that image, so whatever keeps one name
keeps the image.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol

from syncer.folding.references import ImageRef, InvalidImageReference, normalize

__all__ = ["RuntimeImageLike", "busy_ids", "image_index", "key_of", "unowned", "wanted_in"]


class RuntimeImageLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def repo_tags(self) -> Collection[str]: ...
    @property
    def repo_digests(self) -> Collection[str]: ...


def key_of(ref: ImageRef) -> str:
    return ref.stored_name


def wanted_in(desired: Iterable[str], owner: dict[str, str]) -> tuple[set[str], set[str]]:
    """The keys of the ``desired`` refs, and the ids of the listed images they name."""
    wanted = {key_of(r) for r in _normalized(desired)}
    return wanted, {owner[k] for k in wanted if k in owner}


def _normalized(refs: Iterable[str]) -> list[ImageRef]:
    found = []
    for text in refs:
        try:
            found.append(normalize(text))
        except InvalidImageReference:
            continue  # the fold already reported it; an unparsable ref protects nothing
    return found


def busy_ids(
    images: Iterable[RuntimeImageLike], owner: dict[str, str], in_use: Collection[str]
) -> set[str]:
    """Ids of the images ``in_use`` names, by id (``sha256:...``) or by any tag or digest."""
    busy = {image.id for image in images if image.id in in_use}
    busy.update(owner[k] for k in map(key_of, _normalized(in_use)) if k in owner)
    return busy


def image_index(images: Iterable[RuntimeImageLike]) -> dict[str, str]:
    """Normalized tag or ``name@digest`` -> image id, for every name the runtime knows."""
    index: dict[str, str] = {}
    for image in images:
        for text in (*image.repo_tags, *image.repo_digests):
            try:
                ref = normalize(text)
            except InvalidImageReference:
                continue
            index[key_of(ImageRef(ref.name, None, ref.digest) if ref.digest else ref)] = image.id
    return index


def unowned(
    images: Iterable[RuntimeImageLike],
    owner: dict[str, str],
    kept_ids: set[str],
    ours: Iterable[ImageRef],
) -> set[str]:
    """Ids of the listed images no live Fleet keeps (``kept_ids``) and none of ``ours`` names."""
    owned = {owner[k] for k in map(key_of, ours) if k in owner}
    return {image.id for image in images} - kept_ids - owned
