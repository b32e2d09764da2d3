"""Who may do what on NATS: the accounts, and the one list of subjects each role needs.

The NATS server's accounts file is generated from this module (``python -m wire.permissions``
for the static install's ``deploy/nats/base/auth.conf``, ``--callout`` for the auth callout's
``deploy/nats/components/auth-callout/callout.conf``) and tests fail when a file is stale.

Structure (both installs). NATS checks a request's subject against the sender's permissions,
never its reply subject, and the JetStream API answers to the reply subject from inside the
server: any stream capturing that subject would store the answer. So JetStream lives in an
account of its own, :data:`JS_ACCOUNT`, holding every stream and bucket, and exporting the API
(``$JS.API.>``, answers streamed), acks, flow control, the KV subjects and the event subjects as
services; every client (broadcaster, syncers) lives in :data:`ACCOUNT`, which imports them. A
service import rewrites the reply subject to a ``_R_`` subject answered only to the requester, so
no reply a client names can reach a stream. Only the operator (``admin``) lives in ``JS``.

Every list is an allow-list. The rules every new subject, bucket or consumer must follow:

1. A node never creates, updates or deletes a stream, bucket or consumer. A consumer's config
   names its own deliver subject, and the server stores a push delivery into any stream capturing
   it: a consumer create is a write to any stream. Nodes read with ``STREAM.INFO`` and
   ``DIRECT.GET`` (:mod:`wire.directread`), never with ``kv.watch()`` or an ordered consumer.
2. A consumer a node uses is created for it by a trusted identity (the auth callout at the node's
   login, :mod:`authcallout.durables`; the install, the broadcaster), named ``syncer-<node>`` or
   ``syncer-<node>-<purpose>``; the node gets ``CONSUMER.INFO``, ``CONSUMER.MSG.NEXT`` and its
   ``$JS.ACK`` subjects for that literal name only. Anything pushed to a node goes to its inbox
   ``_INBOX.syncer-<node>.>``.
3. Every key a node writes carries the node in a fixed place, so a literal permission scopes it:
   ``<kind>.<node>`` (status: the node name may have dots, the permission is literal),
   ``<node>.<one token>`` (ledgers: node ``a`` cannot reach ``a.b``'s), or
   ``<kind>.<one token>.<node token>`` (:func:`node_token`; pull slots, backoffs, leases).
4. Every bucket is created by the broadcaster at start with its final config
   (:func:`install_buckets`, :func:`wire.kvbuckets.ensure_bucket`), refuses ``Nats-Rollup``, and a
   bucket found with another config is refused. Entries nodes write that others wait on carry a
   TTL, the bucket a ``max_age``, and readers check their age (no header can be forbidden).
5. Whatever a node writes that another reads is validated by the reader.
6. The ``reader`` role (``wait``, ``status``, ``rollout --stage-only``: a CD job's identity,
   copied into every Fleet's namespace) only reads: ``$JS.API.INFO``, and ``STREAM.INFO`` and
   ``DIRECT.GET`` on the Fleet stream, the node images and the buckets those commands read
   (:func:`reader_permissions`); no consumer of any kind, no other publish, replies only on its
   own inbox ``_INBOX.reader.>``. It keeps a live view by polling with direct gets
   (:class:`wire.nodestatus.StatusWatch`).

The static install has one shared syncer user: NATS wildcards match whole tokens, so it may use
any node's durable, write any node's keys and slots, and create the Fleet stream's consumers
(``CONSUMER.CREATE.<stream>.<name>.<filter>``, the filter fixed by the subject): a stolen
syncer password can disturb every node's bookkeeping, and a push consumer it creates delivers
into any stream whose subject some client of the JetStream account (only the operator) listens
on. With the auth callout every syncer connects as its own node
(:func:`node_syncer_permissions`), and none of this is possible.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from nats.js.api import StreamConfig

from wire import nodestatus
from wire.contract import DEFAULT_PREFIX, Kind, check_prefix, node_images_filter, subject_filter
from wire.eventlog import node_images_stream_name, stream_name
from wire.kvbuckets import SLOTS_MAX_AGE, ttl_bucket_config

__all__ = [
    "ACCOUNT",
    "AUTH_ACCOUNT",
    "AUTH_PASSWORD_ENV",
    "AUTH_USER",
    "BROADCASTER_INBOX",
    "CALLOUT_ISSUER_ENV",
    "IMAGES_CONSUMER_SUFFIX",
    "JS_ACCOUNT",
    "LEASE_BUCKET",
    "NODES_BUCKET",
    "PASSWORD_ENV",
    "PINNED_BUCKET",
    "PULLED_BUCKET",
    "READER_INBOX",
    "REPLAY_CONSUMER_SUFFIX",
    "SLOTS_BUCKET",
    "SYNCER_CONSUMER_PREFIX",
    "RolePermissions",
    "admin_permissions",
    "admin_user",
    "broadcaster_permissions",
    "bucket_for",
    "callout_permissions",
    "durable_name",
    "inbox_prefix",
    "install_buckets",
    "node_syncer_permissions",
    "node_token",
    "reader_permissions",
    "render_accounts",
    "render_callout_accounts",
    "syncer_permissions",
]

ACCOUNT = "IMAGE_SYNCER"
# Every stream and bucket lives here, reached by the clients only through service imports.
JS_ACCOUNT = "JS"
NODES_BUCKET = nodestatus.DEFAULT_BUCKET
# The syncer's cleanup records (syncer.keeping.cleaner.BUCKET; a test keeps the two equal).
PULLED_BUCKET = "IMAGE_SYNCER_PULLED"
# The names each syncer pinned itself (syncer.keeping.pinledger.BUCKET; a test keeps the two equal).
PINNED_BUCKET = "IMAGE_SYNCER_PINNED"
# The cluster-wide pull slots, registry backoffs, seed leases and seed reports
# (syncer.pulling.pullbudget.BUCKET; a test keeps the two equal).
SLOTS_BUCKET = "IMAGE_SYNCER_PULL_SLOTS"
LEASE_BUCKET = "IMAGE_SYNCER_LEASE"
SYNCER_CONSUMER_PREFIX = "syncer-"

# The NATS server reads each user's password from this environment variable, filled from a
# Kubernetes Secret: the config file never holds a credential.
PASSWORD_ENV = {
    "broadcaster": "NATS_BROADCASTER_PASSWORD",
    "syncer": "NATS_SYNCER_PASSWORD",
    "admin": "NATS_ADMIN_PASSWORD",
    "reader": "NATS_READER_PASSWORD",
}

# With the auth callout: the callout service's own account and user (it alone bypasses the
# callout), and the server's environment variables for its password and the issuer's public key.
AUTH_ACCOUNT = "AUTH"
AUTH_USER = "auth"
AUTH_PASSWORD_ENV = "NATS_AUTH_PASSWORD"
CALLOUT_ISSUER_ENV = "NATS_CALLOUT_ISSUER"

_API = "$JS.API"
# Request/reply responses and push-consumer deliveries both land on the client's inbox.
_INBOX = "_INBOX.>"


@dataclass(frozen=True)
class RolePermissions:
    """Subjects a NATS user may publish to and subscribe to (allow-lists)."""

    user: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def _direct_reader(stream: str) -> list[str]:
    """Read a stream or bucket without a consumer: info, and direct gets (batched, by subject).

    What a node may send: a direct get's answer goes to the requester only (see the module).
    """
    return [
        f"{_API}.STREAM.INFO.{stream}",
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
    ]


def _stream_reader(stream: str) -> list[str]:
    """Also follow a stream through ephemeral ordered consumers (``read_log(follow=True)``,
    ``kv.watch()``): trusted roles only, since a consumer create names any deliver subject."""
    return [
        *_direct_reader(stream),
        f"{_API}.STREAM.MSG.GET.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"{_API}.CONSUMER.INFO.{stream}.*",
        # Flow-control replies of push consumers.
        f"$JS.FC.{stream}.>",
    ]


def _pushed(stream: str, consumer: str, filter_subject: str) -> list[str]:
    """One named push consumer (``syncer.following``): created on the subject that names its
    filter, so its body cannot pick another; its state read, its flow control answered. Never
    deleted by the node: it expires when unused. An exception to rule 1 (see the module)."""
    return [
        f"{_API}.CONSUMER.CREATE.{stream}.{consumer}.{filter_subject}",
        f"{_API}.CONSUMER.INFO.{stream}.{consumer}",
        f"$JS.FC.{stream}.{consumer}.>",
    ]


# The suffixes of a node's push consumers on its durable's name (syncer.node.nodeimages and
# syncer.reporting.replaykv use the same; a test keeps them equal).
IMAGES_CONSUMER_SUFFIX = "-images"
REPLAY_CONSUMER_SUFFIX = "-replay"


def _kv_bucket(bucket: str) -> list[str]:
    """Create, bring in line, read, write and watch one KV bucket; never delete or purge it."""
    stream = f"KV_{bucket}"
    return [
        f"$KV.{bucket}.>",
        f"{_API}.STREAM.CREATE.{stream}",
        f"{_API}.STREAM.UPDATE.{stream}",
        *_stream_reader(stream),
    ]


def bucket_for(base: str, prefix: str) -> str:
    """``base`` for the default prefix, else suffixed: the rule of ``nodestatus.bucket_name``."""
    if check_prefix(prefix) == DEFAULT_PREFIX:
        return base
    return f"{base}_{re.sub(r'[^A-Za-z0-9]', '_', prefix).upper()}"


def node_token(node: str) -> str:
    """The node as one subject token (``.`` becomes ``_``; node names never hold ``_``, so the
    mapping is one-to-one): where a key needs the node in one fixed token (rule 3)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", node)


