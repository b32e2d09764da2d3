"""Whether this node's runtime can be told to pin images, decided once at start.

containerd pins through a label on the image record, set through its native images service on the
same socket; CRI-O pins by its ``pinned_images`` configuration only; other runtimes cannot pin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from syncer.runtime.containerd_images import PIN_LABEL, PIN_VALUE, ImageRecord
from syncer.runtime.cri import CriError, RuntimeUnavailable, RuntimeVersion

__all__ = ["ImageLabels", "PinningSupport", "pinning_support"]

# A name no image has: asking for it shows the images service answers (NOT_FOUND is an answer).
_PROBE_NAME = "image-syncer.invalid/probe:pinning"


class ImageLabels(Protocol):
    """What pinning needs of the runtime:
    :class:`syncer.runtime.containerd_images.ContainerdImages`."""

    async def names_of(self, name: str) -> list[ImageRecord]: ...

    async def list(self, *filters: str) -> list[ImageRecord]: ...

    async def set_label(self, name: str, key: str, value: str) -> None: ...

    async def remove_label(self, name: str, key: str) -> None: ...


@dataclass(frozen=True)
class PinningSupport:
    """Whether this node's runtime can be told to pin, and in words why (for logs and status)."""

    enabled: bool
    reason: str

    def describe(self) -> str:
        return self.reason if self.enabled else f"off: {self.reason}"


class _Probe(Protocol):
    async def get(self, name: str) -> ImageRecord | None: ...


async def pinning_support(
    wanted: bool, version: RuntimeVersion | CriError, images: _Probe
) -> PinningSupport:
    """Decide once at start: pin on containerd whose images service answers, else say why not.

    ``version`` is the CRI Version answer, or the error asking for it raised. Raises
    RuntimeUnavailable when containerd's images service cannot be reached: undecided, ask again.
    """
    if not wanted:
        return PinningSupport(False, "disabled by --pin-images=false")
    if isinstance(version, CriError):
        return PinningSupport(False, f"the runtime did not say which it is: {version}")
    runtime = f"{version.name} {version.version}".strip()
    if version.name == "containerd":
        try:
            await images.get(_PROBE_NAME)
        except RuntimeUnavailable:
            raise
        except CriError as e:
            return PinningSupport(False, f"{runtime}: its images service does not answer: {e}")
        return PinningSupport(True, f"{runtime}: label {PIN_LABEL}={PIN_VALUE}")
    if version.name == "cri-o":
        return PinningSupport(
            False,
            f"{runtime} pins by configuration only: roll out `image-syncer crio-pinned-config`",
        )
    return PinningSupport(False, f"{runtime or 'this runtime'} offers no way to pin images")
