"""Who may do what on NATS: the one list of subjects each role of image-syncer needs.

The NATS server's accounts file (``deploy/nats/*/auth.conf``) is generated from this module
(``python -m wire.permissions > deploy/nats/base/auth.conf``) and a test fails when the file is
stale, so the permissions the server enforces and the subjects the code uses cannot drift.

Every list is an allow-list: whatever is not named is denied. The broadcaster may publish only on
the event subjects and manage (create, update, read, purge) its own streams; it may never delete a
stream. A syncer may only read the fleet stream through consumers, pull and ack on it, and write
the node-status, pulled-image and pinned-image buckets; it can publish no event, purge nothing,
delete nothing.

NATS wildcards match whole tokens, so a static config cannot say "consumer names starting with
``syncer-``": the shared syncer user may create, pull from, ack and delete any consumer *of the
fleet stream*, and write any key of its buckets. That is the static install's residual risk.
With the auth callout (:mod:`authcallout`) every syncer connects as its own node instead, and
:func:`node_syncer_permissions` names that node's durable, keys and inbox literally: the per-node
lists are derived from the same building blocks as the static ones, so both stay in step.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from wire import nodestatus
from wire.contract import DEFAULT_PREFIX, Kind, check_prefix, node_images_filter, subject_filter
from wire.eventlog import node_images_stream_name, stream_name

__all__ = [
    "ACCOUNT",
    "AUTH_ACCOUNT",
    "AUTH_PASSWORD_ENV",
    "AUTH_USER",
    "BROADCASTER_INBOX",
    "CALLOUT_ISSUER_ENV",
    "IMAGES_CONSUMER_SUFFIX",
    "LEASE_BUCKET",
    "NODES_BUCKET",
    "PASSWORD_ENV",
    "PINNED_BUCKET",
    "PULLED_BUCKET",
    "REPLAY_CONSUMER_SUFFIX",
    "SLOTS_BUCKET",
    "SYNCER_CONSUMER_PREFIX",
    "RolePermissions",
    "admin_permissions",
    "admin_user",
    "broadcaster_permissions",
    "bucket_for",
    "durable_name",
    "inbox_prefix",
    "node_syncer_permissions",
    "render_accounts",
    "render_callout_accounts",
    "syncer_permissions",
]

ACCOUNT = "IMAGE_SYNCER"
NODES_BUCKET = nodestatus.DEFAULT_BUCKET
# The syncer's cleanup records (syncer.cleanup.BUCKET; a test keeps the two equal).
PULLED_BUCKET = "IMAGE_SYNCER_PULLED"
# The names each syncer pinned itself (syncer.pinning.BUCKET; a test keeps the two equal).
PINNED_BUCKET = "IMAGE_SYNCER_PINNED"
# The cluster-wide pull slots, registry backoffs, seed leases and seed reports
# (syncer.pullbudget.BUCKET; a test keeps the two equal).
SLOTS_BUCKET = "IMAGE_SYNCER_PULL_SLOTS"
LEASE_BUCKET = "IMAGE_SYNCER_LEASE"
SYNCER_CONSUMER_PREFIX = "syncer-"

# The NATS server reads each user's password from this environment variable, filled from a
# Kubernetes Secret: the config file never holds a credential.
PASSWORD_ENV = {
    "broadcaster": "NATS_BROADCASTER_PASSWORD",
    "syncer": "NATS_SYNCER_PASSWORD",
    "admin": "NATS_ADMIN_PASSWORD",
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


def _stream_reader(stream: str, *, named: bool = True) -> list[str]:
    """Read a stream through ephemeral ordered consumers, as ``read_log`` does.

    nats-py creates those on the bare ``CONSUMER.CREATE.<stream>`` subject; ``named`` also admits
    the named form, which a per-node identity must not get: a name there could be another node's.
    """
    return [
        f"{_API}.STREAM.INFO.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}",
        *([f"{_API}.CONSUMER.CREATE.{stream}.>"] if named else []),
        f"{_API}.CONSUMER.INFO.{stream}.*",
        # Flow-control replies of push consumers.
        f"$JS.FC.{stream}.>",
    ]


def _pushed(stream: str, consumer: str, filter_subject: str) -> list[str]:
    """One named push consumer (``syncer.following``): created on the subject that names its
    filter, so its body cannot pick another (its existence is checked with CONSUMER.INFO,
    which the stream reader grants). Never deleted by the node: it expires when unused."""
    return [f"{_API}.CONSUMER.CREATE.{stream}.{consumer}.{filter_subject}"]


# The suffixes of a node's push consumers on its durable's name (syncer.nodeimages and
# syncer.replaycontrol use the same; a test keeps them equal).
IMAGES_CONSUMER_SUFFIX = "-images"
REPLAY_CONSUMER_SUFFIX = "-replay"


def _kv_reader(bucket: str, *, named: bool = True) -> list[str]:
    """Get and watch any key of one KV bucket."""
    stream = f"KV_{bucket}"
    return [
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
        f"{_API}.STREAM.MSG.GET.{stream}",
        *_stream_reader(stream, named=named),
    ]


def _kv_bucket(bucket: str) -> list[str]:
    """Create (idempotently), read, write and watch one KV bucket; never delete or purge it."""
    stream = f"KV_{bucket}"
    return [
        f"$KV.{bucket}.>",
        # Create and bring in line (replicas, limits); never delete or purge.
        f"{_API}.STREAM.CREATE.{stream}",
        f"{_API}.STREAM.UPDATE.{stream}",
        *_kv_reader(bucket),
    ]


def bucket_for(base: str, prefix: str) -> str:
    """``base`` for the default prefix, else suffixed: the rule of ``nodestatus.bucket_name``."""
    if check_prefix(prefix) == DEFAULT_PREFIX:
        return base
    return f"{base}_{re.sub(r'[^A-Za-z0-9]', '_', prefix).upper()}"


def durable_name(node: str) -> str:
    """``syncer-<node>``: JetStream names may not hold ``.``, ``*``, ``>`` or whitespace.

    Node names are DNS subdomains (no ``_``), so the mapping is one-to-one: no two nodes share a
    durable, nor an inbox prefix, which is built from it.
    """
    return SYNCER_CONSUMER_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "_", node)


def inbox_prefix(identity: str) -> str:
    """The reply-subject prefix of one identity (a single token, e.g. ``syncer-node-1``).

    Every role connects with its own prefix; a per-node identity may subscribe to its own only,
    so it can read no other client's replies or deliveries.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", identity):
        raise ValueError(f"inbox identity {identity!r} must be one token of [A-Za-z0-9_-]")
    return f"{_INBOX[:-2]}.{identity}"


