"""What users do during the soak: Fleets created, rolled out, scaled, opted out, deleted.

Seeded, so a seed gives the same sequence of changes (their timing against the faults depends on
the machine's speed). The images come from a pool pushed to the public registry plus a few to the
private one, which only a syncer holding the pull secret can fetch.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from typing import Any

from image_syncer.fleets import GAME_SERVER_PORT, fleet_object
from image_syncer.sandbox.fakekube import FakeKube

__all__ = ["SYNC_ANNOTATION", "Workload", "admitted_images", "fleet_images", "opted_out"]

SYNC_ANNOTATION = "image-syncer.octops.io/sync"
NAMESPACES = ("default", "arena")


def fleet_images(obj: dict[str, Any]) -> list[str]:
    spec = obj["spec"]["template"]["spec"]["template"]["spec"]
    return [c["image"] for c in spec.get("containers") or []]


def opted_out(obj: dict[str, Any]) -> bool:
    value = (obj["metadata"].get("annotations") or {}).get(SYNC_ANNOTATION)
    return value is not None and value.strip().lower() in {"false", "0", "no"}


def admitted_images(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    """``namespace/name`` -> images, for the Fleets a syncer takes (not opted out)."""
    return {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": set(fleet_images(o))
        for o in objects
        if not opted_out(o)
    }


def _fleet(namespace: str, name: str, images: list[str], replicas: int) -> dict[str, Any]:
    return fleet_object(
        name,
        [{"name": f"c{i}", "image": image} for i, image in enumerate(images)],
        namespace=namespace,
        replicas=replicas,
        metadata={"labels": {"app": "chaos"}},
        game_server={"ports": [{"name": "default", "containerPort": GAME_SERVER_PORT}]},
    )


class Workload:
    """One seeded stream of Fleet changes against the fake API server."""

    def __init__(
        self, kube: FakeKube, public: list[str], private: list[str], *, seed: int, fleets: int = 8
    ) -> None:
        self.kube, self.public, self.private = kube, public, private
        self.random = random.Random(seed)
        self.names = [(NAMESPACES[i % 2], f"game-{i}") for i in range(fleets)]
        self.changes: Counter[str] = Counter()
        # Every image some admitted Fleet wanted at some point: a lower bound on pulls needed.
        self.ever_wanted: set[str] = set()

    def _images(self) -> list[str]:
        count = 1 if self.random.random() < 0.7 else 2
        images = self.random.sample(self.public, count)
        if self.private and self.random.random() < 0.15:
            images[0] = self.random.choice(self.private)
        return images

    def step(self) -> str:
        namespace, name = self.random.choice(self.names)
        current = self.kube.get("fleets", namespace, name)
        if current is None:
            obj = _fleet(namespace, name, self._images(), self.random.randint(1, 5))
            if self.random.random() < 0.15:
                obj["metadata"]["annotations"] = {SYNC_ANNOTATION: "false"}
            self.kube.create("fleets", obj)
            kind = "create"
        else:
            roll = self.random.random()
            obj = copy.deepcopy(current)
            if roll < 0.2:
                self.kube.delete("fleets", namespace, name)
                kind = "delete"
                obj = {}
            elif roll < 0.55:
                containers = obj["spec"]["template"]["spec"]["template"]["spec"]["containers"]
                containers[:] = [
                    {"name": f"c{i}", "image": image} for i, image in enumerate(self._images())
                ]
                kind = "rollout"
            elif roll < 0.8:
                obj["spec"]["replicas"] = self.random.randint(0, 8)
                kind = "scale"
            else:
                annotations = obj["metadata"].setdefault("annotations", {})
                if opted_out(obj):
                    annotations.pop(SYNC_ANNOTATION)
                else:
                    annotations[SYNC_ANNOTATION] = "false"
                kind = "opt_out_toggle"
            if obj:
                self.kube.update("fleets", obj)
        if obj and not opted_out(obj):
            self.ever_wanted |= set(fleet_images(obj))
        self.changes[kind] += 1
        return kind

    @property
    def total(self) -> int:
        return sum(self.changes.values())
