"""Fleet objects for tests, as dicts, in the one Fleet shape (:func:`image_syncer.fleets.fleet_object`).

:func:`image_syncer.fleets.build_fleet` builds a Fleet a real cluster would accept, and refuses
bad images; tests also need Fleets the syncer must refuse (a bad reference, no image at all), with
predictable names and versions. Containers are named ``c0``, ``c1``... and init containers
``i0``...; the uid is ``uid-<name>`` unless given.
"""

from __future__ import annotations

from typing import Any

from image_syncer.fleets import fleet_object

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
    return fleet_object(
        name,
        [{"name": f"c{i}", "image": image} for i, image in enumerate(images)],
        namespace=namespace,
        init_containers=[{"name": f"i{i}", "image": image} for i, image in enumerate(init)],
        replicas=replicas,
        metadata={"uid": uid or f"uid-{name}", "resourceVersion": rv},
    )
