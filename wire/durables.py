"""Each node's durable consumer on the Fleet stream: its one config, and its creation for a node.

A node may not create consumers (:mod:`wire.permissions`, rule 1), so with per-node identities
the auth callout creates ``syncer-<node>`` when the node logs in (:func:`ensure_node_durable`),
delivering from the first message: the node's replay folds the log first, then skips what the
durable brings again up to the sequence folded (:mod:`syncer.reading.durable`). The static install
and the sandbox let the syncer create it itself, starting after the sequence it folded. Both use
:func:`durable_config`, so a durable is the same whoever made it. The create request names the
filter in its subject (``CONSUMER.CREATE.<stream>.<name>.<filter>``), so the server refuses a
body with another filter or name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from wire.contract import Kind, subject_filter
from wire.eventlog import stream_name
from wire.permissions import durable_name

__all__ = ["DurableLimits", "durable_config", "ensure_node_durable"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DurableLimits:
    """The durable's settings that the syncer's flags set (``--ack-wait`` ...)."""

    ack_wait: float = 30.0
    max_ack_pending: int = 256
    inactive_threshold: float = 24 * 3600.0


def durable_config(
    node: str, prefix: str, limits: DurableLimits, start_seq: int | None = None
) -> ConsumerConfig:
    """``syncer-<node>``: explicit acks, memory-backed R1, from ``start_seq`` (None: all)."""
    name = durable_name(node)
    return ConsumerConfig(
        name=name,
        durable_name=name,
        description=f"image-syncer node {node}",
        deliver_policy=DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=None if start_seq is None else max(1, start_seq),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=limits.ack_wait,
        max_deliver=-1,
        max_ack_pending=limits.max_ack_pending,
        filter_subject=subject_filter(prefix, Kind.FLEET),
        inactive_threshold=limits.inactive_threshold,
        mem_storage=True,
        num_replicas=1,
    )


async def ensure_node_durable(
    js: JetStreamContext, node: str, prefix: str, limits: DurableLimits | None = None
) -> bool:
    """Create the node's durable unless it exists; False when the stream does not exist yet."""
    stream = stream_name(prefix, Kind.FLEET)
    try:
        await js.consumer_info(stream, durable_name(node))
        return True
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_consumer(stream, durable_config(node, prefix, limits or DurableLimits()))
    except nats.js.errors.NotFoundError:
        return False  # no Fleet stream yet: the broadcaster has not started
    log.info("node durable created", extra={"node": node, "consumer": durable_name(node)})
    return True
