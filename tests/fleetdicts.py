"""Fleet objects for tests, as dicts: one builder for every test that needs a Fleet.

:func:`image_syncer.fleets.build_fleet` builds a Fleet a real cluster would accept, and refuses
bad images; tests also need Fleets the syncer must refuse (a bad reference, no image at all), with
predictable names and versions. Containers are named ``c0``, ``c1``... and init containers
``i0``...; the uid is ``uid-<name>`` unless given.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fleet"]


def fleet(
    name: str,
    *images: str,
    namespace: str = "default",
    init: tuple[str, ...] = (),
    rv: str = "1",
    uid: str | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """An ``agones.dev/v1`` Fleet running one container per image, any image string allowed."""
    pod: dict[str, Any] = {
        "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    }
    if init:
        pod["initContainers"] = [{"name": f"i{i}", "image": image} for i, image in enumerate(init)]
    return {
        "apiVersion": "agones.dev/v1",
        "kind": "Fleet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or f"uid-{name}",
            "resourceVersion": rv,
        },
        "spec": {"replicas": replicas, "template": {"spec": {"template": {"spec": pod}}}},
    }
