"""The node status contract: what each syncer tells the cluster about its node, in NATS KV.

Every syncer keeps two entries in the bucket ``IMAGE_SYNCER_NODES`` (other subject prefixes get
``IMAGE_SYNCER_NODES_<PREFIX>``, so installations sharing a server stay apart):

- ``node.<node>``, its :class:`NodeStatus`, written when something changed (and refreshed long
  before its TTL runs out);
- ``beat.<node>``, a :class:`Heartbeat` of a few dozen bytes, written every heartbeat, so a quiet
  node costs the cluster almost nothing and readers can still tell it from a dead one. It carries
  what changes all the time without telling a reader anything new (the last reconcile's time), so
  the entry itself is written only when something a reader uses changed.

The syncer writes them (``syncer.reporting.reporter``); ``image-syncer status`` and ``wait`` read
them. Both import the shapes from here and nowhere else, so writer and readers cannot drift.

Compact by design. Thousands of nodes times hundreds of Fleets must fit in a read of a couple of
seconds, so an entry says per Fleet only which event it was folded from and, if the node does not
hold it completely yet, which images are missing; why an image is missing is said once per image.
Image strings appear only for what is missing. Features that have something to say about a node
(the pull budget, gates, pins, disk) each get one summary field on :class:`NodeState`, a Struct
whose fields all have defaults.

The same bucket holds replay requests, ``replay.<node>``: ``image-syncer replay`` writes one, the
node's syncer honours it (``syncer.reporting.replaykv``) and deletes it.

Ageing out. Status entries and heartbeats are written with a per-message TTL (``node_ttl``): a
node that vanished without a word disappears from the bucket once they expire. Replay requests
carry no TTL: a node that is down for a week still replays when it comes back. That is why the
bucket has no max age. Readers judge liveness from the newer of ``reported_at`` and the
heartbeat, so a node that stopped writing is *stale* long before its entry expires. History is 1.

Schema evolution. Fields are only ever added, each with a default, so an entry written by an
older syncer of the same schema still decodes and an older reader ignores fields it does not
know. Schema 3 replaced the image lists of schemas 1-2 (every desired and present image of every
Fleet: tens of KB per node) with the compact form; a reader meeting such an entry names the node
and says to upgrade its syncer (:class:`OutdatedEntry`), and a schema-2 reader meeting a schema-3
entry fails on ``$.state``, which is a string telling it to upgrade, instead of reading an empty
node.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.kv import KeyValue

from wire.contract import DEFAULT_PREFIX, check_prefix
from wire.directread import read_direct
from wire.kvbuckets import bind_bucket, ttl_bucket_config

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_POLL_INTERVAL",
    "SCHEMA",
    "BudgetSummary",
    "DiskSummary",
    "FleetGap",
    "GateStatus",
    "Heartbeat",
    "Missing",
    "MissingState",
    "NodeState",
    "NodeStatus",
    "OutdatedEntry",
    "PinSummary",
    "ReplayRequest",
    "StatusError",
    "StatusSettings",
    "StatusWatch",
    "beat_key",
    "bucket_name",
    "check_node",
    "decode_heartbeat",
    "decode_replay_request",
    "decode_status",
    "encode_heartbeat",
    "encode_replay_request",
    "encode_status",
    "ensure_status_bucket",
    "get_status",
    "is_stale",
    "list_statuses",
    "node_key",
    "open_status_bucket",
    "parse_fleet",
    "put_heartbeat",
    "put_status",
    "replay_key",
    "request_replay",
    "summarize",
]

DEFAULT_BUCKET = "IMAGE_SYNCER_NODES"
NODE_KEY_PREFIX = "node."
BEAT_KEY_PREFIX = "beat."
REPLAY_KEY_PREFIX = "replay."
SCHEMA = 3
# How often a :class:`StatusWatch` reads what changed, unless its reader says otherwise.
DEFAULT_POLL_INTERVAL = 2.0
# What a schema-2 reader finds in ``$.state`` of a newer entry; it expects an object there, so
# its decode error quotes this instead of silently reading a node with no Fleets.
OLD_READER_NOTICE = "status schema 3: upgrade image-syncer to read this entry"

# Kubernetes node names are DNS-1123 subdomains; all of their characters are valid in KV keys.
# A DNS-1123 subdomain, as Kubernetes requires of node names: dot-separated labels of at most 63
# characters, each starting and ending alphanumeric (so no "a..b", no ".a", no "a-.b").
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_NODE_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class StatusError(ValueError):
    """A node name, Fleet name or status entry does not follow this contract."""


@dataclass(frozen=True)
class StatusSettings:
    """Where node status lives; every syncer and CLI of one installation must agree."""

    prefix: str = DEFAULT_PREFIX
    # 1 locally, 3 in production, like the streams.
    replicas: int = 1
    # How long a node's entries outlive its last write: vanished nodes age out after this.
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
        raise StatusError(
            f"node name {node!r} is not a valid Kubernetes node name (lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit, at most 253 characters)"
        )
    return node


def node_key(node: str) -> str:
    return NODE_KEY_PREFIX + check_node(node)


def beat_key(node: str) -> str:
    return BEAT_KEY_PREFIX + check_node(node)


def replay_key(node: str) -> str:
    return REPLAY_KEY_PREFIX + check_node(node)


def parse_fleet(text: str) -> str:
    """``NAMESPACE/NAME`` checked and returned as is; the key status maps use for a Fleet."""
    namespace, sep, name = text.partition("/")
    if not sep or not _NAME_RE.match(namespace) or not _NAME_RE.match(name):
        raise StatusError(f"Fleet {text!r} is not NAMESPACE/NAME (e.g. default/simple-game-server)")
    return text


# --- Shapes ---------------------------------------------------------------------------------


class MissingState(enum.StrEnum):
    """Why a desired image is not on the node (yet)."""

    PENDING = "pending"  # not being pulled this moment: queued, or between retries
    PULLING = "pulling"
    WAITING_SLOT = "waiting_slot"  # waiting for a slot of the cluster-wide pull budget
    # Waiting for a seed to fetch the image from the registry first (--mirror): then this node
    # pulls it from the mirror.
    WAITING_SEED = "waiting_seed"
    FAILED = "failed"  # the last pull failed; retried with backoff and at every reconcile


class Missing(msgspec.Struct, frozen=True, omit_defaults=True):
    state: MissingState
    # The last pull's error (never credentials: the puller's error text).
    error: str = ""


class FleetGap(msgspec.Struct, frozen=True, array_like=True):
    """A desired Fleet the node does not hold completely: ``[total, [missing images...]]``."""

    # How many distinct images the Fleet wants on this node.
    total: int
    missing: tuple[str, ...]


class BudgetSummary(msgspec.Struct, frozen=True, omit_defaults=True):
    """The node's share of the cluster-wide pull budget (``--max-cluster-pulls``)."""

    # Images this node waits to pull until a cluster slot frees up.
    waiting: tuple[str, ...] = ()
    # While the registry answered 429, the cluster holds back pulls until this moment.
    backoff_until: datetime | None = None


