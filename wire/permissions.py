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
fleet stream*, and write any key of its buckets. Per-node users would close that gap, but a
DaemonSet cannot hand each pod its own password; NATS' decentralized JWT auth (templated
permissions) can, at the price of an operator/account/user toolchain. The residual risk is one
node disturbing another node's cursor (that node then replays the whole log, which is always
safe) or status, never the event log itself.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from wire import nodestatus
from wire.contract import Kind, check_prefix, node_images_filter, subject_filter
from wire.eventlog import node_images_stream_name, stream_name

__all__ = [
    "ACCOUNT",
    "LEASE_BUCKET",
    "NODES_BUCKET",
    "PASSWORD_ENV",
    "PINNED_BUCKET",
    "PULLED_BUCKET",
    "SLOTS_BUCKET",
    "SYNCER_CONSUMER_PREFIX",
    "RolePermissions",
    "admin_user",
    "broadcaster_permissions",
    "bucket_for",
    "render_accounts",
    "syncer_permissions",
]

ACCOUNT = "IMAGE_SYNCER"
NODES_BUCKET = nodestatus.DEFAULT_BUCKET
# The syncer's cleanup records (syncer.cleanup.BUCKET; a test keeps the two equal).
PULLED_BUCKET = "IMAGE_SYNCER_PULLED"
# The names each syncer pinned itself (syncer.pinning.BUCKET; a test keeps the two equal).
PINNED_BUCKET = "IMAGE_SYNCER_PINNED"
# The cluster-wide pull slots and registry backoffs (syncer.pullbudget.BUCKET; a test keeps the
# two equal).
SLOTS_BUCKET = "IMAGE_SYNCER_PULL_SLOTS"
LEASE_BUCKET = "IMAGE_SYNCER_LEASE"
_DEFAULT_PREFIX = "agones"
SYNCER_CONSUMER_PREFIX = "syncer-"

# The NATS server reads each user's password from this environment variable, filled from a
# Kubernetes Secret: the config file never holds a credential.
PASSWORD_ENV = {
    "broadcaster": "NATS_BROADCASTER_PASSWORD",
    "syncer": "NATS_SYNCER_PASSWORD",
    "admin": "NATS_ADMIN_PASSWORD",
}

_API = "$JS.API"
# Request/reply responses and push-consumer deliveries both land on the client's inbox.
_INBOX = "_INBOX.>"


@dataclass(frozen=True)
class RolePermissions:
    """Subjects a NATS user may publish to and subscribe to (allow-lists)."""

    user: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def _stream_reader(stream: str) -> list[str]:
    """Read a stream through ephemeral ordered consumers, as ``read_log`` does."""
    return [
        f"{_API}.STREAM.INFO.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"{_API}.CONSUMER.INFO.{stream}.*",
        # Flow-control replies of push consumers.
        f"$JS.FC.{stream}.>",
    ]


def _kv_bucket(bucket: str) -> list[str]:
    """Create (idempotently), read, write and watch one KV bucket; never delete or purge it."""
    stream = f"KV_{bucket}"
    return [
        f"$KV.{bucket}.>",
        # Create and bring in line (replicas, limits); never delete or purge.
        f"{_API}.STREAM.CREATE.{stream}",
        f"{_API}.STREAM.UPDATE.{stream}",
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
        f"{_API}.STREAM.MSG.GET.{stream}",
        *_stream_reader(stream),
    ]


def bucket_for(base: str, prefix: str) -> str:
    """``base`` for the default prefix, else suffixed: the rule of ``nodestatus.bucket_name``."""
    if check_prefix(prefix) == _DEFAULT_PREFIX:
        return base
    return f"{base}_{re.sub(r'[^A-Za-z0-9]', '_', prefix).upper()}"


def broadcaster_permissions(prefix: str = _DEFAULT_PREFIX) -> RolePermissions:
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
    ]
    publish += _kv_bucket(bucket_for(LEASE_BUCKET, prefix))
    return RolePermissions("broadcaster", tuple(publish), (_INBOX,))


def syncer_permissions(prefix: str = _DEFAULT_PREFIX) -> RolePermissions:
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


def render_accounts(prefix: str = _DEFAULT_PREFIX) -> str:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the NATS accounts block for image-syncer.")
    parser.add_argument("--prefix", default=_DEFAULT_PREFIX, help="subject prefix (SUBJECT_PREFIX)")
    args = parser.parse_args(argv)
    sys.stdout.write(render_accounts(args.prefix))


if __name__ == "__main__":
    main()