BROADCASTER_INBOX = "broadcaster"


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
    ]
    publish += _kv_bucket(bucket_for(LEASE_BUCKET, prefix))
    # The nodes' status, read to record Events on Fleets (broadcaster.fleetevents).
    publish += _kv_reader(nodestatus.bucket_name(prefix))
    inbox = f"{inbox_prefix(BROADCASTER_INBOX)}.>" if own_inbox else _INBOX
    return RolePermissions("broadcaster", tuple(publish), (inbox,))


def syncer_permissions(prefix: str = DEFAULT_PREFIX) -> RolePermissions:
    """The static install's one syncer user, shared by every node."""
    stream = stream_name(prefix, Kind.FLEET)
    publish = [
        f"{_API}.INFO",
        *_stream_reader(stream),
        # The node's durable pull consumer (``syncer-<node>``): create, pull, ack/nak/term, and
        # delete, because a replay from a new start sequence replaces the consumer.
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{_API}.CONSUMER.DELETE.{stream}.*",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        # Read (never write) the images every node needs besides the Fleets'.
        *_stream_reader(node_images_stream_name(prefix)),
        *_kv_bucket(nodestatus.bucket_name(prefix)),
        *_kv_bucket(bucket_for(PULLED_BUCKET, prefix)),
        *_kv_bucket(bucket_for(PINNED_BUCKET, prefix)),
        *_kv_bucket(bucket_for(SLOTS_BUCKET, prefix)),
    ]
    return RolePermissions("syncer", tuple(publish), (_INBOX,))


