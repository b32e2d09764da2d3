"""Regenerate the committed CRI stubs from proto/ (`python -m syncer.cri_api.generate`).

protoc names the generated modules after the proto's path (``runtime/v1/api.proto``) and makes
them import each other absolutely (``from runtime.v1 import api_pb2``), which would only resolve
with proto/'s output root on sys.path. The stubs live flat inside a package instead, so those
imports are rewritten into relative ones. :func:`generate_stubs` does this for any :class:`Stubs`
(``syncer.containerd_api.generate`` uses it for containerd's images service).

Beside every generated module, mypy-protobuf writes its type stub (``.pyi``): protobuf builds the
message classes at run time, so without it the type checker would know none of them. The stubs
import each other like the modules do and get the same rewrite.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GENERATED", "PACKAGE_DIR", "PROTO_ROOT", "GenerationFailed", "Stubs", "generate"]

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parents[1] / "proto"
PROTO_FILE = "runtime/v1/api.proto"


class GenerationFailed(RuntimeError):
    """protoc rejected a proto file; the message carries its diagnostics."""


@dataclass(frozen=True)
class Stubs:
    """Proto files compiled into one flat package, and the imports made relative there."""

    proto_files: tuple[str, ...]
    # Generated file name -> the proto file (relative to proto/) it comes from.
    generated: dict[str, str]
    # Generated file name -> the proto packages whose absolute imports it must lose.
    relative_imports: dict[str, tuple[str, ...]]

    def files(self) -> tuple[str, ...]:
        """Every file written: the modules and the type stub (``.pyi``) of each."""
        return tuple(name + suffix for name in self.generated for suffix in ("", "i"))


CRI = Stubs(
    proto_files=(PROTO_FILE,),
    generated={"api_pb2.py": PROTO_FILE, "api_pb2_grpc.py": PROTO_FILE},
    relative_imports={"api_pb2_grpc.py": ("runtime.v1",)},
)
GENERATED = CRI.files()


def generate_stubs(stubs: Stubs, out_dir: Path, *, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write ``stubs`` into ``out_dir`` (flat) and return their paths."""
    from grpc_tools import protoc  # dev-only dependency: imported here so the stubs never need it

    # protoc's own copies of google/protobuf/*.proto (well-known types such as FieldMask).
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    plugins = _mypy_plugins()
    with tempfile.TemporaryDirectory() as scratch:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={scratch}",
                f"--grpc_python_out={scratch}",
                *(f"--plugin=protoc-gen-{name}={path}" for name, path in plugins.items()),
                f"--mypy_out={scratch}",
                f"--mypy_grpc_out={scratch}",
                *(str(proto_root / f) for f in stubs.proto_files),
            ]
        )
        if status != 0:
            raise GenerationFailed(f"protoc exited with {status} for {stubs.proto_files}")
        written = []
        for name, proto in stubs.generated.items():
            for file in (name, name + "i"):
                target = out_dir / file
                shutil.copyfile(Path(scratch) / Path(proto).parent / file, target)
                written.append(target)
    for name, packages in stubs.relative_imports.items():
        for package in packages:
            _make_import_relative(out_dir / name, package)
            _make_import_relative(out_dir / (name + "i"), package)
    return written


def _mypy_plugins() -> dict[str, Path]:
    """mypy-protobuf's protoc plugins, installed as scripts beside this interpreter."""
    scripts = Path(sys.executable).parent
    plugins = {name: scripts / f"protoc-gen-{name}" for name in ("mypy", "mypy_grpc")}
    missing = [str(path) for path in plugins.values() if not path.is_file()]
    if missing:
        raise GenerationFailed(f"missing {', '.join(missing)}: install the dev extra")
    return plugins


def generate(out_dir: Path, *, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the CRI stubs into ``out_dir`` (flat) and return their paths."""
    return generate_stubs(CRI, out_dir, proto_root=proto_root)


def _make_import_relative(path: Path, package: str) -> None:
    absolute = f"from {package} import "
    text = path.read_text()
    if absolute not in text:
        raise GenerationFailed(f"expected {absolute!r} in {path}; did protoc change?")
    path.write_text(text.replace(absolute, "from . import "))


def main() -> int:
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
