"""The syncer's Prometheus metrics, declared once so every module counts the same series.

Labels are closed sets (event types, results, reasons, rpc names): never a Fleet name, which
would grow without bound. The one exception is ``image`` on IMAGES_REMOVED_EXTERNALLY, because
knowing *which* image the garbage collector keeps deleting is the point of that counter: it is
bounded by the node's desired images (a series is dropped when its image stops being desired)
and carries the normalized reference the Fleets already publish on the log.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CLUSTER_BACKOFFS",
    "CONSUMER_ACK_PENDING",
    "CONSUMER_LAG",
    "CRI_ERRORS",
    "DISK_BUDGET_EXCEEDED",
    "EVENTS",
    "FLEETS",
    "GATE_CLOSED",
    "GATE_ERRORS",
    "GATE_OPEN_LATENCY",
    "GATE_TIMEOUTS",
    "IMAGES",
    "IMAGES_REMOVED",
    "IMAGES_REMOVED_EXTERNALLY",
    "IMAGE_FS_USAGE",
    "INVALID_IMAGES",
    "NATS_ERRORS",
    "PINS",
    "PIN_ERRORS",
    "PULLS",
    "PULLS_SKIPPED",
    "PULL_DURATION",
    "PULL_FAILURES",
    "RECONCILE_DURATION",
    "REDELIVERED",
    "REPLAYS",
    "SEED_BAD_REPORTS",
    "SEED_PULLS",
    "SEED_WAITS",
    "SLOT_WAITS",
    "TERMINATED",
]

EVENTS = Counter(
    "image_syncer_syncer_events_total",
    "Fleet events handled, by event type and result (acked, nakked, terminated, stale).",
    ["event_type", "result"],
)
TERMINATED = Counter(
    "image_syncer_syncer_messages_terminated_total",
    "Messages terminated because they cannot be used, by reason.",
    ["reason"],
)
REDELIVERED = Counter(
    "image_syncer_syncer_messages_redelivered_total",
    "Events delivered more than once (an ack lost, a nak, the ack wait expired).",
)
PULLS = Counter(
    "image_syncer_syncer_pulls_total",
    "Image pulls, by result (success, failure, timeout, unavailable).",
    ["result"],
)
PULL_FAILURES = Counter(
    "image_syncer_syncer_pull_failures_total",
    "Failed pulls by reason: auth, not_found, rate_limited, registry_unreachable, disk_full, "
    "timeout, runtime_unavailable, other (syncer/pullfailures.py).",
    ["reason"],
)
PULL_DURATION = Histogram(
    "image_syncer_syncer_pull_duration_seconds",
    "Duration of image pulls, successful or not.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
IMAGES = Gauge(
    "image_syncer_syncer_images",
    "Images the node should hold, holds, and lacks (at the last reconcile).",
    ["state"],
)
RECONCILE_DURATION = Histogram(
    "image_syncer_syncer_reconcile_duration_seconds",
    "Duration of one reconcile pass (one ListImages plus starting the missing pulls).",
)
CRI_ERRORS = Counter(
    "image_syncer_syncer_cri_errors_total",
    "Failed calls to the container runtime, by rpc.",
    ["rpc"],
)
NATS_ERRORS = Counter(
    "image_syncer_syncer_nats_errors_total",
    "Failed NATS operations, by operation (fetch, ack, consumer_info, replay, status_write, ...).",
    ["op"],
)
CONSUMER_LAG = Gauge(
    "image_syncer_syncer_consumer_pending_messages",
    "Events in the stream not yet delivered to this node's durable (num_pending), refreshed "
    "periodically.",
)
CONSUMER_ACK_PENDING = Gauge(
    "image_syncer_syncer_consumer_ack_pending_messages",
    "Events delivered to this node's durable but not acked yet (num_ack_pending).",
)
FLEETS = Gauge(
    "image_syncer_syncer_fleets",
    "Fleets known to this node, by state (admitted, excluded).",
    ["state"],
)
IMAGES_REMOVED = Counter(
    "image_syncer_syncer_images_removed_total",
    "Unused images the syncer handled (--remove-unused), by outcome (removed, refused, gone).",
    ["outcome"],
)
REPLAYS = Counter(
    "image_syncer_syncer_replays_total",
    "Whole-log replays, by trigger (start, request, consumer_lost, reconnect, timer).",
    ["trigger"],
)
PINS = Counter(
    "image_syncer_syncer_pins_total",
    "Images this syncer pinned or unpinned (label io.cri-containerd.pinned), by action.",
    ["action"],
)
PIN_ERRORS = Counter(
    "image_syncer_syncer_pin_errors_total",
    "Failed pinning work, by what failed (containerd, ledger).",
    ["op"],
)
GATE_CLOSED = Gauge(
    "image_syncer_syncer_gate_closed",
    "1 while this node carries the startup taint and the syncer keeps it (--startup-taint).",
)
GATE_OPEN_LATENCY = Gauge(
    "image_syncer_syncer_gate_open_latency_seconds",
    "Seconds from syncer start to the removal of the startup taint, at the last removal.",
)
GATE_TIMEOUTS = Counter(
    "image_syncer_syncer_gate_timeouts_total",
    "Startup taints removed by --startup-taint-timeout while images were still missing.",
)
GATE_ERRORS = Counter(
    "image_syncer_syncer_gate_errors_total",
    "Failed or repeated startup-taint removals, by reason (conflict, forbidden, api).",
    ["reason"],
)
PULLS_SKIPPED = Counter(
    "image_syncer_syncer_pulls_skipped_total",
    "Pulls not started, by reason (disk_budget: the image filesystem is over "
    "--max-image-fs-usage; gc_backoff: the image keeps being removed behind the syncer's back).",
    ["reason"],
)
IMAGE_FS_USAGE = Gauge(
    "image_syncer_syncer_image_fs_usage_ratio",
    "Used fraction of the fullest image filesystem (capacity - available) / capacity, as last read "
    "at every reconcile and before each pull.",
)
DISK_BUDGET_EXCEEDED = Gauge(
    "image_syncer_syncer_disk_budget_exceeded",
    "1 while pulls are paused because the image filesystem is at or above --max-image-fs-usage.",
)
IMAGES_REMOVED_EXTERNALLY = Counter(
    "image_syncer_images_removed_externally_total",
    "Desired images this node held that disappeared without the syncer removing them (kubelet "
    "image GC, an operator), by image.",
    ["image"],
)
INVALID_IMAGES = Counter(
    "image_syncer_syncer_invalid_image_references_total",
    "Image references of folded Fleet events that do not parse and are skipped (the rest of the "
    "Fleet is pulled), by where they were written (container, next_images annotation).",
    ["source"],
)
SLOT_WAITS = Counter(
    "image_syncer_syncer_pull_slot_waits_total",
    "Pulls that had to wait for a slot of the cluster-wide pull budget (--max-cluster-pulls).",
)
SEED_WAITS = Counter(
    "image_syncer_syncer_seed_waits_total",
    "Pulls that waited for a seed to report the image (--mirror).",
)
SEED_PULLS = Counter(
    "image_syncer_syncer_seed_pulls_total",
    "Pulls this node made as a seed, by outcome (success, failure).",
    ["outcome"],
)
SEED_BAD_REPORTS = Counter(
    "image_syncer_syncer_seed_bad_reports_total",
    "Seed reports ignored because they did not name the image and the node of their key.",
)
CLUSTER_BACKOFFS = Counter(
    "image_syncer_syncer_registry_backoffs_total",
    "Registry 429 answers this node turned into a cluster-wide pull backoff.",
)
