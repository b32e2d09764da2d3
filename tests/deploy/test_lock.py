"""The hash-pinned locks in locks/ match pyproject.toml, offline.

The image installs its dependencies with ``pip install --require-hashes`` from these files, so
a dependency added to, removed from or re-constrained in pyproject.toml without ``just lock``
would either fail the image build or ship something pyproject.toml no longer allows. This test
catches that before a build: every direct dependency is pinned inside its specifier, nothing
else claims to come from pyproject.toml, and every pin carries hashes.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: int
    direct: bool  # uv's "# via image-syncer (pyproject.toml)"


def read_lock(path: Path) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    # A pin is its first line, its --hash lines, then the "# via" comment naming who wants it.
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        head = block.splitlines()[0]
        match = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;\\]+)", head)
        if not match:
            continue
        name = canonicalize_name(match.group(1))
        pins[name] = Pin(
            name=name,
            version=match.group(2),
            hashes=len(re.findall(r"--hash=sha256:[0-9a-f]{64}", block)),
            direct="image-syncer (pyproject.toml)" in block,
        )
    return pins


def direct_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    specs = list(PROJECT["dependencies"])
    for extra in extras:
        specs += PROJECT["optional-dependencies"][extra]
    return [Requirement(s) for s in specs]


LOCKS = [("image.txt", ("broadcaster", "auth")), ("syncer.txt", ())]


@pytest.mark.parametrize(("lock", "extras"), LOCKS)
def test_lock_pins_every_direct_dependency_inside_its_specifier(
    lock: str, extras: tuple[str, ...]
) -> None:
    pins = read_lock(ROOT / "locks" / lock)
    wanted = direct_requirements(extras)
    for requirement in wanted:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is not in locks/{lock}: run `just lock`"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"locks/{lock} pins {pin.name}=={pin.version}, outside {requirement}: run `just lock`"
        )
    claimed = {p.name for p in pins.values() if p.direct}
    expected = {canonicalize_name(r.name) for r in wanted}
    assert claimed == expected, f"locks/{lock} is stale: run `just lock`"


@pytest.mark.parametrize("lock", ["image.txt", "syncer.txt", "build.txt"])
def test_every_pin_carries_hashes(lock: str) -> None:
    pins = read_lock(ROOT / "locks" / lock)
    assert pins
    assert [p.name for p in pins.values() if p.hashes == 0] == []


def test_syncer_lock_leaves_the_kubernetes_client_out() -> None:
    image, syncer = read_lock(ROOT / "locks/image.txt"), read_lock(ROOT / "locks/syncer.txt")
    assert "kubernetes" in image and "kubernetes" not in syncer
    # The syncer image is the same code minus the broadcaster's extra: no version may differ.
    assert {n: p.version for n, p in syncer.items()} == {n: image[n].version for n in syncer}


def test_build_lock_holds_the_declared_backend() -> None:
    backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    pins = read_lock(ROOT / "locks/build.txt")
    for spec in backend:
        requirement = Requirement(spec)
        pin = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pin.version)
