"""A pull's size read from its manifest, against a real docker-registry (anonymous and Basic).

The disk budget charges a pull with this before it starts (see test_diskbudget.py and
test_syncer_keep.py::test_a_burst_of_queued_pulls_cannot_fill_the_disk).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from image_syncer.sandbox.registry import Registry
from syncer.folding.references import normalize
from syncer.keeping.manifestsize import ManifestSizes
from syncer.runtime.cri import RegistryAuth

LAYER = 256 * 1024


async def test_the_size_is_the_layers_and_config_of_the_manifest(push: Callable[..., str]) -> None:
    image = normalize(push(layer_bytes=LAYER))

    size = await ManifestSizes().of(image)

    # Random bytes do not compress: the gzipped tar is the payload plus headers.
    assert size is not None and LAYER < size < LAYER + 8 * 1024


async def test_an_unknown_image_has_no_size(push: Callable[..., str]) -> None:
    image = normalize(push().rsplit(":", 1)[0] + ":never-pushed")

    assert await ManifestSizes().of(image) is None


async def test_a_private_registry_is_asked_with_the_pulls_credentials(
    push: Callable[..., str], auth_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="syncer.keeping.manifestsize")
    assert auth_registry.credentials is not None
    user, password = auth_registry.credentials
    image = normalize(push(layer_bytes=LAYER, into=auth_registry))
    wrong = RegistryAuth(username=user, password="not-" + password)
    right = RegistryAuth(username=user, password=password)

    assert await ManifestSizes().of(image) is None
    assert await ManifestSizes(lambda _: [wrong]).of(image) is None
    size = await ManifestSizes(lambda _: [wrong, right]).of(image)

    assert size is not None and LAYER < size < LAYER + 8 * 1024
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "HTTP 401" in logged  # the failures say why...
    assert password not in logged  # ...and never what was sent
