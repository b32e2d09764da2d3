"""Agones Fleets for tools without a cluster: built around images, or read from YAML manifests.

The ``publish`` command, the demo and the benchmarks all need Fleets that the broadcaster could
have seen; building them here, in the shape the Agones API server returns, keeps every synthetic
event decodable by the syncer and by anything else that reads agones-event-broadcaster's format.

Everything is checked before anything is published, so a bad manifest or image reference is
refused whole, with the place it went wrong, instead of half of a file reaching the log.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import yaml
from docker_image.reference import InvalidReference, Reference

from wire.contract import NEXT_IMAGES_ANNOTATION

__all__ = [
    "API_VERSION",
    "FleetError",
    "build_fleet",
    "check_image",
    "fleet_key",
    "fleet_object",
    "fleet_uid",
    "load_fleets",
    "next_resource_version",
]

API_VERSION = "agones.dev/v1"
GAME_SERVER_PORT = 7654
# The port every built Fleet's game servers declare (Agones' default policy and protocol).
GAME_SERVER_PORT_SPEC: dict[str, Any] = {
    "name": "default",
    "portPolicy": "Dynamic",
    "containerPort": GAME_SERVER_PORT,
    "protocol": "UDP",
}

# Namespaces are DNS-1123 labels; object names DNS-1123 subdomains.
_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

# Fixed, so a Fleet named the same way gets the same uid in every process and on every run.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "image-syncer.agones.dev")


class FleetError(ValueError):
    """A Fleet cannot be built or loaded; the message names the document, field or image."""


def fleet_uid(namespace: str, name: str) -> str:
    """The uid a synthetic Fleet gets: deterministic, so every event of it names the same object."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{namespace}/{name}"))


def next_resource_version() -> str:
    """A numeric, increasing resourceVersion, so each publish is a new change to JetStream."""
    return str(time.time_ns())


def fleet_key(fleet: dict[str, Any]) -> str:
    """``namespace/name`` of a Fleet object, as logs and the syncer name it."""
    metadata = fleet.get("metadata") or {}
    return f"{metadata.get('namespace') or 'default'}/{metadata.get('name', '')}"


def check_image(image: str) -> str:
    """Refuse an image reference that no container runtime could pull (syntax only)."""
    try:
        Reference.parse(image)
    except InvalidReference as e:
        raise FleetError(f"invalid image reference {image!r}: {e}") from e
    return image


def _check_names(namespace: str, name: str) -> None:
    if not _LABEL_RE.match(namespace) or len(namespace) > 63:
        raise FleetError(f"namespace {namespace!r} is not a valid Kubernetes namespace")
    if not _SUBDOMAIN_RE.match(name) or len(name) > 253:
        raise FleetError(f"name {name!r} is not a valid Kubernetes object name")


def _containers(images: Iterable[str], base: str) -> list[dict[str, Any]]:
    # gs, gs-2, gs-3...: stable names, so the same images give the same Fleet.
    return [
        {"name": base if i == 1 else f"{base}-{i}", "image": check_image(image)}
        for i, image in enumerate(images, start=1)
    ]


def build_fleet(
    name: str,
    images: Iterable[str],
    *,
    namespace: str = "default",
    init_images: Iterable[str] = (),
    replicas: int = 1,
    resource_version: str | None = None,
    labels: dict[str, str] | None = None,
    next_images: Iterable[str] = (),
) -> dict[str, Any]:
    """A valid ``agones.dev/v1`` Fleet running one container per image (``gs``, ``gs-2``...).

    The uid is :func:`fleet_uid`; ``resource_version`` defaults to
    :func:`next_resource_version`, so two builds are two distinct changes. ``next_images`` go
    into the annotation ``image-syncer.octops.io/next-images`` (staged for a rollout).
    """
    _check_names(namespace, name)
    containers = _containers(images, "gs")
    if not containers:
        raise FleetError(f"Fleet {namespace}/{name} needs at least one image")
    if replicas < 0:
        raise FleetError(f"replicas must be >= 0, not {replicas}")
    metadata: dict[str, Any] = {
        "uid": fleet_uid(namespace, name),
        "resourceVersion": resource_version or next_resource_version(),
        "generation": 1,
    }
    if labels:
        metadata["labels"] = dict(labels)
    staged = [check_image(image) for image in next_images]
    if staged:
        metadata["annotations"] = {NEXT_IMAGES_ANNOTATION: ",".join(staged)}
    return fleet_object(
        name,
        containers,
        namespace=namespace,
        init_containers=_containers(init_images, "init"),
        replicas=replicas,
        metadata=metadata,
        # Agones needs to be told which container is the game server once there are several.
        game_server={"container": containers[0]["name"], "ports": [dict(GAME_SERVER_PORT_SPEC)]},
    )