class PinSummary(msgspec.Struct, frozen=True, omit_defaults=True):
    """Pinning of the node's images (``--pin-images``), so the kubelet's image GC skips them."""

    # False when the runtime cannot be told to pin (CRI-O, others) or pinning is turned off.
    enabled: bool = False
    # In words: the runtime and how it pins, or why pinning is off.
    runtime: str = ""
    # Desired images present on the node, and how many of them are pinned.
    images: int = 0
    pinned: int = 0


class DiskSummary(msgspec.Struct, frozen=True, omit_defaults=True):
    """The image filesystem and what it does to pulls (``--max-image-fs-usage``, GC backoff)."""

    # Used fraction of the fullest image filesystem at the last reading, in whole percents
    # rounded down (a change is a status write); None when unknown.
    usage: float | None = None
    max_usage: float = 0.0
    # Why pulls are paused now (the disk is over budget); empty when they may run.
    paused: str = ""
    # Images removed repeatedly behind the syncer's back, whose re-pull backs off now.
    gc_backoff: tuple[str, ...] = ()


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
    # When it closed on the kernel's boot-time clock, and which boot: a restarted syncer resumes
    # the timeout from these, never from ``closed_since`` (the wall clock may have been stepped).
    boot_id: str = ""
    closed_uptime: float | None = None