def durable_name(node: str) -> str:
    """``syncer-<node>``: JetStream names may not hold ``.``, ``*``, ``>`` or whitespace.

    Node names are DNS subdomains (no ``_``), so the mapping is one-to-one: no two nodes share a
    durable, nor an inbox prefix, which is built from it.
    """
    return SYNCER_CONSUMER_PREFIX + node_token(node)


def inbox_prefix(identity: str) -> str:
    """The reply-subject prefix of one identity (a single token, e.g. ``syncer-node-1``).

    Every role connects with its own prefix; a per-node identity may subscribe to its own only,
    so it can read no other client's replies or deliveries.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", identity):
        raise ValueError(f"inbox identity {identity!r} must be one token of [A-Za-z0-9_-]")
    return f"{_INBOX[:-2]}.{identity}"


BROADCASTER_INBOX = "broadcaster"
# The inbox identity of the read-only commands (wait, status, rollout): the reader role may
# subscribe to this prefix alone.
READER_INBOX = "reader"


def install_buckets(prefix: str = DEFAULT_PREFIX, replicas: int = 1) -> list[StreamConfig]:
    """Every bucket nodes use, with its final config: the broadcaster creates them at start."""
    return [
        ttl_bucket_config(
            nodestatus.bucket_name(prefix),
            "image-syncer: per-node status and replay requests",
            replicas,
        ),
        # The ledgers' keys carry a TTL too (syncer.keeping.ledger).
        ttl_bucket_config(
            bucket_for(PULLED_BUCKET, prefix),
            "image-syncer: images each node's syncer pulled itself",
            replicas,
        ),
        ttl_bucket_config(
            bucket_for(PINNED_BUCKET, prefix),
            "image-syncer: names each node's syncer pinned itself",
            replicas,
        ),
        ttl_bucket_config(
            bucket_for(SLOTS_BUCKET, prefix),
            "image-syncer: cluster-wide pull slots and registry backoffs",
            replicas,
            max_age=SLOTS_MAX_AGE,
        ),
    ]


def broadcaster_permissions(
    prefix: str = DEFAULT_PREFIX, *, own_inbox: bool = False
) -> RolePermissions:
    """``own_inbox``: replies only on the broadcaster's own prefix (per-identity auth)."""
    publish = [f"{_API}.INFO"]
    for kind in Kind:
        stream = stream_name(prefix, kind)
        publish += [
            subject_filter(prefix, kind),
            f"{_API}.STREAM.CREATE.{stream}",
            f"{_API}.STREAM.UPDATE.{stream}",
            # Compaction on delete purges an object's older messages.
            f"{_API}.STREAM.PURGE.{stream}",
            *_stream_reader(stream),
        ]
    # The node-images stream (the Agones SDK sidecar's image): publish and keep it in line.
    images = node_images_stream_name(prefix)
    publish += [
        node_images_filter(prefix),
        f"{_API}.STREAM.CREATE.{images}",
        f"{_API}.STREAM.UPDATE.{images}",
        # What the bus holds decides what to publish (broadcaster.sidecar): one get per refresh.
        f"{_API}.STREAM.MSG.GET.{images}",
        *_direct_reader(images),
    ]
    publish += _kv_bucket(bucket_for(LEASE_BUCKET, prefix))
    # Every bucket nodes use: created at start with its final config (rule 4). Its keys are the
    # nodes': the broadcaster reads the status (Events on Fleets), writes nothing there.
    for config in install_buckets(prefix):
        stream = config.name or ""
        publish += [f"{_API}.STREAM.CREATE.{stream}", f"{_API}.STREAM.UPDATE.{stream}"]
        publish += _stream_reader(stream)
    inbox = f"{inbox_prefix(BROADCASTER_INBOX)}.>" if own_inbox else _INBOX
    return RolePermissions("broadcaster", tuple(publish), (inbox,))