def fleet_object(
    name: str,
    containers: list[dict[str, Any]],
    *,
    namespace: str = "default",
    init_containers: list[dict[str, Any]] | None = None,
    replicas: int = 1,
    metadata: dict[str, Any] | None = None,
    game_server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one shape of an ``agones.dev/v1`` Fleet object, around the given containers.

    Nothing is checked: :func:`build_fleet` checks first, and tests need Fleets the syncer must
    refuse too (a bad reference, no image). ``metadata`` adds to the name and namespace (uid,
    resourceVersion, labels, managedFields...), ``game_server`` to the GameServer spec (the
    game server's ``container``, ``ports``), as the API server returns them.
    """
    pod_spec: dict[str, Any] = {"containers": containers}
    if init_containers:
        pod_spec["initContainers"] = init_containers
    return {
        "apiVersion": API_VERSION,
        "kind": "Fleet",
        "metadata": {"name": name, "namespace": namespace, **(metadata or {})},
        "spec": {
            "replicas": replicas,
            "template": {"spec": {**(game_server or {}), "template": {"spec": pod_spec}}},
        },
    }


def load_fleets(text: str, *, namespace: str | None = None) -> list[dict[str, Any]]:
    """Every Fleet in a YAML stream (several documents, or ``kind: List`` as kubectl prints).

    Objects without a namespace get ``namespace`` (else ``default``), without a uid the
    :func:`fleet_uid`, without a resourceVersion a fresh one. Empty documents are skipped;
    anything that is not a Fleet is an error naming its document.
    """
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise FleetError(f"invalid YAML: {_yaml_problem(e)}") from e
    fleets = [_complete(obj, where, namespace) for where, obj in _objects(documents)]
    if not fleets:
        raise FleetError("no Fleet found in the YAML")
    return fleets


def _objects(documents: list[Any]) -> Iterator[tuple[str, Any]]:
    for index, doc in enumerate(documents, start=1):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List":
            for item_index, item in enumerate(doc.get("items") or [], start=1):
                yield f"document {index} item {item_index}", item
        else:
            yield f"document {index}", doc


def _complete(obj: Any, where: str, namespace: str | None) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FleetError(f"{where} is a {type(obj).__name__}, not an {API_VERSION} Fleet")
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if kind != "Fleet" or api_version != API_VERSION:
        what = f"{api_version or '?'} {kind or '(no kind)'}"
        raise FleetError(f"{where} is {what}, not an {API_VERSION} Fleet")
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        raise FleetError(f"{where}: Fleet has no metadata.name")
    name = str(metadata["name"])
    ns = str(metadata.get("namespace") or namespace or "default")
    try:
        _check_names(ns, name)
        _check_images(obj, f"{ns}/{name}")
    except FleetError as e:
        raise FleetError(f"{where}: {e}") from e
    completed = {
        "namespace": ns,
        "uid": metadata.get("uid") or fleet_uid(ns, name),
        "resourceVersion": str(metadata.get("resourceVersion") or next_resource_version()),
    }
    return {**obj, "metadata": {**metadata, **completed}}


def _check_images(fleet: dict[str, Any], key: str) -> None:
    pod_spec = _dig(fleet, "spec", "template", "spec", "template", "spec")
    containers = pod_spec.get("containers") or []
    init_containers = pod_spec.get("initContainers") or []
    if not isinstance(containers, list) or not isinstance(init_containers, list):
        raise FleetError(f"Fleet {key}: containers must be lists")
    if not containers:
        raise FleetError(f"Fleet {key} has no containers")
    for container in (*init_containers, *containers):
        if not isinstance(container, dict):
            raise FleetError(f"Fleet {key}: a container is not a mapping")
        name = container.get("name") or "?"
        try:
            check_image(str(container.get("image") or ""))
        except FleetError as e:
            raise FleetError(f"Fleet {key} container {name}: {e}") from e


def _dig(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    for key in path:
        value = obj.get(key) if isinstance(obj, dict) else None
        obj = value if isinstance(value, dict) else {}
    return obj


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    text = f"{context}, {problem}" if context else problem
    return f"line {mark.line + 1} column {mark.column + 1}: {text}"
