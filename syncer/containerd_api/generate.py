"""Regenerate the containerd images-service stubs: `python -m syncer.containerd_api.generate`.

Same recipe as the CRI stubs (``syncer.cri_api.generate``): compile the vendored subset under
proto/containerd and make the generated modules import each other relatively.
"""

from __future__ import annotations

import sys
from pathlib import Path

from syncer.cri_api.generate import PROTO_ROOT, Stubs, generate_stubs

__all__ = ["GENERATED", "PACKAGE_DIR", "generate"]

PACKAGE_DIR = Path(__file__).resolve().parent
IMAGES_PROTO = "containerd/services/images/v1/images.proto"
DESCRIPTOR_PROTO = "containerd/types/descriptor.proto"

CONTAINERD = Stubs(
    proto_files=(DESCRIPTOR_PROTO, IMAGES_PROTO),
    generated={
        "descriptor_pb2.py": DESCRIPTOR_PROTO,
        "images_pb2.py": IMAGES_PROTO,
        "images_pb2_grpc.py": IMAGES_PROTO,
    },
    relative_imports={
        "images_pb2.py": ("containerd.types",),
        "images_pb2_grpc.py": ("containerd.services.images.v1",),
    },
)
GENERATED = CONTAINERD.files()


def generate(out_dir: Path, *, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the containerd stubs into ``out_dir`` (flat) and return their paths."""
    return generate_stubs(CONTAINERD, out_dir, proto_root=proto_root)


def main() -> int:
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
