"""KV buckets whose keys carry their own TTL (node status, pull slots), configured in one place.

nats-py's ``create_key_value`` cannot enable per-message TTLs, so these buckets are created as the
stream it would build plus ``allow_msg_ttl``; the same config lets ``update_stream`` bring an
existing bucket in line (replicas) instead of failing on a mismatch.
"""

from __future__ import annotations

from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from wire.eventlog import MAX_CONSUMERS

__all__ = ["ttl_bucket_config"]


def ttl_bucket_config(bucket: str, description: str, replicas: int) -> StreamConfig:
    """The stream behind KV bucket ``bucket``, with per-key TTLs allowed."""
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
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        allow_direct=True,
        deny_delete=True,
        deny_purge=False,
    )
