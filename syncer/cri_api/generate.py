"""Regenerate the committed CRI stubs from proto/ (`python -m syncer.cri_api.generate`).

protoc names the generated module after the proto's path (``runtime/v1/api.proto``) and makes the
gRPC stub import it absolutely (``from runtime.v1 import api_pb2``), which would only resolve with
proto/'s output root on sys.path. The stubs live flat inside this package instead, so the import is
rewritten into a relative one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parents[1] / "proto"
PROTO_FILE = "runtime/v1/api.proto"
GENERATED = ("api_pb2.py", "api_pb2_grpc.py")

_ABSOLUTE_IMPORT = "from runtime.v1 import api_pb2 as"
_RELATIVE_IMPORT = "from . import api_pb2 as"


class GenerationFailed(RuntimeError):
    """protoc rejected the proto file; the message carries its diagnostics."""


def generate(out_dir: Path, *, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs for PROTO_FILE into ``out_dir`` (flat) and return their paths."""
    from grpc_tools import protoc  # dev-only dependency: imported here so the stubs never need it

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"--python_out={scratch}",
                f"--grpc_python_out={scratch}",
                str(proto_root / PROTO_FILE),
            ]
        )
        if status != 0:
            raise GenerationFailed(f"protoc exited with {status} for {proto_root / PROTO_FILE}")
        produced = Path(scratch) / Path(PROTO_FILE).parent
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(produced / name, target)
            written.append(target)
    _make_import_relative(out_dir / "api_pb2_grpc.py")
    return written


def _make_import_relative(path: Path) -> None:
    text = path.read_text()
    if _ABSOLUTE_IMPORT not in text:
        raise GenerationFailed(f"expected {_ABSOLUTE_IMPORT!r} in {path}; did protoc change?")
    path.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))


def main() -> int:
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
