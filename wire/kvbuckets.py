"""Every KV bucket of image-syncer, its final config, and the one place that creates it.

No node creates a bucket (:mod:`wire.permissions`): the broadcaster creates them all at start
(:func:`ensure_buckets`) with the config below, and a bucket found with a config image-syncer
did not make is refused, never trusted, since whoever made it (a node holding older, wider
permissions; a hand-made bucket) may have given it subjects that capture other clients' traffic,
a republish into the log, or rollups. Nodes only bind (:func:`bind_bucket`); a node that may
create (the sandbox's unauthenticated server, the tests) creates the same config when missing.

Every bucket refuses ``Nats-Rollup`` (``allow_rollup_hdrs`` false): a node's put of its own key
with ``Nats-Rollup: all`` would otherwise wipe every other node's keys. nats-py's ``kv.purge``
sends that header, so image-syncer deletes keys (``kv.delete``) and never purges them. Buckets
whose keys carry their own TTL (node status, pull slots) allow per-message TTLs; the pull-slot
bucket also has a ``max_age``, so no entry outlives it whatever TTL its writer chose (readers
check entries' age too, see :mod:`syncer.pulling.pullbudget`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from wire.eventlog import MAX_CONSUMERS

__all__ = [
    "SLOTS_MAX_AGE",
    "BucketConfigError",
    "bind_bucket",
    "check_bucket",
    "ensure_bucket",
    "kv_bucket_config",
    "ttl_bucket_config",
]

log = logging.getLogger(__name__)

# No pull-slot or registry-backoff entry lives longer than this, whatever TTL its writer set
# (``Nats-TTL: never`` included: the stream's max age still removes it).
SLOTS_MAX_AGE = 3600.0


class BucketConfigError(RuntimeError):
    """A bucket exists with a config image-syncer did not make; the text says which field."""


def kv_bucket_config(
    bucket: str,
    description: str,
    replicas: int,
    *,
    ttl_keys: bool = False,
    max_age: float = 0.0,
) -> StreamConfig:
    """The stream behind KV bucket ``bucket``: what ``create_key_value`` builds (history 1),
    minus rollups, plus per-key TTLs when ``ttl_keys``."""
    return StreamConfig(
        name=f"KV_{bucket}",
        description=description,
        subjects=[f"$KV.{bucket}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_msgs=-1,
        # -1 reads as the server's default, 1,000 consumers: every node follows its replay key
        # here through a consumer of its own (syncer.following), and readers watch it.
        max_consumers=MAX_CONSUMERS,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        allow_rollup_hdrs=False,
        allow_msg_ttl=ttl_keys,
        allow_direct=True,
        deny_delete=True,
        deny_purge=False,
    )


def ttl_bucket_config(
    bucket: str, description: str, replicas: int, *, max_age: float = 0.0
) -> StreamConfig:
    """A bucket whose keys carry their own TTL (node status, pull slots)."""
    return kv_bucket_config(bucket, description, replicas, ttl_keys=True, max_age=max_age)


@dataclass(frozen=True)
class _Field:
    name: str
    # Whether ``update_stream`` may bring it in line; the others mean "not made by us".
    repairable: bool


# The fields that decide what a bucket captures, who else receives its messages, and what a
# header can do to it. Replicas, description and limits are repaired by an update.
_FIELDS = (
    _Field("subjects", False),
    _Field("mirror", False),
    _Field("sources", False),
    _Field("republish", False),
    _Field("sealed", False),
    _Field("allow_rollup_hdrs", True),
    _Field("deny_delete", True),
    _Field("allow_msg_ttl", True),
    _Field("max_msgs_per_subject", True),
    _Field("allow_direct", True),
    _Field("max_age", True),
    _Field("discard", True),
)


def _differences(want: StreamConfig, have: StreamConfig) -> list[_Field]:
    def norm(value: object) -> object:
        return value or None  # the server answers [], 0 or False for what the config omits

    return [f for f in _FIELDS if norm(getattr(want, f.name)) != norm(getattr(have, f.name))]


def check_bucket(want: StreamConfig, have: StreamConfig) -> list[str]:
    """The names of the fields an existing bucket's config gets wrong (empty when right)."""
    return [f.name for f in _differences(want, have)]


async def ensure_bucket(js: JetStreamContext, config: StreamConfig) -> KeyValue:
    """Create the bucket with ``config``, or bring it in line; refuse one that is not ours.

    An existing bucket whose subjects, mirror, sources or republish differ, or that is sealed,
    raises :class:`BucketConfigError`: it was made by someone else and may already hold what
    they wrote. The operator deletes it (``nats kv rm``) and the next start creates it right.
    """
    name = config.name or ""
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        log.info("bucket created", extra={"bucket": name.removeprefix("KV_")})
        return await js.key_value(name.removeprefix("KV_"))
    wrong = _differences(config, info.config)
    foreign = [f.name for f in wrong if not f.repairable]
    if foreign:
        raise BucketConfigError(
            f"bucket {name.removeprefix('KV_')} exists with a config image-syncer did not make "
            f"({', '.join(foreign)} differ): delete it, the next start creates it right"
        )
    # Also when nothing security-relevant differs: replicas and limits follow the flags.
    info = await js.update_stream(config)
    if wrong:
        log.warning(
            "bucket config repaired",
            extra={"bucket": name.removeprefix("KV_"), "fields": [f.name for f in wrong]},
        )
    still = check_bucket(config, info.config)
    if still:
        raise BucketConfigError(f"bucket {name.removeprefix('KV_')} kept {', '.join(still)}")
    return await js.key_value(name.removeprefix("KV_"))


async def bind_bucket(js: JetStreamContext, config: StreamConfig) -> KeyValue:
    """Bind a bucket the install created; create it only where this identity may (no NATS
    auth: the sandbox, the tests). A node identity gets a permission error and retries."""
    bucket = (config.name or "").removeprefix("KV_")
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await js.add_stream(config)
    return await js.key_value(bucket)
