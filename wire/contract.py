"""The wire contract: the one place that says what travels on the bus.

Both the broadcaster (writer) and the syncer (reader) import this module and nothing else about
the wire, so the two cannot drift. The envelope is byte-compatible with Octops'
agones-event-broadcaster::

    {"header": {"headers": {"event_type": "fleet.events.added"}}, "message": <object>}

``message`` is the whole Kubernetes object for ``added`` and ``deleted`` events and
``{"old_obj": <object>, "new_obj": <object>}`` for ``updated`` events.

Decoding is strict about what the syncer relies on (names, containers, images) and lenient about
everything else: unknown fields are ignored and every field we read has a default, so objects from
newer Agones versions, or written by the Go broadcaster, decode the same way.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "AGONES_SDK_SOURCE",
    "DEFAULT_PREFIX",
    "MAX_EVENT_BYTES",
    "NEXT_IMAGES_ANNOTATION",
    "Action",
    "Container",
    "ContractError",
    "Event",
    "EventType",
    "Fleet",
    "GameServer",
    "Kind",
    "NodeImages",
    "ObjectMeta",
    "PodSpec",
    "decode_event",
    "decode_node_images",
    "decode_subject",
    "encode_event",
    "encode_node_images",
    "event_headers",
    "message_id",
    "next_images_of",
    "node_images_filter",
    "node_images_message_id",
    "node_images_subject",
    "object_filter",
    "parse_next_images",
    "subject_for",
]

# Far above any real Fleet (a few KiB) and below NATS' default max_payload (1 MiB): anything
# bigger is hostile or broken and is rejected before it is parsed.
MAX_EVENT_BYTES = 1024 * 1024

# Header names. Nats-Msg-Id is JetStream's own de-duplication header.
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_EVENT_TYPE = "Agones-Event-Type"
HEADER_UID = "Agones-Uid"
HEADER_RESOURCE_VERSION = "Agones-Resource-Version"


class ContractError(ValueError):
    """A message or object does not follow the wire contract; the text says where and why."""


class Kind(enum.StrEnum):
    FLEET = "fleet"
    GAMESERVER = "gameserver"


class Action(enum.StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    DELETED = "deleted"


class EventType(NamedTuple):
    """What happened to which kind of object: ``(Kind.FLEET, Action.ADDED)``.

    Code passes this value around; its wire form ``fleet.events.added`` (the envelope's
    ``event_type`` header, a subject's middle tokens, a metric label) is made by ``str()`` and
    read back by :meth:`parse`, both only here.
    """

    kind: Kind
    action: Action

    def __str__(self) -> str:
        return f"{self.kind}.events.{self.action}"

    @classmethod
    def parse(cls, text: str) -> EventType:
        """The event type of a wire string; ContractError for anything else."""
        try:
            return _EVENT_TYPES[text]
        except KeyError:
            raise ContractError(
                f"unknown event type {text!r}; expected one of {sorted(_EVENT_TYPES)}"
            ) from None

    @classmethod
    def of(cls, value: EventType | str) -> EventType:
        """``value`` itself, or parsed when given in its wire form."""
        return value if isinstance(value, EventType) else cls.parse(value)


_EVENT_TYPES: dict[str, EventType] = {
    str(EventType(kind, action)): EventType(kind, action) for kind in Kind for action in Action
}

# The API kind each of our kinds must carry when the object says what it is.
_API_KINDS = {Kind.FLEET: "Fleet", Kind.GAMESERVER: "GameServer"}


# --- The parts of Agones objects the system reads -------------------------------------------


class ObjectMeta(msgspec.Struct, rename="camel", omit_defaults=True):
    name: str
    namespace: str = "default"
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    deletion_timestamp: str | None = None


class Container(msgspec.Struct, rename="camel", omit_defaults=True):
    name: str = ""
    image: str = ""


class Toleration(msgspec.Struct, rename="camel", omit_defaults=True):
    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""


class PodSpec(msgspec.Struct, rename="camel", omit_defaults=True):
    # Go's encoding/json writes an empty slice or map as null, so every collection accepts it.
    containers: list[Container] | None = None
    init_containers: list[Container] | None = None
    node_selector: dict[str, str] | None = None
    # Kept as plain data: only node targeting reads it, and it has its own typed parser.
    affinity: dict[str, Any] | None = None
    tolerations: list[Toleration] | None = None


class PodTemplateSpec(msgspec.Struct, omit_defaults=True):
    spec: PodSpec = msgspec.field(default_factory=PodSpec)


class GameServerSpec(msgspec.Struct, omit_defaults=True):
    template: PodTemplateSpec = msgspec.field(default_factory=PodTemplateSpec)


class GameServerTemplateSpec(msgspec.Struct, omit_defaults=True):
    spec: GameServerSpec = msgspec.field(default_factory=GameServerSpec)


class FleetSpec(msgspec.Struct, omit_defaults=True):
    replicas: int = 0
    template: GameServerTemplateSpec = msgspec.field(default_factory=GameServerTemplateSpec)


class Fleet(msgspec.Struct, rename="camel", omit_defaults=True):
    metadata: ObjectMeta
    spec: FleetSpec = msgspec.field(default_factory=FleetSpec)
    api_version: str = ""
    kind: str = ""

    @property
    def pod_spec(self) -> PodSpec:
        return self.spec.template.spec.template.spec


class GameServer(msgspec.Struct, rename="camel", omit_defaults=True):
    metadata: ObjectMeta
    spec: GameServerSpec = msgspec.field(default_factory=GameServerSpec)
    api_version: str = ""
    kind: str = ""

    @property
    def pod_spec(self) -> PodSpec:
        return self.spec.template.spec


AgonesObject = Fleet | GameServer


class Event(msgspec.Struct, frozen=True):
    """One decoded event: ``obj`` is the object after the event (for deletes, as it was)."""

    kind: Kind
    action: Action
    obj: AgonesObject
    old: AgonesObject | None = None

    @property
    def type(self) -> EventType:
        return EventType(self.kind, self.action)

    @property
    def event_type(self) -> str:
        """The wire form of :attr:`type`, for log lines and metric labels."""
        return str(self.type)

    @property
    def key(self) -> str:
        """``namespace/name``: how logs, metrics and state name an object."""
        return f"{self.obj.metadata.namespace}/{self.obj.metadata.name}"


# --- Envelope ---------------------------------------------------------------------------------


class _Headers(msgspec.Struct):
    headers: dict[str, str] = {}


class _Envelope(msgspec.Struct):
    header: _Headers
    message: msgspec.Raw


class _Update(msgspec.Struct):
    new_obj: msgspec.Raw
    # Raw cannot be part of a union; a missing old_obj reads as JSON null.
    old_obj: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_update_decoder = msgspec.json.Decoder(_Update)
_object_decoders: dict[Kind, msgspec.json.Decoder[AgonesObject]] = {
    Kind.FLEET: msgspec.json.Decoder(Fleet),
    Kind.GAMESERVER: msgspec.json.Decoder(GameServer),
}
_encoder = msgspec.json.Encoder()


def parse_event_type(event_type: str) -> EventType:
    """:meth:`EventType.parse`: (kind, action) of a wire string."""
    return EventType.parse(event_type)


def decode_event(data: bytes) -> Event:
    """Decode one envelope, as written by this project or by the Go agones-event-broadcaster.

    Raises ContractError naming the offending field (msgspec's ``at `$.message...` `` path).
    """
    if len(data) > MAX_EVENT_BYTES:
        raise ContractError(f"event of {len(data)} bytes exceeds the {MAX_EVENT_BYTES} byte limit")
    try:
        envelope = _envelope_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise ContractError(f"not an event envelope: {e}") from e
    except RecursionError as e:
        # msgspec refuses nesting deeper than its stack allows; hostile input, not a crash.
        raise ContractError("not an event envelope: JSON nested too deeply") from e
    event_type = envelope.header.headers.get("event_type")
    if event_type is None:
        raise ContractError("envelope has no header.headers.event_type")
    kind, action = parse_event_type(event_type)
    if action is Action.UPDATED:
        try:
            update = _update_decoder.decode(envelope.message)
        except msgspec.DecodeError as e:
            where = _at(e, "$.message")
            raise ContractError(f"updated event without new_obj/old_obj: {where}") from e
        obj = _decode_object(kind, update.new_obj, "$.message.new_obj")
        old = None
        if bytes(update.old_obj) != b"null":
            old = _decode_object(kind, update.old_obj, "$.message.old_obj")
        return Event(kind, action, obj, old)
    return Event(kind, action, _decode_object(kind, envelope.message, "$.message"))


def _decode_object(kind: Kind, raw: msgspec.Raw, where: str) -> AgonesObject:
    try:
        obj = _object_decoders[kind].decode(raw)
    except msgspec.DecodeError as e:
        raise ContractError(f"invalid {_API_KINDS[kind]}: {_at(e, where)}") from e
    if obj.kind and obj.kind != _API_KINDS[kind]:
        raise ContractError(f"{where}.kind is {obj.kind!r}, expected {_API_KINDS[kind]!r}")
    if not obj.metadata.name:
        raise ContractError(f"{where}.metadata.name is empty")
    return obj


def _at(error: msgspec.DecodeError, where: str) -> str:
    # msgspec paths are relative to the document it decoded; re-root them at the envelope. An
    # error about that document itself carries no path: name it, so every error says where.
    text = str(error)
    if " - at `$" not in text:
        return f"{text} - at `{where}`"
    return text.replace(" - at `$", f" - at `{where}", 1)


def encode_event(
    event_type: EventType | str, obj: dict[str, Any], old: dict[str, Any] | None = None
) -> bytes:
    """Build the envelope for a raw Kubernetes object (a dict, as the API returned it).

    ``managedFields`` is dropped: it is large, changes on every write and nobody downstream
    reads it. For ``updated`` events ``old`` is the previous object, or None when unknown.
    """
    kind, action = event = EventType.of(event_type)
    obj = _without_managed_fields(obj)
    _check_object(kind, obj)
    if action is Action.UPDATED:
        message: Any = {
            "old_obj": _without_managed_fields(old) if old is not None else None,
            "new_obj": obj,
        }
    else:
        message = obj
    return _encoder.encode({"header": {"headers": {"event_type": str(event)}}, "message": message})


def _without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or "managedFields" not in metadata:
        return obj
    metadata = {k: v for k, v in metadata.items() if k != "managedFields"}
    return {**obj, "metadata": metadata}


def _check_object(kind: Kind, obj: dict[str, Any]) -> None:
    """Refuse to publish what the reader would refuse to read."""
    _decode_object(kind, msgspec.Raw(_encoder.encode(obj)), "$")


# --- Subjects and headers ---------------------------------------------------------------------

# Kubernetes names are DNS-1123 (lower-case alphanumerics, '-' and '.'), so '_' never occurs in
# them and can stand in for '.', which NATS reserves as the token separator.
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def _token(value: str, what: str) -> str:
    if not _NAME_RE.match(value) or len(value) > 253:
        raise ContractError(f"{what} {value!r} is not a valid Kubernetes name")
    return value.replace(".", "_")


# Octops' agones-event-broadcaster publishes under ``agones.``; so does this project by default.
DEFAULT_PREFIX = "agones"


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ContractError(f"subject prefix {prefix!r} must be dot-separated [A-Za-z0-9_-] tokens")
    return prefix


def subject_for(prefix: str, event_type: EventType | str, namespace: str, name: str) -> str:
    """``<prefix>.<event_type>.<namespace>.<name>``: ``agones.fleet.events.added.default.x``."""
    middle = str(EventType.of(event_type))
    return ".".join(
        (check_prefix(prefix), middle, _token(namespace, "namespace"), _token(name, "name"))
    )


def subject_filter(prefix: str, kind: Kind, action: Action | None = None) -> str:
    """The wildcard subject of one kind (and optionally one action) of event."""
    middle = str(EventType(kind, action)) if action else f"{kind}.events.*"
    return f"{check_prefix(prefix)}.{middle}.*.*"


def object_filter(prefix: str, kind: Kind, namespace: str, name: str) -> str:
    """Every subject of one object, any action: ``<prefix>.fleet.events.*.<ns>.<name>``."""
    tokens = (_token(namespace, "namespace"), _token(name, "name"))
    return f"{check_prefix(prefix)}.{kind}.events.*.{'.'.join(tokens)}"


def decode_subject(prefix: str, subject: str) -> tuple[str, str, str]:
    """Inverse of subject_for: (event_type, namespace, name)."""
    head = check_prefix(prefix) + "."
    parts = subject[len(head) :].split(".") if subject.startswith(head) else []
    if len(parts) != 5:
        expected = f"<{prefix}>.<kind>.events.<action>.<namespace>.<name>"
        raise ContractError(f"subject {subject!r} is not {expected}")
    event_type = ".".join(parts[:3])
    parse_event_type(event_type)
    return event_type, parts[3].replace("_", "."), parts[4].replace("_", ".")


def message_id(uid: str, resource_version: str, event_type: EventType | str) -> str:
    """Deterministic, so a re-publish of the same change falls in JetStream's duplicate window."""
    wire = str(EventType.of(event_type))
    digest = hashlib.sha256(f"{uid}\x00{resource_version}\x00{wire}".encode()).hexdigest()
    return digest[:40]


def event_headers(event_type: EventType | str, obj: dict[str, Any]) -> dict[str, str]:
    metadata = obj.get("metadata") or {}
    uid = str(metadata.get("uid", ""))
    resource_version = str(metadata.get("resourceVersion", ""))
    return {
        HEADER_MSG_ID: message_id(uid, resource_version, event_type),
        HEADER_EVENT_TYPE: str(EventType.of(event_type)),
        HEADER_UID: uid,
        HEADER_RESOURCE_VERSION: resource_version,
    }


def images_of(obj: AgonesObject) -> list[tuple[str, str]]:
    """(container name, image) of every init and regular container, in pod-spec order.

    Every container counts (Octops image-syncer (Go) read only ``containers[0]``, and crashed on an
    empty list).
    Empty images are left out: the caller decides whether "no images" is an error.
    """
    spec = obj.pod_spec
    containers = (*(spec.init_containers or ()), *(spec.containers or ()))
    return [(c.name, c.image) for c in containers if c.image]


# A Fleet's next version, staged before the Fleet moves to it (``image-syncer rollout``): image
# references, comma-separated; empty or absent means none. The syncer pulls them for the Fleet as
# it pulls the template's images (same targeting, gate, pins, never removed while named here), so
# a rolling update finds them on every node. Written by people and CD tools: what does not parse
# as a reference is the reader's to skip and report, entry by entry.
NEXT_IMAGES_ANNOTATION = "image-syncer.octops.io/next-images"


def next_images_of(obj: AgonesObject) -> list[str]:
    """The entries of the object's next-images annotation (:func:`parse_next_images`)."""
    return parse_next_images((obj.metadata.annotations or {}).get(NEXT_IMAGES_ANNOTATION) or "")


def parse_next_images(value: str) -> list[str]:
    """``"a, b,,a"`` -> ``["a", "b"]``: entries stripped, empty ones dropped, first one kept."""
    return list(dict.fromkeys(entry.strip() for entry in value.split(",") if entry.strip()))


# --- Node images: what every node needs besides the Fleets' images ---------------------------
#
# The Agones SDK sidecar runs in every GameServer pod, so every node needs its image; the
# broadcaster finds it (the agones-controller Deployment's SIDECAR_IMAGE) and publishes it here.
# These messages have their own subject and stream (``wire.eventlog.node_images_stream_name``):
# nothing that reads the Fleet or GameServer streams, including Go consumers of Octops'
# broadcaster, ever sees a message that is not a Kubernetes object event.
#
#   subject  <prefix>.nodeimages.<source>          e.g. agones.nodeimages.agones-sdk
#   payload  {"source": "agones-sdk",
#             "images": ["us-docker.pkg.dev/agones-images/release/agones-sdk:1.44.0"],
#             "origin": "agones-system/agones-controller", "resource_version": "812",
#             "uid": "5f1c…"}
#
# One message per source (the stream keeps the newest per subject), so replay is one message.

AGONES_SDK_SOURCE = "agones-sdk"
_SOURCE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class NodeImages(msgspec.Struct, frozen=True, omit_defaults=True):
    """The images of one source that every node should hold (newest message per source wins)."""

    source: str
    images: list[str] = []
    # Where the broadcaster found them ("namespace/name" of the Deployment), for status and logs.
    origin: str = ""
    # The version of what they were read from (the Deployment's): of two messages of one source,
    # the writer keeps the newer (broadcaster.ordering), so the stream never goes backwards.
    resource_version: str = ""
    uid: str = ""


_node_images_decoder = msgspec.json.Decoder(NodeImages)


def check_source(source: str) -> str:
    if not _SOURCE_RE.match(source):
        raise ContractError(f"node-images source {source!r} must be a DNS label")
    return source


def node_images_subject(prefix: str, source: str) -> str:
    return f"{check_prefix(prefix)}.nodeimages.{check_source(source)}"


def node_images_filter(prefix: str) -> str:
    return f"{check_prefix(prefix)}.nodeimages.*"


def encode_node_images(message: NodeImages) -> bytes:
    check_source(message.source)
    if any(not image or len(image) > 4096 for image in message.images):
        raise ContractError("node images must be non-empty references")
    return _encoder.encode(message)


def decode_node_images(data: bytes) -> NodeImages:
    """Raises ContractError naming the offending field."""
    if len(data) > MAX_EVENT_BYTES:
        raise ContractError(
            f"message of {len(data)} bytes exceeds the {MAX_EVENT_BYTES} byte limit"
        )
    try:
        message = _node_images_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise ContractError(f"not a node-images message: {e}") from e
    check_source(message.source)
    return message


def node_images_message_id(message: NodeImages) -> str:
    """Deterministic: two broadcasters publishing the same finding store it once."""
    text = "\x00".join((message.source, message.resource_version, *message.images))
    return hashlib.sha256(text.encode()).hexdigest()[:40]
