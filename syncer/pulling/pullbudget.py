"""The cluster-wide pull budget: at most N nodes pull one image at a time, and a 429 stops all.

A thousand nodes pulling one new 5 GB image at once is a registry outage or a rate-limit ban
(Docker Hub: 10 anonymous pulls per hour per IP). With ``--max-cluster-pulls N`` a node takes
one of N slots of the image before it pulls and gives it back after; the others wait their turn,
retrying with jittered, growing pauses so they do not stampede the moment a slot frees.

A slot is a counted lease (:mod:`syncer.pulling.leases`) of the family ``slot.<image>`` in the KV
bucket ``IMAGE_SYNCER_PULL_SLOTS``: the holder's own keys ``slot.<image>.<node>`` and
``alive.slot.<image>.<node>``, which NATS lets no other node write or delete. The holder renews
its alive key while it pulls; a holder that dies frees its slot one ``lease`` later, and none
counts longer than the pull timeout plus a lease (``max_hold``), whatever TTL it wrote, since
readers go by the server's timestamps.

A registry that answers 429 / Too Many Requests (the runtime's pull error says so) gets a key
``backoff.<registry>.<node>`` with a TTL of ``backoff``: every node reads them before taking a
slot for an image of that registry and waits for as long as one exists, so the whole cluster backs
off, not just the node that was told. The server expires the keys by its own clock; a value
carries only the duration (for status), never a timestamp another node would compare with its
clock, and no entry holds a node back longer than its duration, at most the reader's own
``--registry-backoff``, from when that node first saw it (its own monotonic clock).

Pulls that go to a mirror rather than the registry (``--mirror``: a node fetching from a
pull-through cache or its peers after a seed reported the image, see :mod:`syncer.pulling.seeding`)
do not spend the registry's slots and ignore its backoff: they take slots of the family
``mirror.<image>``, of their own limit (``--max-mirror-pulls``, 0: none), so the registry's
budget is spent on the pulls that reach it.

The budget never stops pulling for good: if NATS cannot be reached, the node pulls without a
slot (one warning per outage, a metric) rather than leave its images missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ops.lifecycle import sleep_unless_stopping
from syncer import metrics
from syncer.folding.references import ImageRef
from syncer.pulling.leases import Lease, alive_key, lease_ttl, release, take
from wire.contract import check_prefix
from wire.directread import read_keys
from wire.kvbuckets import SLOTS_MAX_AGE, bind_bucket, ttl_bucket_config
from wire.permissions import node_token
from wire.pullfailures import PullFailure, classify

__all__ = ["BudgetSettings", "PullBudget", "budget_bucket", "is_rate_limited", "open_budget_bucket"]

log = logging.getLogger(__name__)

BUCKET = "IMAGE_SYNCER_PULL_SLOTS"
# Waiting for a slot: the first retry after about this long, doubling up to the cap.
_FIRST_RETRY = 1.0
_MAX_RETRY = 10.0


def budget_bucket(prefix: str) -> str:
    """``IMAGE_SYNCER_PULL_SLOTS`` for the default prefix, else suffixed like the status bucket."""
    if check_prefix(prefix) == "agones":
        return BUCKET
    return f"{BUCKET}_{re.sub(r'[^A-Za-z0-9]', '_', prefix).upper()}"


def is_rate_limited(error: str) -> bool:
    """The runtime's pull error says the registry answered 429 / Too Many Requests."""
    return classify(error) is PullFailure.RATE_LIMITED


@dataclass(frozen=True)
class BudgetSettings:
    # Slots per image across the cluster; 0 turns the budget off.
    max_pulls: int
    prefix: str = "agones"
    replicas: int = 1
    # A slot's TTL; renewed every third of it while the pull runs.
    lease: float = 30.0
    # How long the cluster holds back pulls from a registry that answered 429.
    backoff: float = 60.0
    # Slots per image for pulls served by a mirror; 0: mirrored pulls take no slot.
    max_mirror_pulls: int = 0
    # No holder counts longer than this after taking its slot (the pull timeout plus a lease).
    max_hold: float = 630.0