def node_syncer_permissions(node: str, prefix: str = DEFAULT_PREFIX) -> RolePermissions:
    """One node's syncer: the static syncer's subjects, narrowed to this node's names.

    Reads stay open (the Fleet and node-image streams, any key of the buckets: nothing there is
    secret). Writes name this node literally: its durable ``syncer-<node>`` (create, pull, ack,
    delete), its status, heartbeat and replay keys, its pulled-image and pinned-image records
    ``<node>.<hash>`` (one token after the node, so node ``a`` cannot reach node ``a.b``'s), and
    its inbox. A bucket may be created when missing (the server refuses a create that differs
    from an existing bucket) but never updated, purged or deleted. The one shared write is the
    cluster pull budget: any node may take any slot, seed lease or backoff key, so a node can
    delay others' pulls (bounded by the lease, the backoff and ``--seed-timeout``), never make
    them pull or remove anything. Seed reports ``seeded.<image>.<node>`` are the node's own.
    """
    nodestatus.check_node(node)
    stream = stream_name(prefix, Kind.FLEET)
    durable = durable_name(node)
    status = nodestatus.bucket_name(prefix)
    slots = bucket_for(SLOTS_BUCKET, prefix)
    publish = [
        f"{_API}.INFO",
        *_stream_reader(stream, named=False),
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"{_API}.CONSUMER.CREATE.{stream}.{durable}",
        f"{_API}.CONSUMER.CREATE.{stream}.{durable}.>",
        f"{_API}.CONSUMER.DELETE.{stream}.{durable}",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
        *_stream_reader(node_images_stream_name(prefix), named=False),
        # What the node is told without asking: the node images and its replay requests.
        *_pushed(
            node_images_stream_name(prefix),
            durable + IMAGES_CONSUMER_SUFFIX,
            node_images_filter(prefix),
        ),
        *_pushed(
            f"KV_{status}",
            durable + REPLAY_CONSUMER_SUFFIX,
            f"$KV.{status}.{nodestatus.replay_key(node)}",
        ),
        f"{_API}.STREAM.CREATE.KV_{status}",
        f"$KV.{status}.{nodestatus.node_key(node)}",
        f"$KV.{status}.{nodestatus.beat_key(node)}",
        f"$KV.{status}.{nodestatus.replay_key(node)}",
        *_kv_reader(status, named=False),
    ]
    for ledger in (bucket_for(PULLED_BUCKET, prefix), bucket_for(PINNED_BUCKET, prefix)):
        publish += [
            f"{_API}.STREAM.CREATE.KV_{ledger}",
            f"$KV.{ledger}.{node}.*",
            *_kv_reader(ledger, named=False),
        ]
    publish += [
        f"{_API}.STREAM.CREATE.KV_{slots}",
        *_budget_keys(slots, node),
        *_kv_reader(slots, named=False),
    ]
    return RolePermissions(f"syncer:{node}", tuple(publish), (f"{inbox_prefix(durable)}.>",))


def _budget_keys(bucket: str, node: str) -> list[str]:
    """The keys of the pull budget's bucket (:mod:`syncer.pullbudget`, :mod:`syncer.seeding`)
    one node writes: shared leases and backoffs, and its own seed reports."""
    shared = [f"$KV.{bucket}.{kind}.>" for kind in ("slot", "mirror", "backoff", "seed")]
    return [*shared, f"$KV.{bucket}.seeded.*.{node}"]


def admin_permissions() -> RolePermissions:
    """The operator: the whole account (streams, buckets, resets, other nodes' state)."""
    return RolePermissions(admin_user(), (">",), (">",))


def admin_user() -> str:
    """The operator's user (``image-syncer status``, ``events``, resets): the whole account."""
    return "admin"


def _quoted(subjects: tuple[str, ...], indent: str) -> str:
    # Quoted, because an unquoted leading '$' is a variable reference in NATS config.
    return "".join(f'{indent}"{s}"\n' for s in subjects)


def _user_block(role: RolePermissions) -> str:
    return (
        f"      {{\n"
        f"        user: {role.user}\n"
        f"        password: ${PASSWORD_ENV[role.user]}\n"
        f"        permissions: {{\n"
        f"          publish: {{ allow: [\n{_quoted(role.publish, ' ' * 12)}          ] }}\n"
        f"          subscribe: {{ allow: [\n{_quoted(role.subscribe, ' ' * 12)}          ] }}\n"
        f"        }}\n"
        f"      }}\n"
    )


def render_accounts(prefix: str = DEFAULT_PREFIX) -> str:
    """The ``accounts`` block that ``nats.conf`` includes, for one subject prefix."""
    users = "".join(
        _user_block(role) for role in (broadcaster_permissions(prefix), syncer_permissions(prefix))
    )
    admin = f"      {{ user: {admin_user()}, password: ${PASSWORD_ENV[admin_user()]} }}\n"
    return (
        f"# Generated by `python -m wire.permissions --prefix {prefix}`; do not edit by hand.\n"
        "# Passwords come from the server's environment (a Kubernetes Secret), never from here.\n"
        "accounts {\n"
        f"  {ACCOUNT} {{\n"
        "    jetstream: enabled\n"
        "    users: [\n"
        f"{users}{admin}"
        "    ]\n"
        "  }\n"
        "}\n"
    )


def render_callout_accounts() -> str:
    """The accounts and ``auth_callout`` blocks for per-identity auth through the callout.

    No user of the application account is listed: every client but the callout service's own
    user is handed to the callout, which answers with that client's permissions
    (:func:`node_syncer_permissions`, :func:`broadcaster_permissions`, :func:`admin_permissions`).
    """
    return (
        "# Generated by `python -m wire.permissions --callout`; do not edit by hand.\n"
        "# The callout's password and issuer key come from the server's environment.\n"
        "accounts {\n"
        f"  {AUTH_ACCOUNT} {{\n"
        f"    users: [ {{ user: {AUTH_USER}, password: ${AUTH_PASSWORD_ENV} }} ]\n"
        "  }\n"
        f"  {ACCOUNT} {{\n"
        "    jetstream: enabled\n"
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
    sys.stdout.write(render_callout_accounts() if args.callout else render_accounts(args.prefix))


if __name__ == "__main__":
    main()
