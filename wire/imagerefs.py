"""Image references in the one normal form that every reader of the bus compares.

A Fleet may say ``nginx``; containerd reports ``docker.io/library/nginx:latest``, and node status
entries carry the normalized form. The syncer (``syncer.folding.references``, which builds its
``ImageRef`` on :func:`parse_reference`) and the broadcaster (which reads node status against a
Fleet's next images) must normalize alike, so the grammar is applied here, once: docker-image-py,
a port of distribution/reference, the grammar the runtimes themselves use.
"""

from __future__ import annotations

import functools

from docker_image.reference import InvalidReference, Reference

__all__ = ["DEFAULT_TAG", "InvalidImageReference", "normalized", "parse_reference"]

DEFAULT_TAG = "latest"


class InvalidImageReference(ValueError):
    """The text is not an image reference; the message quotes it and says why."""


@functools.lru_cache(maxsize=16384)
def parse_reference(text: str) -> tuple[str, str | None, str | None]:
    """``nginx`` -> ``("docker.io/library/nginx", "latest", None)``: (name, tag, digest).

    Raises InvalidImageReference. Cached: every event, replay and reconcile normalizes the same
    few hundred strings, and the grammar costs several regular expressions per call; failures
    are not cached.
    """
    if not text or text != text.strip():
        raise InvalidImageReference(f"invalid image reference {text!r}: empty or padded")
    try:
        parsed = Reference.parse_normalized_named(text)
    except InvalidReference as e:
        raise InvalidImageReference(f"invalid image reference {text!r}: {e}") from e
    tag = parsed.get("tag") or None
    digest = parsed.get("digest") or None
    # As the runtimes do: no tag and no digest means :latest; a digest alone pins the content.
    if not tag and not digest:
        tag = DEFAULT_TAG
    return parsed["name"], tag, digest


def normalized(text: str) -> str:
    """The normal form as text (``docker.io/library/nginx:latest``), as status entries carry it."""
    name, tag, digest = parse_reference(text)
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