def _node_reads(prefix: str) -> list[str]:
    """What every syncer reads: the log and the node images, and every bucket's keys."""
    publish = [
        f"{_API}.INFO",
        *_direct_reader(stream_name(prefix, Kind.FLEET)),
        *_direct_reader(node_images_stream_name(prefix)),
    ]
    for config in install_buckets(prefix):
        publish += _direct_reader(config.name or "")
    return publish


def _node_consumer(stream: str, name: str) -> list[str]:
    """Use a consumer someone else created (rule 2): pull, ack, read its state."""
    return [
        f"{_API}.CONSUMER.INFO.{stream}.{name}",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


def syncer_permissions(prefix: str = DEFAULT_PREFIX) -> RolePermissions:
    """The static install's one syncer user, shared by every node (see the module's residual)."""
    stream = stream_name(prefix, Kind.FLEET)
    status = nodestatus.bucket_name(prefix)
    slots = bucket_for(SLOTS_BUCKET, prefix)
    publish = [
        *_node_reads(prefix),
        # Any node's durable: created with its filter in the subject (the server refuses a body
        # with another filter), deleted to restart it at a new sequence.
        f"{_API}.CONSUMER.CREATE.{stream}.*.{subject_filter(prefix, Kind.FLEET)}",
        f"{_API}.CONSUMER.DELETE.{stream}.*",
        *_node_consumer(stream, "*"),
        f"$KV.{status}.{nodestatus.NODE_KEY_PREFIX}>",
        f"$KV.{status}.{nodestatus.BEAT_KEY_PREFIX}>",
        f"$KV.{status}.{nodestatus.REPLAY_KEY_PREFIX}>",
        f"$KV.{bucket_for(PULLED_BUCKET, prefix)}.>",
        f"$KV.{bucket_for(PINNED_BUCKET, prefix)}.>",
        # Every node's push consumers (syncer.following): names and replay keys any node's.
        *_pushed(node_images_stream_name(prefix), "*", node_images_filter(prefix)),
        *_pushed(f"KV_{status}", "*", f"$KV.{status}.{nodestatus.REPLAY_KEY_PREFIX}>"),
        # Every node's leases, backoffs and seed reports: one user cannot be told apart.
        f"$KV.{slots}.>",
    ]
    return RolePermissions("syncer", tuple(publish), (_INBOX,))


def node_syncer_permissions(node: str, prefix: str = DEFAULT_PREFIX) -> RolePermissions:
    """One node's syncer: reads like every syncer, writes only what names this node.

    Reads stay open (the Fleet and node-image streams, any key of the buckets: nothing there is
    secret), through direct gets only. It uses its durable ``syncer-<node>`` (created at its login,
    rule 2) and writes its status, heartbeat and replay keys, its pulled-image and pinned-image
    records ``<node>.<hash>``, and in the budget bucket only keys ending with itself (its pull
    and mirror slots, seed leases, backoffs, seed reports: :func:`_budget_keys`); it subscribes to
    its own inbox only. It creates,
    updates, purges and deletes nothing but its own keys.
    """
    nodestatus.check_node(node)
    stream = stream_name(prefix, Kind.FLEET)
    status = nodestatus.bucket_name(prefix)
    slots = bucket_for(SLOTS_BUCKET, prefix)
    publish = [
        *_node_reads(prefix),
        *_node_consumer(stream, durable_name(node)),
        # What the node is told without asking: the node images and its replay requests.
        *_pushed(
            node_images_stream_name(prefix),
            durable_name(node) + IMAGES_CONSUMER_SUFFIX,
            node_images_filter(prefix),
        ),
        *_pushed(
            f"KV_{status}",
            durable_name(node) + REPLAY_CONSUMER_SUFFIX,
            f"$KV.{status}.{nodestatus.replay_key(node)}",
        ),
        f"$KV.{status}.{nodestatus.node_key(node)}",
        f"$KV.{status}.{nodestatus.beat_key(node)}",
        f"$KV.{status}.{nodestatus.replay_key(node)}",
        f"$KV.{bucket_for(PULLED_BUCKET, prefix)}.{node}.*",
        f"$KV.{bucket_for(PINNED_BUCKET, prefix)}.{node}.*",
        *_budget_keys(slots, node),
    ]
    subscribe = (f"{inbox_prefix(durable_name(node))}.>",)
    return RolePermissions(f"syncer:{node}", tuple(publish), subscribe)


def reader_permissions(prefix: str = DEFAULT_PREFIX) -> RolePermissions:
    """Read what ``wait``, ``status`` and ``rollout --stage-only`` read, and nothing else (rule 6).

    The Fleet stream (its newest events) and the node status bucket, through ``STREAM.INFO``
    and direct gets only: no consumer, so no body that names a deliver subject
    or re-points a durable. Replies on its own inbox only. Nothing it may send writes.
    """
    publish = [
        f"{_API}.INFO",
        *_direct_reader(stream_name(prefix, Kind.FLEET)),
        *_direct_reader(f"KV_{nodestatus.bucket_name(prefix)}"),
    ]
    return RolePermissions("reader", tuple(publish), (f"{inbox_prefix(READER_INBOX)}.>",))


def callout_permissions(prefix: str = DEFAULT_PREFIX) -> RolePermissions:
    """The auth callout's own user: answer auth requests, and create each node's durable at its
    login (rule 2; :mod:`authcallout.durables`), with the filter fixed by the subject."""
    stream = stream_name(prefix, Kind.FLEET)
    publish = (
        f"{_API}.CONSUMER.CREATE.{stream}.*.{subject_filter(prefix, Kind.FLEET)}",
        f"{_API}.CONSUMER.INFO.{stream}.*",
        f"{_API}.STREAM.INFO.{stream}",
    )
    return RolePermissions(AUTH_USER, publish, ("$SYS.REQ.USER.AUTH", _INBOX))


def _budget_keys(bucket: str, node: str) -> list[str]:
    """The keys of the pull budget's bucket (:mod:`syncer.pulling.leases`,
    :mod:`syncer.pulling.pullbudget`,
    :mod:`syncer.pulling.seeding`) one node writes, each ending with the node (rule 3): its tickets
    and alive keys of pull slots, mirror slots and seed leases, its registry backoffs, its seed
    reports."""
    token = node_token(node)
    return [
        f"$KV.{bucket}.slot.*.{token}",
        f"$KV.{bucket}.mirror.*.{token}",
        f"$KV.{bucket}.seed.*.*.{token}",
        f"$KV.{bucket}.alive.slot.*.{token}",
        f"$KV.{bucket}.alive.mirror.*.{token}",
        f"$KV.{bucket}.alive.seed.*.*.{token}",
        f"$KV.{bucket}.backoff.*.{token}",
        f"$KV.{bucket}.seeded.*.{node}",
    ]


def admin_permissions() -> RolePermissions:
    """The operator: the whole JetStream account (streams, buckets, resets, other nodes' state)."""
    return RolePermissions(admin_user(), (">",), (">",))


def admin_user() -> str:
    """The operator's user (``image-syncer status``, ``events``, resets): the whole account."""
    return "admin"


def _exports(prefix: str) -> list[str]:
    """What the JetStream account offers the clients' account; the rest stays inside."""
    services = [
        f"{_API}.>",
        "$JS.ACK.>",
        "$JS.FC.>",
        "$KV.>",
        *(subject_filter(prefix, kind) for kind in Kind),
        node_images_filter(prefix),
    ]
    return services


def _quoted(subjects: tuple[str, ...], indent: str) -> str:
    # Quoted, because an unquoted leading '$' is a variable reference in NATS config.
    return "".join(f'{indent}"{s}"\n' for s in subjects)


def _js_account(prefix: str, users: str) -> str:
    lines = []
    for subject in _exports(prefix):
        # The API answers as a stream of messages (batched direct gets, pull requests).
        extra = ", response_type: stream" if subject == f"{_API}.>" else ""
        lines.append(f'      {{ service: "{subject}"{extra} }}\n')
    # Push deliveries of the trusted roles' ordered consumers reach their inboxes.
    lines.append(f'      {{ stream: "{_INBOX}" }}\n')
    return (
        f"  {JS_ACCOUNT} {{\n"
        "    jetstream: enabled\n"
        f"{users}"
        "    exports: [\n"
        f"{''.join(lines)}"
        "    ]\n"
        "  }\n"
    )


def _imports(prefix: str, *, api_only: bool = False) -> str:
    subjects = [f"{_API}.>"] if api_only else _exports(prefix)
    lines = [
        f'      {{ service: {{ account: {JS_ACCOUNT}, subject: "{subject}" }} }}\n'
        for subject in subjects
    ]
    if not api_only:
        lines.append(f'      {{ stream: {{ account: {JS_ACCOUNT}, subject: "{_INBOX}" }} }}\n')
    return "    imports: [\n" + "".join(lines) + "    ]\n"


def _user_block(role: RolePermissions, password_env: str, *, responses: bool = False) -> str:
    # The callout answers requests whose reply subjects no allow-list can name in advance.
    answers = "          allow_responses: true\n" if responses else ""
    return (
        f"      {{\n"
        f"        user: {role.user}\n"
        f"        password: ${password_env}\n"
        f"        permissions: {{\n"
        f"          publish: {{ allow: [\n{_quoted(role.publish, ' ' * 12)}          ] }}\n"
        f"          subscribe: {{ allow: [\n{_quoted(role.subscribe, ' ' * 12)}          ] }}\n"
        f"{answers}"
        f"        }}\n"
        f"      }}\n"
    )


def render_accounts(prefix: str = DEFAULT_PREFIX) -> str:
    """The ``accounts`` block that ``nats.conf`` includes, for one subject prefix."""
    users = "".join(
        _user_block(role, PASSWORD_ENV[role.user])
        for role in (
            broadcaster_permissions(prefix),
            syncer_permissions(prefix),
            reader_permissions(prefix),
        )
    )
    admin = f"      {{ user: {admin_user()}, password: ${PASSWORD_ENV[admin_user()]} }}\n"
    return (
        f"# Generated by `python -m wire.permissions --prefix {prefix}`; do not edit by hand.\n"
        "# Passwords come from the server's environment (a Kubernetes Secret), never from here.\n"
        "# Streams and buckets live in JS; clients reach them only through its exports.\n"
        "accounts {\n" + _js_account(prefix, f"    users: [\n{admin}    ]\n") + f"  {ACCOUNT} {{\n"
        "    users: [\n"
        f"{users}"
        "    ]\n"
        f"{_imports(prefix)}"
        "  }\n"
        "}\n"
    )


def render_callout_accounts(prefix: str = DEFAULT_PREFIX) -> str:
    """The accounts and ``auth_callout`` blocks for per-identity auth through the callout.

    No user of the clients' account is listed: every client but the callout service's own
    user is handed to the callout, which answers with that client's permissions
    (:func:`node_syncer_permissions`, :func:`broadcaster_permissions`, :func:`admin_permissions`,
    :func:`reader_permissions`) and account (``JS`` for the operator, :data:`ACCOUNT` for the
    others).
    """
    callout = _user_block(callout_permissions(prefix), AUTH_PASSWORD_ENV, responses=True)
    return (
        f"# Generated by `python -m wire.permissions --callout --prefix {prefix}`; do not edit.\n"
        "# The callout's password and issuer key come from the server's environment.\n"
        "# Streams and buckets live in JS; clients reach them only through its exports.\n"
        "accounts {\n"
        f"  {AUTH_ACCOUNT} {{\n"
        f"    users: [\n{callout}    ]\n"
        f"{_imports(prefix, api_only=True)}"
        "  }\n" + _js_account(prefix, "") + f"  {ACCOUNT} {{\n"
        f"{_imports(prefix)}"
        "  }\n"
        "}\n"
        "authorization {\n"
        "  auth_callout {\n"
        f"    issuer: ${CALLOUT_ISSUER_ENV}\n"
        f"    auth_users: [ {AUTH_USER} ]\n"
        f"    account: {AUTH_ACCOUNT}\n"
        "  }\n"
        "}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the NATS accounts block for image-syncer.")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="subject prefix (SUBJECT_PREFIX)")
    parser.add_argument(
        "--callout", action="store_true", help="per-identity auth through the auth callout"
    )
    args = parser.parse_args(argv)
    text = render_callout_accounts(args.prefix) if args.callout else render_accounts(args.prefix)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
