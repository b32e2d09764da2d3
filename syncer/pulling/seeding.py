"""Seeding: a few nodes fetch a new image from the registry first, the rest from the mirror.

With a pull-through cache or a peer-to-peer mirror behind containerd (``hosts.toml``: Spegel,
Dragonfly, a Distribution or Harbor proxy), a node that pulls an image the cache does not hold
yet makes the cache fetch it from the registry; a thousand nodes asking at once make it fetch a
thousand times (a Distribution proxy fetches a blob again for every request that arrives before
it stored it; a P2P mirror finds no peer and falls back to the registry). So per image, only
``seeds`` nodes (per group, e.g. per zone with ``--seed-per topology.kubernetes.io/zone``) pull
first; the others wait (status ``waiting_seed``) until a seed reports the image complete, then
pull, through the same runtime and the same mirror configuration, from the cache or the peers.

The operator says which registries are mirrored (``--mirror``): the syncer cannot see whether a
mirror answers. Without ``--mirror`` nothing here runs and pulls are as before.

In the pull-budget bucket (:func:`syncer.pulling.pullbudget.budget_bucket`):

- ``seed.<image>.<group>``: the seeds' counted lease (:mod:`syncer.pulling.leases`: each seed's own
  keys, alive renewed while it pulls, deleted after). A seed that dies frees it one ``lease``
  later. A seed that is slow is not cut off: a node that has waited ``deadline`` on its own
  clock may count ``seeds + i`` holders as well (one more seed per deadline), so no clocks of
  two nodes are compared.
- ``seeded.<image>.<node>``: "this node holds the image", written by the seed after its pull,
  TTL ``report_ttl``; one key per node, so a node writes only its own. Waiters read the newest
  of them with one direct get (``last_by_subj`` on ``seeded.<image>.>``) and check it names the
  image and the node of its key; a bad or forged report costs egress, never correctness: a pull
  through a pull-through mirror succeeds whether the cache holds the image or not.

If NATS does not answer, the node pulls at once (one warning per outage): seeding saves egress,
it must never leave images missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.js.kv import KeyValue

from ops.lifecycle import sleep_unless_stopping
from syncer import metrics
from syncer.folding.references import ImageRef
from syncer.pulling.leases import Lease, alive_key, lease_ttl, release, take
from syncer.pulling.pullbudget import budget_bucket, image_hash, open_budget_bucket

__all__ = ["SeedSettings", "SeedTurn", "Seeding", "group_token", "mirrors"]

log = logging.getLogger(__name__)

# Waiting for a seed: the first look again after about this long, doubling up to the cap (a
# follower notices a report this late at most: one direct get per waiting node per cap).
_FIRST_RETRY = 0.5
_MAX_RETRY = 5.0
ANY_REGISTRY = "*"


def mirrors(mirrored: tuple[str, ...], image: ImageRef) -> bool:
    """Does the node's runtime fetch ``image`` through a mirror (``*``: every registry)?"""
    return ANY_REGISTRY in mirrored or image.domain in mirrored


