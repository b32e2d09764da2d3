"""The node status contract: what each syncer tells the cluster about its node, in NATS KV.

Every syncer keeps one entry, ``node.<node>``, in the bucket ``IMAGE_SYNCER_NODES`` (other
subject prefixes get ``IMAGE_SYNCER_NODES_<PREFIX>``, so installations sharing a server stay
apart). The syncer writes it (``syncer.status``); ``image-syncer status`` and ``wait`` read it.
Both import the shapes from here and nowhere else, so writer and readers cannot drift.

The same bucket holds replay requests, ``replay.<node>``: ``image-syncer replay`` writes one, the
node's syncer honours it (``syncer.replaycontrol``) and deletes it.

Ageing out. Status entries are written with a per-message TTL (``node_ttl``): a node that
vanished without a word disappears from the bucket once its last heartbeat expires. Replay
requests carry no TTL: a node that is down for a week still replays when it comes back. That is
why the bucket has no max age. Readers judge liveness from ``reported_at``, which the syncer
refreshes at least every heartbeat, so a node that stopped writing is *stale* long before its
entry expires. History is 1: only the newest state of a node matters.

Schema evolution. Fields are only ever added, each with a default, so an entry written by an
older syncer still decodes (the new field reads as its default) and an older reader ignores
fields it does not know. ``NodeStatus.schema`` says which fields the writer knew of: a default
value from a writer that knew the field means "none", from an older writer "not reported".
Schema 2 added ``NodeState.fleet_seqs``.
"""

from __future__ import annotations

import contextlib
import enum
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from wire.contract import check_prefix

__all__ = [
    "DEFAULT_BUCKET",
    "FleetProgress",
    "FleetTarget",
    "GateStatus",
    "NodeReadiness",
    "NodeState",
    "NodeStatus",
    "Readiness",
    "ReplayRequest",
    "StatusError",
    "StatusSettings",
    "StatusWatch",
    "bucket_name",
    "check_node",
    "decode_replay_request",
    "decode_status",
    "encode_replay_request",
    "encode_status",
    "ensure_status_bucket",
    "fleet_progress",
    "get_status",
    "is_stale",
    "list_statuses",
    "node_key",
    "node_readiness",
    "open_status_bucket",
    "parse_fleet",
    "put_status",
    "replay_key",
    "reports_fleet_seqs",
    "request_replay",
]

DEFAULT_BUCKET = "IMAGE_SYNCER_NODES"
NODE_KEY_PREFIX = "node."
REPLAY_KEY_PREFIX = "replay."
SCHEMA = 2
# The first schema whose writers report ``NodeState.fleet_seqs``.
FLEET_SEQS_SCHEMA = 2

# Kubernetes node names are DNS-1123 subdomains; all of their characters are valid in KV keys.
_NODE_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class StatusError(ValueError):
    """A node name, Fleet name or status entry does not follow this contract."""


@dataclass(frozen=True)
class StatusSettings:
    """Where node status lives; every syncer and CLI of one installation must agree."""

    prefix: str = "agones"
    # 1 locally, 3 in production, like the streams.
    replicas: int = 1
    # How long a node's entry outlives its last write: vanished nodes age out after this.
    node_ttl: float = 3600.0

    @property
    def bucket(self) -> str:
        return bucket_name(self.prefix)


def bucket_name(prefix: str) -> str:
    """``IMAGE_SYNCER_NODES`` for the default prefix ``agones``; other prefixes get their own."""
    check_prefix(prefix)
    if prefix == "agones":
        return DEFAULT_BUCKET
    return f"{DEFAULT_BUCKET}_{re.sub(r'[^A-Za-z0-9]', '_', prefix).upper()}"


def check_node(node: str) -> str:
    if not _NODE_RE.match(node) or len(node) > 253:
        raise StatusError(f"node name {node!r} is not a valid Kubernetes node name")
    return node


def node_key(node: str) -> str:
    return NODE_KEY_PREFIX + check_node(node)


def replay_key(node: str) -> str:
    return REPLAY_KEY_PREFIX + check_node(node)


