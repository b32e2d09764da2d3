"""What ``rollout`` reads and writes of a Fleet through the Kubernetes API, and how it fails.

Two writes, each decided on the exact version it applies to (the Fleet's ``resourceVersion`` is
part of every patch, so a change made by someone else between our read and our write is a 409
Conflict, re-read and decided again, never overwritten):

1. stage: a JSON merge patch setting the annotation ``image-syncer.octops.io/next-images``;
2. move: a JSON patch (RFC 6902) replacing ``spec.template.spec.template.spec.containers[i].image``
   and removing the annotation. Custom resources take no strategic merge patch, and a merge patch
   would replace the whole containers list; a JSON patch addresses the one field.

The container to change is named (``CONTAINER=IMAGE``) or, by default, the game server container
as Agones itself picks it: ``spec.template.spec.container`` when set, else the only container
(Agones refuses a Fleet with several containers and no ``container``; the sidecar Agones
injects is not in the template).

API errors are mapped here to the errors ``rollout`` turns into its exit codes; the API server's
own message (a Status ``message``) is kept, it says what the user must fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiException, CustomObjectsApi
from urllib3.exceptions import HTTPError

from syncer.folding.references import InvalidImageReference, normalize
from wire.contract import NEXT_IMAGES_ANNOTATION, parse_next_images

__all__ = [
    "ApiUnavailable",
    "BadRollout",
    "ConflictingChange",
    "FleetApi",
    "FleetMissing",
    "Forbidden",
    "ImageChange",
    "Plan",
    "RolloutError",
    "TimedOut",
    "VersionConflict",
    "clear_patch",
    "move_patch",
    "parse_image_change",
    "plan_rollout",
    "stage_patch",
]

GROUP, VERSION, PLURAL = "agones.dev", "v1", "fleets"
_CONTAINER_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CONTAINERS_PATH = "/spec/template/spec/template/spec/containers"
# RFC 6901: "/" in a key is written "~1" ("~" itself "~0").
_ANNOTATION_PATH = "/metadata/annotations/" + NEXT_IMAGES_ANNOTATION.replace("~", "~0").replace(
    "/", "~1"
)


class RolloutError(Exception):
    """Why ``rollout`` stopped; ``code`` is its exit code (README: exit codes of rollout)."""

    code = 1


class ApiUnavailable(RolloutError):
    """The API server could not be reached or answered an unexpected error."""


class BadRollout(RolloutError):
    """The command line asks for something this Fleet cannot do (unknown container, bad image)."""

    code = 2


class FleetMissing(RolloutError):
    code = 3


class Forbidden(RolloutError):
    """RBAC refused a read or a write: the message names the verb the identity lacks."""

    code = 4


class TimedOut(RolloutError):
    code = 5


class ConflictingChange(RolloutError):
    """Someone else changed what the rollout is about (the annotation, the image) meanwhile."""

    code = 6


class VersionConflict(Exception):
    """409 on a write: the Fleet changed since it was read; read again and decide again."""


@dataclass(frozen=True)
class ImageChange:
    """One ``--image [CONTAINER=]IMAGE``; ``container`` None: the game server container."""

    image: str
    container: str | None = None

    def __str__(self) -> str:
        return f"{self.container}={self.image}" if self.container else self.image


def parse_image_change(text: str) -> ImageChange:
    """``game=registry/game:2`` or ``registry/game:2``; BadRollout names what is wrong."""
    container, sep, image = text.partition("=")
    if not sep:
        container, image = "", text
    elif not _CONTAINER_RE.match(container) or len(container) > 63:
        raise BadRollout(f"--image {text!r}: {container!r} is not a container name")
    try:
        # The syncers' own parse: an image they would skip could never be waited for.
        normalize(image)
    except InvalidImageReference as e:
        raise BadRollout(f"--image {text!r}: {e}") from e
    return ImageChange(image, container or None)


@dataclass(frozen=True)
class Plan:
    """What moving this version of the Fleet takes: per container (index, image now, new image)."""

    fleet: str
    resource_version: str
    containers: dict[str, tuple[int, str, str]]
    # The annotation as the Fleet has it now ("" when absent) and as the rollout writes it.
    annotation: str
    next_images: str

    @property
    def moved(self) -> bool:
        """Every container already runs its new image."""
        return all(now == new for _, now, new in self.containers.values())

    @property
    def staged(self) -> bool:
        return parse_next_images(self.annotation) == parse_next_images(self.next_images)


def plan_rollout(fleet: str, obj: dict[str, Any], changes: Sequence[ImageChange]) -> Plan:
    """The plan for ``changes`` on this version of the Fleet; BadRollout if it cannot apply."""
    pod = _get(obj, "spec", "template", "spec", "template", "spec") or {}
    containers = [c for c in pod.get("containers") or [] if isinstance(c, dict)]
    names = [str(c.get("name", "")) for c in containers]
    planned: dict[str, tuple[int, str, str]] = {}
    for change in changes:
        name = change.container or _game_container(fleet, obj, names)
        if name not in names:
            raise BadRollout(
                f"fleet {fleet} has no container {name!r} (containers: {', '.join(names)})"
            )
        if name in planned:
            raise BadRollout(f"--image names container {name!r} twice")
        index = names.index(name)
        planned[name] = (index, str(containers[index].get("image", "")), change.image)
    metadata = obj.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    return Plan(
        fleet=fleet,
        resource_version=str(metadata.get("resourceVersion", "")),
        containers=planned,
        annotation=str(annotations.get(NEXT_IMAGES_ANNOTATION, "")),
        next_images=",".join(dict.fromkeys(new for _, _, new in planned.values())),
    )


def _game_container(fleet: str, obj: dict[str, Any], names: list[str]) -> str:
    # Agones' GameServerSpec.container names the game server container; without it, the
    # template must have exactly one container (Agones' own validation).
    chosen = _get(obj, "spec", "template", "spec", "container")
    if isinstance(chosen, str) and chosen:
        return chosen
    if len(names) == 1:
        return names[0]
    raise BadRollout(
        f"fleet {fleet} has {len(names)} containers ({', '.join(names)}) and no "
        "spec.template.spec.container: say which with --image CONTAINER=IMAGE"
    )


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def stage_patch(plan: Plan) -> dict[str, Any]:
    """Merge patch: the annotation names the new images, on the version the plan was made from."""
    return {
        "metadata": {
            "resourceVersion": plan.resource_version,
            "annotations": {NEXT_IMAGES_ANNOTATION: plan.next_images},
        }
    }


def move_patch(plan: Plan) -> list[dict[str, Any]]:
    """JSON patch: each container to its new image, the annotation removed, on that version."""
    ops: list[dict[str, Any]] = [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": plan.resource_version}
    ]
    for name, (index, _, new) in sorted(plan.containers.items()):
        # The name is tested too: the index is only right for the version the plan was made of.
        ops.append({"op": "test", "path": f"{_CONTAINERS_PATH}/{index}/name", "value": name})
        ops.append({"op": "replace", "path": f"{_CONTAINERS_PATH}/{index}/image", "value": new})
    if plan.annotation:
        ops.append({"op": "remove", "path": _ANNOTATION_PATH})
    return ops


def clear_patch(plan: Plan) -> list[dict[str, Any]]:
    """JSON patch: only the annotation removed (the Fleet already runs the new images)."""
    return [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": plan.resource_version},
        {"op": "remove", "path": _ANNOTATION_PATH},
    ]


class FleetApi:
    """Get and patch one Fleet; blocking (the caller runs it in a thread), errors mapped."""

    def __init__(self, api: CustomObjectsApi, fleet: str) -> None:
        self.api = api
        self.fleet = fleet
        self.namespace, _, self.name = fleet.partition("/")

    def get(self) -> dict[str, Any]:
        try:
            obj = self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name
            )
        except (ApiException, HTTPError) as e:
            raise self._error(e, "get") from e
        if not isinstance(obj, dict):
            raise ApiUnavailable(f"the API server answered a get of fleet {self.fleet} with junk")
        return obj

    def patch(self, body: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
        """A merge patch (dict) or a JSON patch (list); VersionConflict on 409."""
        content_type = (
            "application/json-patch+json"
            if isinstance(body, list)
            else "application/merge-patch+json"
        )
        try:
            obj = self.api.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                body,
                _content_type=content_type,
            )
        except (ApiException, HTTPError) as e:
            if isinstance(e, ApiException) and e.status == 409:
                raise VersionConflict(_message(e)) from e
            raise self._error(e, "patch") from e
        return obj if isinstance(obj, dict) else {}

    def _error(self, error: Exception, verb: str) -> RolloutError:
        if not isinstance(error, ApiException):
            return ApiUnavailable(f"cannot reach the Kubernetes API server: {error}")
        message = _message(error)
        if error.status == 404:
            return FleetMissing(f"fleet {self.fleet} not found ({verb}: {message})")
        if error.status in (401, 403):
            return Forbidden(f"not allowed to {verb} fleet {self.fleet}: {message}")
        if error.status == 422:
            return ConflictingChange(f"the API server refused the {verb}: {message}")
        return ApiUnavailable(f"{verb} fleet {self.fleet}: HTTP {error.status}: {message}")


def _message(error: ApiException) -> str:
    # The API server's Status carries the sentence a user needs; the reason phrase otherwise.
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return " ".join(body["message"].split())
    return str(error.reason or error.status)