class _Backoff(msgspec.Struct, frozen=True):
    node: str
    # How long the writer asked the cluster to hold back (the key's TTL). Values written before
    # carried an ``until`` in the writer's clock: ignored, the key's existence is what counts.
    seconds: float = 0.0
    error: str = ""


def image_hash(image: ImageRef) -> str:
    """One key token per image (references hold characters keys may not)."""
    return hashlib.sha256(str(image).encode()).hexdigest()[:24]


def _slot_prefix(image: ImageRef, mirrored: bool) -> str:
    return ("mirror." if mirrored else "slot.") + image_hash(image)


def _registry_token(image: ImageRef) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", image.domain)


class PullBudget:
    """One node's side of the budget: ``async with budget.slot(image): pull``."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: BudgetSettings,
        node: str,
        *,
        rng: Callable[[], float] = random.random,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self._settings = settings
        self._node = node
        self._rng = rng
        # The wall clock only dates the status's "backoff until"; waits use the monotonic one.
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        # Backoff key -> (its revision, when this node first saw that revision).
        self._backoffs_seen: dict[str, tuple[int, float]] = {}
        self._kv: KeyValue | None = None
        self._waiting: set[ImageRef] = set()
        self._failing = False
        self._stopping = asyncio.Event()
        # Until when this node last saw the cluster hold back pulls (for its status).
        self.backoff_until: datetime | None = None

    def stop(self) -> None:
        """Stop waiting: pulls still waiting for a slot go ahead at once (and see the syncer
        is stopping)."""
        self._stopping.set()

    def waiting(self) -> frozenset[ImageRef]:
        """Images this node waits to pull until a slot (or the registry) frees up."""
        return frozenset(self._waiting)

    @contextlib.asynccontextmanager
    async def slot(self, image: ImageRef, *, mirrored: bool = False) -> AsyncIterator[None]:
        """Hold one of the image's cluster slots for the body; waits for one as long as needed.

        ``mirrored``: the pull is served by a mirror, so it takes a mirror slot (if there is a
        limit) and ignores the registry's backoff.
        """
        if self._limit(mirrored) == 0:
            yield
            return
        self._waiting.add(image)
        try:
            key, revision = await self._acquire(image, mirrored)
        finally:
            self._waiting.discard(image)
        if key is None:  # NATS unreachable: pull without a slot
            yield
            return
        lease = Lease(
            self._js,
            self._subject(alive_key(key, self._node)),
            self._node,
            revision,
            self._settings.lease,
            self._record_failure,
        )
        renew = asyncio.create_task(lease.keep(), name=f"renew {key}")
        try:
            yield
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew
            await self._release(key)

    async def observe(self, image: ImageRef, error: str, *, mirrored: bool = False) -> None:
        """A pull of ``image`` failed with ``error``: if the registry rate-limits, tell all.

        A mirrored pull's 429 came from the mirror (or through it), not as an answer to this
        registry's budget: it holds back nobody's registry pulls.
        """
        if mirrored or not is_rate_limited(error):
            return
        seconds = self._settings.backoff
        value = msgspec.json.encode(_Backoff(node=self._node, seconds=seconds, error=error[:200]))
        try:
            await self._bucket()
            # With a TTL, so a backoff ends even if nobody is left to lift it.
            key = f"backoff.{_registry_token(image)}.{node_token(self._node)}"
            await self._js.publish(
                self._subject(key), value, msg_ttl=self._ttl(self._settings.backoff)
            )
        except Exception as e:
            self._record_failure(e)
            return
        self.backoff_until = self._wall_clock() + timedelta(seconds=seconds)
        metrics.CLUSTER_BACKOFFS.inc()
        log.warning(
            "registry rate limit: cluster pulls held back",
            extra={"registry": image.domain, "for": self._settings.backoff, "error": error},
        )

    # --- internals ------------------------------------------------------------------------

    def _limit(self, mirrored: bool) -> int:
        return self._settings.max_mirror_pulls if mirrored else self._settings.max_pulls

    async def _acquire(self, image: ImageRef, mirrored: bool) -> tuple[str | None, int]:
        attempt = 0
        while not self._stopping.is_set():
            try:
                if not mirrored:
                    await self._respect_backoff(image)
                taken = await self._try_take(image, mirrored)
            except Exception as e:
                self._record_failure(e)
                return None, 0
            self._recovered()
            if taken is not None:
                return taken
            if attempt == 0:
                metrics.SLOT_WAITS.inc()
                log.info(
                    "waiting for a cluster pull slot",
                    extra={
                        "image": str(image),
                        "slots": self._limit(mirrored),
                        "mirrored": mirrored,
                    },
                )
            attempt += 1
            await self._sleep(self._jitter(_FIRST_RETRY * 2 ** min(attempt, 4)))
        return None, 0

    async def _try_take(self, image: ImageRef, mirrored: bool) -> tuple[str, int] | None:
        await self._bucket()
        family = _slot_prefix(image, mirrored)
        revision = await take(
            self._js,
            budget_bucket(self._settings.prefix),
            family,
            self._node,
            limit=self._limit(mirrored),
            ttl=self._settings.lease,
            max_hold=self._settings.max_hold,
        )
        return None if revision is None else (family, revision)

    async def _respect_backoff(self, image: ImageRef) -> None:
        """Wait while a backoff entry of the registry exists: its TTL, kept by the server, is
        the backoff. No timestamp is read from it, so no node's clock is compared with another's;
        and no entry holds this node back longer than its duration (at most
        ``--registry-backoff``) from when this node first saw it, by its own monotonic clock (an
        entry written without a TTL, by a bug or a hostile node, cannot stop pulls for good)."""
        await self._bucket()
        bucket = budget_bucket(self._settings.prefix)
        pattern = f"backoff.{_registry_token(image)}.*"
        while not self._stopping.is_set():
            entries = await read_keys(self._js, bucket, pattern)
            if not entries:  # expired (or lifted): go ahead
                return
            left = 0.0
            for key, entry in entries.items():
                try:
                    seconds = msgspec.json.decode(entry.data, type=_Backoff).seconds
                except msgspec.DecodeError:
                    seconds = 0.0
                limit = (
                    min(seconds, self._settings.backoff) if seconds > 0 else self._settings.backoff
                )
                revision, first_seen = self._backoffs_seen.get(key, (-1, 0.0))
                if revision != entry.seq:
                    revision, first_seen = entry.seq, self._monotonic()
                    self._backoffs_seen[key] = (revision, first_seen)
                    # For status only: when it ends at the latest, in this node's own clock.
                    self.backoff_until = self._wall_clock() + timedelta(seconds=limit)
                left = max(left, limit - (self._monotonic() - first_seen))
            if left <= 0:
                return
            await self._sleep(min(left, _MAX_RETRY) + self._jitter(_FIRST_RETRY))

    def _subject(self, key: str) -> str:
        return f"$KV.{budget_bucket(self._settings.prefix)}.{key}"

    @staticmethod
    def _ttl(seconds: float) -> float:
        return lease_ttl(seconds)

    async def _release(self, family: str) -> None:
        try:
            await self._bucket()
            await release(self._js, budget_bucket(self._settings.prefix), family, self._node)
        except Exception as e:
            # The TTL frees it anyway.
            self._record_failure(e)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_budget_bucket(
                self._js, self._settings.prefix, self._settings.replicas
            )
        return self._kv

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless_stopping(self._stopping, seconds)

    def _jitter(self, seconds: float) -> float:
        return seconds * (0.5 + self._rng())

    def _record_failure(self, error: Exception) -> None:
        metrics.NATS_ERRORS.labels("pull_budget").inc()
        if not self._failing:
            self._failing = True
            log.warning(
                "cluster pull budget unavailable, pulling without a slot",
                extra={"error": repr(error)},
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("cluster pull budget available again")


async def open_budget_bucket(js: JetStreamContext, prefix: str, replicas: int) -> KeyValue:
    """The budget's bucket (slots, backoffs, seed leases and reports): created by the broadcaster
    at install (``wire.permissions.install_buckets``); bound here."""
    config = ttl_bucket_config(
        budget_bucket(prefix),
        "image-syncer: cluster-wide pull slots, registry backoffs and seeds",
        replicas,
        max_age=SLOTS_MAX_AGE,
    )
    return await bind_bucket(js, config)