class NodeState(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the syncer knows about its node at one moment, compactly; the reporter's input.

    Build it with :func:`summarize`. Images are in the syncer's normalized form and only desired
    ones appear: the node's other images are none of the cluster's business.
    """

    # Desired Fleet ("namespace/name") -> stream sequence of the event the node folded it from,
    # so ``wait`` can tell "not updated yet" from "done" right after a publish.
    fleets: dict[str, int] = {}
    # Fleets the node knows of but that do not target it (node selector, affinity, taints),
    # with the same sequences: `wait` does not wait for them here.
    excluded: dict[str, int] = {}
    # Desired Fleets whose images are not all present; a Fleet not here is ready.
    gaps: dict[str, FleetGap] = {}
    # Every image some gap names -> why it is missing.
    missing: dict[str, Missing] = {}
    last_reconcile: datetime | None = None
    # The replay request this node honoured last, so `status` can show it was done.
    replayed_request: str = ""
    # When the Fleet stream the sequences above belong to was created. A stream lost and created
    # again restarts at 1: a sequence of one incarnation says nothing about the other.
    log_created: datetime | None = None
    # --- Summaries of other features: one field each, a Struct whose fields have defaults
    # (None = the feature is off or the writer does not know it), shown by ``status --node``.
    budget: BudgetSummary | None = None
    # Images every game server or the node itself needs besides the Fleets', by source
    # ("agones-sdk": the SDK sidecar the broadcaster found, "extra": --extra-image). Their
    # missing ones are in ``missing`` like a Fleet image's (``summarize`` puts them there).
    node_images: dict[str, list[str]] = {}
    # None when the syncer runs without --startup-taint (or is older than the gate).
    gate: GateStatus | None = None
    # None when the writer does not know the feature.
    pins: PinSummary | None = None
    disk: DiskSummary | None = None


def summarize(
    *,
    desired: Mapping[str, Iterable[str]],
    present: Collection[str],
    fleet_seqs: Mapping[str, int],
    excluded: Iterable[str] = (),
    pulling: Collection[str] = (),
    waiting_slot: Collection[str] = (),
    failed: Mapping[str, str] | None = None,
    held: Mapping[str, str] | None = None,
    waiting_seed: Collection[str] = (),
    **rest: Any,
) -> NodeState:
    """The compact state of a node holding ``present`` against ``desired`` (Fleet -> images).

    ``fleet_seqs`` covers desired and excluded Fleets; a Fleet without one gets 0 (seen by no
    reader as folded). ``held`` are images not pulled on purpose for now, with why (the disk is
    over budget, they keep being removed): pending, with that reason. ``rest`` are further
    :class:`NodeState` fields, passed through.
    """
    failed = failed or {}
    held = held or {}
    # A pull waiting for a seed is not waiting for a slot yet; it reads as waiting either way.
    waiting = {i: MissingState.WAITING_SLOT for i in waiting_slot}
    waiting.update((i, MissingState.WAITING_SEED) for i in waiting_seed)
    gaps: dict[str, FleetGap] = {}
    missing: dict[str, Missing] = {}
    for fleet, images in desired.items():
        unique = tuple(sorted(set(images)))
        absent = tuple(i for i in unique if i not in present)
        if absent:
            gaps[fleet] = FleetGap(total=len(unique), missing=absent)
            missing.update((i, _why(i, pulling, waiting, failed, held)) for i in absent)
    node_images = rest.get("node_images") or {}
    for images in node_images.values():
        missing.update(
            (i, _why(i, pulling, waiting, failed, held)) for i in images if i not in present
        )
    return NodeState(
        fleets={fleet: fleet_seqs.get(fleet, 0) for fleet in desired},
        excluded={fleet: fleet_seqs.get(fleet, 0) for fleet in excluded},
        gaps=gaps,
        missing=missing,
        **rest,
    )


def _why(
    image: str,
    pulling: Collection[str],
    waiting: Mapping[str, MissingState],
    failed: Mapping[str, str],
    held: Mapping[str, str],
) -> Missing:
    if image in held and image not in pulling:
        return Missing(MissingState.PENDING, held[image])
    error = failed.get(image, "")
    if image in pulling:
        return Missing(MissingState.PULLING, error)
    if image in waiting:
        return Missing(waiting[image], error)
    if error:
        return Missing(MissingState.FAILED, error)
    return Missing(MissingState.PENDING)


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One node's ``node.<node>`` entry: its state plus who wrote it, when, and which version.

    ``reported_at`` is when this entry was written; a reader's view moves it forward with the
    node's heartbeats (:class:`StatusWatch`).
    """

    node: str
    version: str
    reported_at: datetime
    started_at: datetime
    summary: NodeState = NodeState()
    schema: int = SCHEMA
    # Fixed; see OLD_READER_NOTICE.
    state: str = OLD_READER_NOTICE


class Heartbeat(msgspec.Struct, frozen=True, omit_defaults=True):
    """``beat.<node>``: the node's syncer was alive at ``at`` (by the node's clock).

    It also carries the time of the node's last reconcile, which changes every sync period: in
    the entry it would make every reconcile a write of the whole entry. Readers show the newer
    of the two (:class:`StatusWatch`).
    """

    at: datetime
    last_reconcile: datetime | None = None


class OutdatedEntry(StatusError):
    """An entry written by a syncer of an older schema, which this reader cannot judge.

    ``status`` carries what every schema has (node, version, times), with an empty summary, so
    a reader can still tell a live outdated node from a stale one.
    """

    def __init__(self, status: NodeStatus) -> None:
        super().__init__(
            f"status schema {status.schema} written by image-syncer {status.version}; this "
            f"image-syncer reads schema {SCHEMA}: upgrade the syncer on node {status.node}"
        )
        self.status = status


class _Header(msgspec.Struct, frozen=True, kw_only=True):
    """What entries of every schema have in common."""

    node: str
    version: str
    reported_at: datetime
    started_at: datetime
    schema: int = 1


class ReplayRequest(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    requested_at: datetime
    requested_by: str = ""

    @classmethod
    def new(cls, requested_by: str = "") -> ReplayRequest:
        return cls(id=uuid.uuid4().hex, requested_at=datetime.now(UTC), requested_by=requested_by)


def is_stale(status: NodeStatus, now: datetime, stale_after: float) -> bool:
    """No heartbeat within ``stale_after`` seconds (by the node's clock, NTP-close to ours)."""
    return (now - status.reported_at).total_seconds() > stale_after


# Deterministic: sets sorted, so equal states encode to equal bytes and diffs read well.
_encoder = msgspec.json.Encoder(order="deterministic")
_status_decoder = msgspec.json.Decoder(NodeStatus)
_header_decoder = msgspec.json.Decoder(_Header)
_beat_decoder = msgspec.json.Decoder(Heartbeat)
_replay_decoder = msgspec.json.Decoder(ReplayRequest)


def encode_status(status: NodeStatus) -> bytes:
    return _encoder.encode(status)


def decode_status(data: bytes) -> NodeStatus:
    """Decode an entry; :class:`OutdatedEntry` for an older schema, StatusError for junk."""
    try:
        status = _status_decoder.decode(data)
    except msgspec.DecodeError as e:
        header = _outdated_header(data)
        if header is not None:
            raise OutdatedEntry(header) from None
        raise StatusError(f"not a node status entry: {e}") from e
    if status.schema < SCHEMA:
        raise OutdatedEntry(msgspec.structs.replace(status, summary=NodeState()))
    return status


def _outdated_header(data: bytes) -> NodeStatus | None:
    try:
        header = _header_decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if header.schema >= SCHEMA:
        return None
    return NodeStatus(
        node=header.node,
        version=header.version,
        reported_at=header.reported_at,
        started_at=header.started_at,
        schema=header.schema,
    )


def encode_heartbeat(beat: Heartbeat) -> bytes:
    return _encoder.encode(beat)


def decode_heartbeat(data: bytes) -> Heartbeat:
    try:
        return _beat_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StatusError(f"not a heartbeat: {e}") from e


def encode_replay_request(request: ReplayRequest) -> bytes:
    return _encoder.encode(request)


def decode_replay_request(data: bytes) -> ReplayRequest:
    try:
        return _replay_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StatusError(f"not a replay request: {e}") from e


# --- The bucket -----------------------------------------------------------------------------


def _bucket_stream_config(settings: StatusSettings) -> StreamConfig:
    return ttl_bucket_config(
        settings.bucket, "image-syncer: per-node status and replay requests", settings.replicas
    )


async def ensure_status_bucket(js: JetStreamContext, settings: StatusSettings) -> KeyValue:
    """The bucket: created with its final config by the broadcaster at install
    (``wire.permissions.install_buckets``); bound here, created only where no auth forbids it."""
    return await bind_bucket(js, _bucket_stream_config(settings))


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


async def put_heartbeat(
    js: JetStreamContext,
    settings: StatusSettings,
    node: str,
    beat: Heartbeat,
    *,
    timeout: float = 5.0,
) -> int:
    """Write a node's heartbeat with the per-key TTL; returns the revision. Raises nats errors."""
    subject = f"$KV.{settings.bucket}.{beat_key(node)}"
    ack = await js.publish(
        subject, encode_heartbeat(beat), timeout=timeout, msg_ttl=settings.node_ttl
    )
    return ack.seq


async def get_status(kv: KeyValue, node: str) -> NodeStatus | None:
    try:
        entry = await kv.get(node_key(node))
    except nats.js.errors.KeyNotFoundError:
        return None
    return decode_status(entry.value or b"")


class StatusWatch:
    """A live view ``{node: status}`` of the bucket, kept current by polling it with direct gets.

    ``async with StatusWatch(kv) as watch`` reads every current entry first; then each
    ``await watch.next(timeout)`` waits for the next poll (one every ``interval`` seconds at
    most) that finds something new and applies it (True), or times out (False), so a reader
    can bound its waits by a deadline. A node's ``reported_at`` in the view is the newer of its
    entry's and its heartbeat's. Entries of an older schema are kept in ``outdated`` (node ->
    their header), entries that cannot be decoded in ``invalid`` (node -> reason), so a reader
    can name them instead of silently dropping them.

    Why polling rather than ``kv.watch()``: a watch is an ordered consumer, created through the
    bare ``$JS.API.CONSUMER.CREATE.<stream>``, whose body may name any consumer and deliver
    subject; the read-only role of ``wait`` and ``status`` may not send it
    (:mod:`wire.permissions`, rule 6). A poll asks the stream's info and, when its last sequence
    moved, reads only what was written since (:mod:`wire.directread`): an idle bucket costs one
    small request per interval, a busy one what changed. A bucket created again (its sequences
    start over) is read again in whole.
    """

    def __init__(self, kv: KeyValue, *, interval: float = DEFAULT_POLL_INTERVAL) -> None:
        # nats-py keeps the context and names on the KeyValue and offers no accessor.
        self._js: JetStreamContext = kv._js
        self._stream: str = kv._stream
        self._prefix = f"$KV.{kv._name}."
        self._interval = interval
        self._seen = 0
        self._created: datetime | None = None
        self._polled = 0.0
        self._beats: dict[str, Heartbeat] = {}
        self._written: dict[str, NodeStatus] = {}
        self.view: dict[str, NodeStatus] = {}
        self.outdated: dict[str, OutdatedEntry] = {}
        self.invalid: dict[str, str] = {}

    async def __aenter__(self) -> StatusWatch:
        await self._poll()
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None  # a poll leaves nothing behind on the server

    async def next(self, timeout: float) -> bool:
        """Apply what changed at the next poll that finds something; False if none did within
        ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            due = self._polled + self._interval
            if due > deadline:
                await asyncio.sleep(max(deadline - loop.time(), 0.0))
                return False
            await asyncio.sleep(max(due - loop.time(), 0.0))
            if await self._poll():
                return True

    async def _poll(self) -> bool:
        """Read what was written since the last poll; whether anything was."""
        self._polled = asyncio.get_running_loop().time()
        try:
            info = await self._js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            # The bucket is gone: no node reports anything.
            changed = bool(self._written or self._beats or self.outdated or self.invalid)
            self._forget()
            return changed
        last = info.state.last_seq
        if info.created != self._created or last < self._seen:
            self._forget()  # a bucket of its own, whose sequences started over
            self._created = info.created
        elif last == self._seen:
            return False
        applied = 0
        async for message in read_direct(self._js, self._stream, start_seq=self._seen + 1):
            gone = message.headers.get("KV-Operation") in ("DEL", "PURGE")
            self._apply(message.subject.removeprefix(self._prefix), None if gone else message.data)
            self._seen = max(self._seen, message.seq)
            applied += 1
        return applied > 0 or self._seen == 0

    def _forget(self) -> None:
        self._seen = 0
        self._created = None
        self._beats.clear()
        self._written.clear()
        self.view.clear()
        self.outdated.clear()
        self.invalid.clear()

    def _apply(self, key: str, value: bytes | None) -> None:
        if key.startswith(NODE_KEY_PREFIX):
            self._apply_status(key[len(NODE_KEY_PREFIX) :], value)
        elif key.startswith(BEAT_KEY_PREFIX):
            self._apply_beat(key[len(BEAT_KEY_PREFIX) :], value)

    def _apply_status(self, node: str, value: bytes | None) -> None:
        self._written.pop(node, None)
        self.view.pop(node, None)
        self.outdated.pop(node, None)
        self.invalid.pop(node, None)
        if value is None:
            return
        try:
            self._written[node] = decode_status(value)
        except OutdatedEntry as e:
            self.outdated[node] = e
        except StatusError as e:
            self.invalid[node] = str(e)
        else:
            self._refresh(node)

    def _apply_beat(self, node: str, value: bytes | None) -> None:
        self._beats.pop(node, None)
        if value is not None:
            with contextlib.suppress(StatusError):
                self._beats[node] = decode_heartbeat(value)
        if node in self._written:
            self._refresh(node)

    def _refresh(self, node: str) -> None:
        status = self._written[node]
        beat = self._beats.get(node)
        if beat is not None and beat.at > status.reported_at:
            status = msgspec.structs.replace(status, reported_at=beat.at)
        reconciled = beat.last_reconcile if beat is not None else None
        if reconciled is not None and (
            status.summary.last_reconcile is None or reconciled > status.summary.last_reconcile
        ):
            summary = msgspec.structs.replace(status.summary, last_reconcile=reconciled)
            status = msgspec.structs.replace(status, summary=summary)
        self.view[node] = status


async def list_statuses(kv: KeyValue) -> tuple[dict[str, NodeStatus], dict[str, str]]:
    """The current view and the entries it cannot show (outdated or undecodable), read once."""
    async with StatusWatch(kv) as watch:
        unreadable = {node: str(e) for node, e in watch.outdated.items()}
        return watch.view, {**unreadable, **watch.invalid}


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