def group_token(value: str) -> str:
    """A seed group (a zone, a label's value) as one key token; ``_`` for none."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", value) or "_"


@dataclass(frozen=True)
class SeedSettings:
    # Registry hosts the node's runtime reaches through a mirror (``*``: all); empty: off.
    mirrored: tuple[str, ...]
    # Seed pulls per image and group, cluster-wide.
    seeds: int = 1
    prefix: str = "agones"
    replicas: int = 1
    # A seed lease's TTL; renewed every third of it while the seed pulls.
    lease: float = 30.0
    # A node waiting this long (its own clock) for a seed may become one more seed.
    deadline: float = 600.0
    # How long a seed's "complete" report stands.
    report_ttl: float = 3600.0
    # No seed counts longer than this after taking its lease (the pull timeout plus a lease).
    max_hold: float = 630.0


class SeedReport(msgspec.Struct, frozen=True):
    image: str
    node: str


@dataclass
class SeedTurn:
    """How one pull goes: to the registry (a seed, or no mirror) or to the mirror."""

    mirrored: bool
    # This node is a seed for the image (it holds a lease): it reports the image when pulled.
    seed: bool = False
    # Set by the puller: the pull worked.
    pulled: bool = False


class Seeding:
    """One node's side of seeding: ``async with seeding.turn(image) as turn: pull``."""

    def __init__(
        self,
        nc: Client,
        settings: SeedSettings,
        node: str,
        *,
        group: Callable[[], str] = lambda: "",
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._settings = settings
        self._node = node
        self._group = group
        self._rng = rng
        self._clock = clock
        self._kv: KeyValue | None = None
        self._waiting: set[ImageRef] = set()
        self._failing = False
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop waiting: pulls still waiting for a seed go ahead (and see the syncer stopping)."""
        self._stopping.set()

    def waiting(self) -> frozenset[ImageRef]:
        """Images this node waits to pull until a seed reports them."""
        return frozenset(self._waiting)

    @contextlib.asynccontextmanager
    async def turn(self, image: ImageRef) -> AsyncIterator[SeedTurn]:
        """Wait until this node may pull ``image`` and say how; a seed reports after the body."""
        if not mirrors(self._settings.mirrored, image):
            yield SeedTurn(mirrored=False)
            return
        self._waiting.add(image)
        try:
            turn, held = await self._decide(image)
        finally:
            self._waiting.discard(image)
        if held is None:
            yield turn
            return
        key, lease = held
        keep = asyncio.create_task(lease.keep(), name=f"renew {key}")
        try:
            yield turn
        finally:
            keep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep
            if turn.pulled:
                await self._report(image)
            metrics.SEED_PULLS.labels("success" if turn.pulled else "failure").inc()
            await self._release(key)

    # --- internals ------------------------------------------------------------------------

    async def _decide(self, image: ImageRef) -> tuple[SeedTurn, tuple[str, Lease] | None]:
        started = self._clock()
        attempt = 0
        while not self._stopping.is_set():
            try:
                if await self._reported(image):
                    return SeedTurn(mirrored=True), None
                # One more seed for every deadline this node has waited through.
                overdue = int((self._clock() - started) // self._settings.deadline)
                lease = await self._try_seed(image, self._settings.seeds * (1 + overdue))
            except Exception as e:
                self._record_failure(e)
                return SeedTurn(mirrored=False), None
            self._recovered()
            if lease is not None:
                if overdue:
                    log.info(
                        "seed too slow, seeding as well",
                        extra={"image": str(image), "waited": self._clock() - started},
                    )
                log.info("seeding image", extra={"image": str(image), "lease": lease[0]})
                return SeedTurn(mirrored=False, seed=True), lease
            if attempt == 0:
                metrics.SEED_WAITS.inc()
                log.info(
                    "waiting for a seed", extra={"image": str(image), "group": self._group_key()}
                )
            attempt += 1
            await sleep_unless_stopping(
                self._stopping, self._jitter(min(_FIRST_RETRY * 2**attempt, _MAX_RETRY))
            )
        return SeedTurn(mirrored=False), None

    async def _try_seed(self, image: ImageRef, seeds: int) -> tuple[str, Lease] | None:
        await self._bucket()
        family = f"seed.{image_hash(image)}.{self._group_key()}"
        revision = await take(
            self._js,
            budget_bucket(self._settings.prefix),
            family,
            self._node,
            limit=seeds,
            ttl=self._settings.lease,
            max_hold=self._settings.max_hold,
        )
        if revision is None:
            return None
        lease = Lease(
            self._js,
            self._subject(alive_key(family, self._node)),
            self._node,
            revision,
            self._settings.lease,
            self._record_failure,
        )
        return family, lease

    async def _reported(self, image: ImageRef) -> bool:
        """Has a seed reported ``image`` complete? One direct get of the newest report."""
        await self._bucket()
        bucket = budget_bucket(self._settings.prefix)
        reports = f"$KV.{bucket}.seeded.{image_hash(image)}."
        answer = await self._nc.request(
            f"$JS.API.DIRECT.GET.KV_{bucket}",
            json.dumps({"last_by_subj": reports + ">"}).encode(),
            timeout=5.0,
        )
        headers = answer.headers or {}
        if headers.get("Status") == "404":
            return False
        if headers.get("Status"):
            raise RuntimeError(f"seed report lookup failed: {headers}")
        subject = headers.get("Nats-Subject", "")
        try:
            report = msgspec.json.decode(answer.data, type=SeedReport)
        except msgspec.DecodeError:
            report = None
        # Validated: the report must name this image and the node whose key it is.
        if report is None or report.image != str(image) or subject != reports + report.node:
            metrics.SEED_BAD_REPORTS.inc()
            log.warning("ignoring a bad seed report", extra={"image": str(image), "key": subject})
            return False
        return True

    async def _report(self, image: ImageRef) -> None:
        key = f"seeded.{image_hash(image)}.{self._node}"
        value = msgspec.json.encode(SeedReport(image=str(image), node=self._node))
        try:
            await self._bucket()
            await self._js.publish(
                self._subject(key), value, msg_ttl=lease_ttl(self._settings.report_ttl)
            )
        except Exception as e:
            # The waiters become seeds after the deadline: more egress, nothing missing.
            self._record_failure(e)
            return
        log.info("seed complete", extra={"image": str(image), "node": self._node})

    async def _release(self, family: str) -> None:
        try:
            await self._bucket()
            await release(self._js, budget_bucket(self._settings.prefix), family, self._node)
        except Exception as e:
            self._record_failure(e)  # the TTL frees it anyway

    def _group_key(self) -> str:
        return group_token(self._group())

    def _subject(self, key: str) -> str:
        return f"$KV.{budget_bucket(self._settings.prefix)}.{key}"

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_budget_bucket(
                self._js, self._settings.prefix, self._settings.replicas
            )
        return self._kv

    def _jitter(self, seconds: float) -> float:
        return seconds * (0.5 + self._rng())

    def _record_failure(self, error: Exception) -> None:
        metrics.NATS_ERRORS.labels("seeding").inc()
        if not self._failing:
            self._failing = True
            log.warning(
                "seeding unavailable, pulling without waiting for a seed",
                extra={"error": repr(error)},
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("seeding available again")
