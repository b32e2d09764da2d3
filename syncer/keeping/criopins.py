"""CRI-O pins images by configuration, not by API: the ``pinned_images`` drop-in for the Fleets.

CRI-O has no call that pins an image: it reports ``Image.pinned`` for the names listed in its
``[crio.image] pinned_images`` setting, and the kubelet's image garbage collector skips those.
``image-syncer crio-pinned-config`` renders that setting for the images of the Fleets on the event
log, so operators roll it out like any node configuration (a MachineConfig, a configuration
DaemonSet, an image build) and restart CRI-O. A drop-in's list replaces the lists of earlier
files, so images pinned elsewhere must be passed too (``--extra-image``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = ["DROPIN_PATH", "pinned_images_dropin"]

DROPIN_PATH = "/etc/crio/crio.conf.d/50-image-syncer-pinned.conf"


def pinned_images_dropin(images: Iterable[str], *, source: str = "") -> str:
    """The TOML drop-in pinning ``images`` (exact names, sorted, each once)."""
    names = sorted(set(images))
    lines = [
        "# Written by `image-syncer crio-pinned-config`: images the kubelet's image garbage",
        "# collector must keep. Install as " + DROPIN_PATH + " and restart CRI-O.",
    ]
    if source:
        lines.append(f"# Source: {source}")
    lines += ["[crio.image]", "pinned_images = ["]
    # A JSON string is a valid TOML basic string (same escapes for what a reference can hold).
    lines += [f"  {json.dumps(name)}," for name in names]
    lines.append("]")
    return "\n".join(lines) + "\n"
