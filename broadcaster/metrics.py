"""The broadcaster's Prometheus metrics: what was published, what failed, how often watches restart.

Defined once at import on the default registry, which /metrics serves; labels stay low-cardinality
(event types, kinds, reasons), never object names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from wire.contract import Kind

__all__ = [
    "EVENTS_PUBLISHED",
    "EVENTS_REFUSED",
    "EVENTS_SKIPPED",
    "EVENTS_SUPERSEDED",
    "INVALID_LOG_MESSAGES",
    "INVALID_OBJECTS",
    "LAST_PUBLISH",
    "PUBLISH_CONFLICTS",
    "PUBLISH_ERRORS",
    "REFUSAL_REASONS",
    "WATCH_RESTARTS",
]

EVENTS_PUBLISHED = Counter(
    "image_syncer_broadcaster_events_published",
    "Events acked by JetStream (duplicates included), by event type.",
    ["event_type"],
)
EVENTS_SKIPPED = Counter(
    "image_syncer_broadcaster_events_skipped",
    "Watch events not published because the log already holds that version of the object or a"
    " newer one, as far as this broadcaster knows (a resync, a replayed or lagging event).",
    ["kind"],
)
PUBLISH_ERRORS = Counter(
    "image_syncer_broadcaster_publish_errors",
    "Failed publish attempts; each is retried with backoff.",
)
PUBLISH_CONFLICTS = Counter(
    "image_syncer_broadcaster_publish_conflicts",
    "Publishes refused because the object's newest message in the log was not the expected one"
    " (another broadcaster or a former leader wrote since); the log is read again and the event"
    " published only if it is still newer.",
)
EVENTS_REFUSED = Counter(
    "image_syncer_broadcaster_events_refused",
    "Events given up on because no retry can succeed: the wire contract refuses the object"
    " (contract), it is too large for a message even trimmed (too_large), or JetStream rejects"
    " the request (rejected).",
    ["kind", "reason"],
)
# Every series exists from the start at 0, so an alert on increase() sees the first refusal too.
REFUSAL_REASONS = ("contract", "too_large", "rejected")
for _kind in Kind:
    for _reason in REFUSAL_REASONS:
        EVENTS_REFUSED.labels(kind=str(_kind), reason=_reason)
EVENTS_SUPERSEDED = Counter(
    "image_syncer_broadcaster_events_superseded",
    "Events not published because the log already held that version of the object or a newer"
    " one (written by another broadcaster, or seen in a stale list).",
    ["kind"],
)
INVALID_OBJECTS = Counter(
    "image_syncer_broadcaster_invalid_objects",
    "Objects from the API server that the wire contract refuses; logged and skipped.",
    ["kind"],
)
INVALID_LOG_MESSAGES = Counter(
    "image_syncer_broadcaster_invalid_log_messages",
    "Messages in the stream that do not decode; ignored by the catch-up.",
    ["kind"],
)
WATCH_RESTARTS = Counter(
    "image_syncer_broadcaster_watch_restarts",
    "Watch requests that ended and were resumed (closed) or replaced by a relist (expired, error).",
    ["kind", "reason"],
)
CRD_MISSING = Counter(
    "image_syncer_broadcaster_crd_missing",
    "Lists answered 404 because the resource is not served: its CRD (Agones) is not installed.",
    ["crd"],
)
LAST_PUBLISH = Gauge(
    "image_syncer_broadcaster_last_publish_timestamp_seconds",
    "Unix time of the last acked publish.",
)