def parse_fleet(text: str) -> str:
    """``NAMESPACE/NAME`` checked and returned as is; the key status maps use for a Fleet."""
    namespace, sep, name = text.partition("/")
    if not sep or not _NAME_RE.match(namespace) or not _NAME_RE.match(name):
        raise StatusError(f"Fleet {text!r} is not NAMESPACE/NAME (e.g. default/simple-game-server)")
    return text


# --- Shapes ---------------------------------------------------------------------------------


class GateStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    """The startup-taint gate of a node (``--startup-taint``): is the node open for game servers?

    ``state`` is ``waiting`` (the syncer has not yet read its Node or the log), ``closed`` (the
    node carries the taint; ``missing`` lists the images still to come) or ``open`` (no taint;
    ``opened_at`` is set when this syncer removed it, ``by_timeout`` when images were still
    missing then).
    """

    taint: str
    state: str = "waiting"
    missing: list[str] = []
    closed_since: datetime | None = None
    opened_at: datetime | None = None
    by_timeout: bool = False


class NodeState(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the syncer knows about its node at one moment; the reporter's input.

    Images are written in the syncer's normalized form. ``present``, ``pulling`` and ``failed``
    only speak of desired images: the node's other images are none of the cluster's business.
    """

    # "namespace/name" -> the Fleet's images, in pod-spec order.
    desired: dict[str, list[str]] = {}
    present: frozenset[str] = frozenset()
    pulling: frozenset[str] = frozenset()
    # image -> why its last pull failed (never credentials: the puller's error text).
    failed: dict[str, str] = {}
    # Fleets the node knows of but that do not target it (node selector, affinity, taints):
    # `wait` does not wait for them here, where "not desired" alone may mean "not seen yet".
    excluded: frozenset[str] = frozenset()
    last_reconcile: datetime | None = None
    # The replay request this node honoured last, so `status` can show it was done.
    replayed_request: str = ""
    # "namespace/name" -> stream sequence of the last event the node folded for that Fleet, for
    # every desired and excluded Fleet: which version of the Fleet ``desired`` and ``excluded``
    # reflect, so `wait` can tell "not updated yet" from "done" right after a publish.
    fleet_seqs: dict[str, int] = {}
    # Images every game server or the node itself needs besides the Fleets', by source
    # ("agones-sdk": the SDK sidecar the broadcaster found, "extra": --extra-image). Their
    # presence is in ``present``/``pulling``/``failed`` like a Fleet image's.
    node_images: dict[str, list[str]] = {}
    # None when the syncer runs without --startup-taint (or is older than the gate).
    gate: GateStatus | None = None


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One node's KV entry: its state plus who wrote it, when, and with which version."""

    node: str
    version: str
    reported_at: datetime
    started_at: datetime
    state: NodeState = NodeState()
    schema: int = SCHEMA


class ReplayRequest(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    requested_at: datetime
    requested_by: str = ""

    @classmethod
    def new(cls, requested_by: str = "") -> ReplayRequest:
        return cls(id=uuid.uuid4().hex, requested_at=datetime.now(UTC), requested_by=requested_by)


class FleetProgress(msgspec.Struct, frozen=True):
    """How far one node is with one Fleet: what a status cell and ``wait`` look at."""

    images: tuple[str, ...]
    present: tuple[str, ...]
    pulling: tuple[str, ...]
    failed: dict[str, str]

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(i for i in self.images if i not in self.present)

    @property
    def complete(self) -> bool:
        return not self.missing


def fleet_progress(status: NodeStatus, fleet: str) -> FleetProgress | None:
    """The node's progress on ``fleet``, or None when the node does not want it."""
    images = status.state.desired.get(fleet)
    if images is None:
        return None
    return _progress(status.state, images)


def _progress(state: NodeState, images: list[str] | tuple[str, ...]) -> FleetProgress:
    unique = tuple(dict.fromkeys(images))
    return FleetProgress(
        images=unique,
        present=tuple(i for i in unique if i in state.present),
        pulling=tuple(i for i in unique if i in state.pulling and i not in state.present),
        failed={i: state.failed[i] for i in unique if i in state.failed and i not in state.present},
    )


# --- Readiness: a node against the Fleet as the event log has it -----------------------------


class FleetTarget(msgspec.Struct, frozen=True):
    """A live Fleet as the event log has it now: its newest event's sequence and its images.

    ``images`` are normalized the way the syncer normalizes them, so they compare with
    ``NodeState.present``.
    """

    seq: int
    images: tuple[str, ...]


class Readiness(enum.StrEnum):
    DONE = "done"  # at (or past) the target, every image present
    NOT_TARGETED = "not_targeted"  # at (or past) the target, and the Fleet is not for this node
    BEHIND = "behind"  # has not folded the target event yet (or the Fleet at all)
    MISSING = "missing"  # at (or past) the target, images still missing


@dataclass(frozen=True)
class NodeReadiness:
    verdict: Readiness
    # The node's sequence for the Fleet; None when it reports none (older syncer, or unseen).
    seq: int | None
    # Written by a syncer that reports no sequences: judged by its images alone.
    legacy: bool
    # Progress on the images judged, for MISSING (and DONE); None otherwise.
    progress: FleetProgress | None = None

    @property
    def counts_as_done(self) -> bool:
        return self.verdict in (Readiness.DONE, Readiness.NOT_TARGETED)


def reports_fleet_seqs(status: NodeStatus) -> bool:
    """Whether the writer knew ``fleet_seqs``: an empty map then means "folded no Fleet"."""
    return status.schema >= FLEET_SEQS_SCHEMA


def node_readiness(status: NodeStatus, fleet: str, target: FleetTarget) -> NodeReadiness:
    """Is ``fleet`` as of ``target`` ready on this node? What a CD pipeline's ``wait`` asks.

    A node is done only once it folded the target event (its sequence for the Fleet is at least
    ``target.seq``) and holds every image, or excludes the Fleet as of that event. Before that
    its entry may speak of an older version whose images are all present. A node past the
    target folded a newer version, so its own images for the Fleet are judged: ``present``
    covers only desired images, and the target's may no longer be. Entries of older syncers
    carry no sequences: they are judged by the target's images alone, as before (``legacy``).
    """
    state = status.state
    if not reports_fleet_seqs(status):
        return _legacy_readiness(state, fleet, target)
    seq = state.fleet_seqs.get(fleet)
    if seq is None or seq < target.seq:
        return NodeReadiness(Readiness.BEHIND, seq, legacy=False)
    if fleet in state.excluded:
        return NodeReadiness(Readiness.NOT_TARGETED, seq, legacy=False)
    images = target.images if seq == target.seq else state.desired.get(fleet, [])
    progress = _progress(state, images)
    verdict = Readiness.DONE if progress.complete else Readiness.MISSING
    return NodeReadiness(verdict, seq, legacy=False, progress=progress)


def _legacy_readiness(state: NodeState, fleet: str, target: FleetTarget) -> NodeReadiness:
    if fleet in state.excluded:
        return NodeReadiness(Readiness.NOT_TARGETED, None, legacy=True)
    if fleet not in state.desired:
        return NodeReadiness(Readiness.BEHIND, None, legacy=True)
    progress = _progress(state, target.images)
    verdict = Readiness.DONE if progress.complete else Readiness.MISSING
    return NodeReadiness(verdict, None, legacy=True, progress=progress)


def is_stale(status: NodeStatus, now: datetime, stale_after: float) -> bool:
    """No heartbeat within ``stale_after`` seconds (by the node's clock, NTP-close to ours)."""
    return (now - status.reported_at).total_seconds() > stale_after


# Deterministic: sets sorted, so equal states encode to equal bytes and diffs read well.
_encoder = msgspec.json.Encoder(order="deterministic")
_status_decoder = msgspec.json.Decoder(NodeStatus)
_replay_decoder = msgspec.json.Decoder(ReplayRequest)


def encode_status(status: NodeStatus) -> bytes:
    return _encoder.encode(status)


def decode_status(data: bytes) -> NodeStatus:
    try:
        return _status_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StatusError(f"not a node status entry: {e}") from e


def encode_replay_request(request: ReplayRequest) -> bytes:
    return _encoder.encode(request)


def decode_replay_request(data: bytes) -> ReplayRequest:
    try:
        return _replay_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StatusError(f"not a replay request: {e}") from e


# --- The bucket -----------------------------------------------------------------------------


def _bucket_stream_config(settings: StatusSettings) -> StreamConfig:
    # What nats-py's create_key_value would build, so update_stream can bring an existing bucket
    # in line (replicas) instead of failing on a configuration mismatch.
    return StreamConfig(
        name=f"KV_{settings.bucket}",
        description="image-syncer: per-node status and replay requests",
        subjects=[f"$KV.{settings.bucket}.>"],
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        max_msgs_per_subject=1,
        max_msgs=-1,
        max_consumers=-1,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        allow_direct=True,
        deny_delete=True,
        deny_purge=False,
    )


async def ensure_status_bucket(js: JetStreamContext, settings: StatusSettings) -> KeyValue:
    """Create the bucket, or bring an existing one's settings in line. Idempotent."""
    config = _bucket_stream_config(settings)
    try:
        await js.update_stream(config)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
    return await js.key_value(settings.bucket)


async def open_status_bucket(js: JetStreamContext, settings: StatusSettings) -> KeyValue | None:
    """The bucket for readers, or None when no syncer (nor ``replay``) ever created it."""
    try:
        return await js.key_value(settings.bucket)
    except nats.js.errors.BucketNotFoundError:
        return None


async def put_status(
    js: JetStreamContext, settings: StatusSettings, status: NodeStatus, *, timeout: float = 5.0
) -> int:
    """Write a node's entry with the per-key TTL; returns the revision. Raises nats errors."""
    subject = f"$KV.{settings.bucket}.{node_key(status.node)}"
    data = encode_status(status)
    ack = await js.publish(subject, data, timeout=timeout, msg_ttl=settings.node_ttl)
    return ack.seq


async def get_status(kv: KeyValue, node: str) -> NodeStatus | None:
    try:
        entry = await kv.get(node_key(node))
    except nats.js.errors.KeyNotFoundError:
        return None
    return decode_status(entry.value or b"")


class StatusWatch:
    """A live view ``{node: status}`` of the bucket, kept current by a KV watch.

    ``async with StatusWatch(kv) as watch`` reads every current entry first; then each
    ``await watch.next(timeout)`` applies one change (True) or times out (False), so a reader
    can bound its waits by a deadline without polling. Entries that cannot be decoded are kept
    in ``invalid`` (node -> reason), so a reader can name them instead of silently dropping them.
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._watcher: KeyValue.KeyWatcher | None = None
        self.view: dict[str, NodeStatus] = {}
        self.invalid: dict[str, str] = {}

    async def __aenter__(self) -> StatusWatch:
        self._watcher = await self._kv.watch(NODE_KEY_PREFIX + ">")
        while (entry := await self._watcher.updates(timeout=None)) is not None:
            self._apply(entry)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()

    async def next(self, timeout: float) -> bool:
        """Apply the next change; False if none came within ``timeout`` seconds."""
        assert self._watcher is not None, "use StatusWatch as an async context manager"
        try:
            entry = await self._watcher.updates(timeout=max(timeout, 0.001))
        except nats.errors.TimeoutError:
            return False
        if entry is not None:
            self._apply(entry)
        return True

    def _apply(self, entry: KeyValue.Entry) -> None:
        node = entry.key[len(NODE_KEY_PREFIX) :]
        self.view.pop(node, None)
        self.invalid.pop(node, None)
        if entry.operation in (KV_DEL, KV_PURGE):
            return
        try:
            self.view[node] = decode_status(entry.value or b"")
        except StatusError as e:
            self.invalid[node] = str(e)


async def list_statuses(kv: KeyValue) -> tuple[dict[str, NodeStatus], dict[str, str]]:
    """The current view and the undecodable entries, read once."""
    async with StatusWatch(kv) as watch:
        return watch.view, watch.invalid


async def request_replay(
    js: JetStreamContext, settings: StatusSettings, node: str, requested_by: str = ""
) -> ReplayRequest:
    """Ask ``node`` to replay the whole log: now if its syncer runs, else on its next start.

    A newer request replaces an older one that was not honoured yet; one replay serves both.
    """
    kv = await ensure_status_bucket(js, settings)
    request = ReplayRequest.new(requested_by)
    await kv.put(replay_key(node), encode_replay_request(request))
    return request
