"""Cleanup of unused images: only our own pulls, after the grace period, never what is still used.

Records live in a real JetStream KV bucket; the runtime is a small in-memory stand-in with
containerd's removal semantics (removing by one name drops every name of that image), and time
is an injected clock, so no test sleeps.
"""

from __future__ import annotations

import hashlib
import logging

import grpc
import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from support.polling import eventually

from syncer.folding.references import normalize
from syncer.keeping.cleaner import BUCKET, RELOAD_EVERY, Cleaner, Removal
from syncer.keeping.ledger import record_key
from syncer.runtime.cri import CriError, RuntimeImage

GRACE = 600.0
NGINX = "docker.io/library/nginx:1.27"
GAME_V1 = "registry.example.com/games/arena:1.0"
GAME_V2 = "registry.example.com/games/arena:2.0"
KUBELET_PULLED = "registry.k8s.io/pause:3.9"
DIGEST = "sha256:" + "d" * 64


class Runtime:
    """Images by id with their names; refuses to remove what it is told is in use."""

    def __init__(self) -> None:
        self.images: dict[str, set[str]] = {}
        self.busy: set[str] = set()
        self.removed: list[str] = []

    def add(self, image_id: str, *names: str) -> None:
        self.images.setdefault(image_id, set()).update(str(normalize(n)) for n in names)

    def list_images(self) -> list[RuntimeImage]:
        return [
            RuntimeImage(
                id=image_id,
                repo_tags=tuple(n for n in names if "@" not in n),
                repo_digests=tuple(n for n in names if "@" in n),
                size=1,
            )
            for image_id, names in self.images.items()
        ]

    async def remove_image(self, ref: str) -> None:
        wanted = str(normalize(ref))
        for image_id, names in list(self.images.items()):
            if wanted in names:
                if image_id in self.busy:
                    raise CriError(
                        f"RemoveImage {ref}: FAILED_PRECONDITION: image {image_id} is in use by container 3f2a",
                        grpc.StatusCode.FAILED_PRECONDITION,
                    )
                del self.images[image_id]
                self.removed.append(ref)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def bucket(prefix: str) -> str:
    return f"PULLED_{prefix}"


@pytest.fixture
def runtime() -> Runtime:
    return Runtime()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def _cleaner(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock, node: str = "node-a"
) -> Cleaner:
    return await Cleaner.open(
        nc.jetstream(), node, runtime.remove_image, grace=GRACE, clock=clock, bucket=bucket
    )


async def test_only_our_unused_pulls_are_removed_after_the_grace_period(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    runtime.add("sha256:nginx", NGINX)
    runtime.add("sha256:v1", GAME_V1)
    runtime.add("sha256:pause", KUBELET_PULLED)
    await cleaner.record_pulled("nginx:1.27")
    await cleaner.record_pulled(GAME_V1)

    # The game Fleet is gone; nginx is still wanted; pause was never ours.
    assert await cleaner.observe([NGINX], runtime.list_images()) == []
    clock.advance(GRACE - 1)
    assert await cleaner.observe([NGINX], runtime.list_images()) == []
    clock.advance(1)
    assert await cleaner.observe([NGINX], runtime.list_images()) == [Removal(GAME_V1, "removed")]
    assert runtime.removed == [GAME_V1]
    assert set(runtime.images) == {"sha256:nginx", "sha256:pause"}
    assert cleaner.pulled == {NGINX}
    # Nothing more to do, however long we wait.
    clock.advance(10 * GRACE)
    assert await cleaner.observe([NGINX], runtime.list_images()) == []
    assert "sha256:pause" in runtime.images


async def test_a_fleet_recreated_within_the_grace_period_cancels_removal(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    runtime.add("sha256:v1", GAME_V1)
    await cleaner.record_pulled(GAME_V1)
    with caplog.at_level(logging.INFO, logger="syncer.keeping.cleaner"):
        await cleaner.observe([], runtime.list_images())  # deleted: timer starts
        clock.advance(GRACE - 10)
        await cleaner.observe([GAME_V1], runtime.list_images())  # re-created: cancelled
        clock.advance(20)
        assert await cleaner.observe([GAME_V1], runtime.list_images()) == []
        await cleaner.observe([], runtime.list_images())  # deleted again: a fresh timer
        clock.advance(GRACE - 1)
        assert await cleaner.observe([], runtime.list_images()) == []
        clock.advance(1)
        assert await cleaner.observe([], runtime.list_images()) == [Removal(GAME_V1, "removed")]
    assert [r.getMessage() for r in caplog.records] == [
        "image unused, removal scheduled",
        "image removal cancelled, a fleet uses it again",
        "image unused, removal scheduled",
        "unused image removed",
    ]


async def test_a_refused_removal_is_logged_and_retried_next_cycle(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    runtime.add("sha256:v1", GAME_V1)
    runtime.busy.add("sha256:v1")
    await cleaner.record_pulled(GAME_V1)
    await cleaner.observe([], runtime.list_images())
    clock.advance(GRACE)
    with caplog.at_level(logging.WARNING, logger="syncer.keeping.cleaner"):
        (refused,) = await cleaner.observe([], runtime.list_images())
    assert refused.outcome == "refused"
    assert "in use by container" in refused.detail
    assert caplog.records[0].getMessage() == "image removal refused, retrying next cycle"
    assert cleaner.pulled == {GAME_V1}
    # The Terminating game server is gone: the next cycle removes it.
    runtime.busy.clear()
    assert await cleaner.observe([], runtime.list_images()) == [Removal(GAME_V1, "removed")]


async def test_images_used_by_running_containers_are_not_removed(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    runtime.add("sha256:v1", GAME_V1)
    await cleaner.record_pulled(GAME_V1)
    await cleaner.observe([], runtime.list_images())
    clock.advance(GRACE)
    (deferred,) = await cleaner.observe([], runtime.list_images(), in_use={"sha256:v1"})
    assert deferred == Removal(GAME_V1, "refused", "in use by a container")
    assert runtime.removed == []
    assert await cleaner.observe([], runtime.list_images()) == [Removal(GAME_V1, "removed")]


@pytest.mark.parametrize(
    "container_image",
    [
        pytest.param(GAME_V1, id="by-tag"),
        pytest.param("registry.example.com/games/arena:1.0", id="as-written"),
        pytest.param(f"registry.example.com/games/arena@{DIGEST}", id="by-repo-digest"),
        pytest.param("sha256:v1", id="by-id"),
    ],
)
async def test_an_image_in_use_under_any_of_its_names_is_not_removed(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock, container_image: str
) -> None:
    # ListContainers reports the spec image as the kubelet asked and image_ref as the runtime
    # resolved it: either may be an id, a tag or a digest reference.
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    runtime.add("sha256:v1", GAME_V1, f"registry.example.com/games/arena@{DIGEST}")
    runtime.add("sha256:other", "registry.example.com/games/other:1.0")
    await cleaner.record_pulled(GAME_V1)
    await cleaner.observe([], runtime.list_images())
    clock.advance(GRACE)

    removals = await cleaner.observe([], runtime.list_images(), in_use={container_image})

    assert removals == [Removal(GAME_V1, "refused", "in use by a container")]
    assert runtime.removed == []


async def test_an_image_still_wanted_under_another_name_is_kept(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    # v1 and v2 are the same content: removing "v1" would take "v2" away from the live Fleet.
    runtime.add("sha256:same", GAME_V1, GAME_V2, f"registry.example.com/games/arena@{DIGEST}")
    await cleaner.record_pulled(GAME_V1)
    clock.advance(10 * GRACE)
    assert await cleaner.observe([GAME_V2], runtime.list_images()) == []
    assert (
        await cleaner.observe([f"registry.example.com/games/arena@{DIGEST}"], runtime.list_images())
        == []
    )
    assert runtime.removed == []


async def test_an_image_removed_by_someone_else_is_forgotten(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    await cleaner.record_pulled(GAME_V1)
    # The first listing may predate the pull; the next one without the image settles it.
    assert await cleaner.observe([], runtime.list_images()) == []
    assert await cleaner.observe([], runtime.list_images()) == [Removal(GAME_V1, "gone")]
    assert cleaner.pulled == frozenset()
    kv = await nc.jetstream().key_value(bucket)
    with pytest.raises(KeyNotFoundError):
        await kv.get(record_key("node-a", GAME_V1))


async def test_an_image_pulled_after_the_listing_is_not_forgotten(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    # The chaos soak's finding: a reconcile lists the images, a pull of GAME_V1 finishes and is
    # recorded, its Fleet is deleted, then the cleanup runs on the older listing. Forgetting the
    # record there would leave GAME_V1 on the node for good, owned by no one.
    cleaner = await _cleaner(nc, bucket, runtime, clock)
    await cleaner.observe([], runtime.list_images())
    listing = runtime.list_images()
    runtime.add("sha256:v1", GAME_V1)
    await cleaner.record_pulled(GAME_V1)
    assert await cleaner.observe([], listing) == []
    assert cleaner.pulled == {GAME_V1}
    clock.advance(GRACE)
    await cleaner.observe([], runtime.list_images())
    clock.advance(GRACE)
    assert await cleaner.observe([], runtime.list_images()) == [Removal(GAME_V1, "removed")]
    assert "sha256:v1" not in runtime.images


async def test_records_are_durable_per_node_and_keyed_by_reference_hash(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    dotted = "ip-10-0-1-23.eu-west-1.compute.internal"
    first = await _cleaner(nc, bucket, runtime, clock, node=dotted)
    other = await _cleaner(nc, bucket, runtime, clock, node="ip-10-0-1-23")
    await first.record_pulled("nginx:1.27")
    await first.record_pulled(f"{GAME_V1}@{DIGEST}")
    await other.record_pulled(GAME_V2)

    kv = await nc.jetstream().key_value(bucket)
    key = f"{dotted}.{hashlib.sha256(NGINX.encode()).hexdigest()}"
    assert record_key(dotted, "nginx:1.27") == key
    entry = await kv.get(key)
    assert entry.value is not None
    value = msgspec.json.decode(entry.value)
    assert value["ref"] == NGINX
    assert isinstance(value["pulled_at"], float)

    # A restart (a new Cleaner on the same bucket) remembers exactly this node's pulls.
    restarted = await _cleaner(nc, bucket, runtime, clock, node=dotted)
    assert restarted.pulled == {NGINX, f"{GAME_V1}@{DIGEST}"}
    assert (await _cleaner(nc, bucket, runtime, clock, node="ip-10-0-1-23")).pulled == {GAME_V2}


async def test_the_default_bucket_name_is_the_documented_one() -> None:
    assert BUCKET == "IMAGE_SYNCER_PULLED"


async def test_an_unreadable_record_is_logged_and_ignored(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    first = await _cleaner(nc, bucket, runtime, clock)
    await first.record_pulled(GAME_V1)
    kv = await nc.jetstream().key_value(bucket)
    await kv.put("node-a.garbage", b"not json")
    with caplog.at_level(logging.WARNING, logger="syncer.keeping.cleaner"):
        restarted = await _cleaner(nc, bucket, runtime, clock)
    assert restarted.pulled == {GAME_V1}
    assert [r.getMessage() for r in caplog.records if r.name == "syncer.keeping.cleaner"] == [
        "unreadable pulled-image record ignored"
    ]


# --- two syncer pods of one node, and the ledger's lifetime -----------------------------------


async def test_a_pod_never_deletes_a_record_another_pod_of_its_node_wrote_since(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    # A DaemonSet rollout: both pods run. The old pod's image was removed by someone else
    # (kubelet GC); the new pod pulls it again, and its record lands after the old pod's
    # listing was taken: a listing that still shows the image absent.
    old = await _cleaner(nc, bucket, runtime, clock)
    new = await _cleaner(nc, bucket, runtime, clock)
    await old.record_pulled(GAME_V1)
    await old.observe([], runtime.list_images())  # too recent to call it gone
    stale = runtime.list_images()
    await new.record_pulled(GAME_V1)
    runtime.add("sha256:v1", GAME_V1)
    await old.observe([], stale)
    # The old pod is gone; the new one restarts: it must still own what it pulled.
    restarted = await _cleaner(nc, bucket, runtime, clock)
    assert GAME_V1 in restarted.pulled, "the old pod deleted the new pod's record"


async def test_pulled_records_expire_unless_their_node_renews_them(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    live = await Cleaner.open(
        nc.jetstream(), "node-live", runtime.remove_image, clock=clock, bucket=bucket, ttl=2.0
    )
    gone = await Cleaner.open(
        nc.jetstream(), "node-gone", runtime.remove_image, clock=clock, bucket=bucket, ttl=2.0
    )
    runtime.add("sha256:v1", GAME_V1)
    await live.record_pulled(GAME_V1)
    await gone.record_pulled(GAME_V1)
    kv = await nc.jetstream().key_value(bucket)

    async def expired(node: str) -> bool:
        try:
            await kv.get(record_key(node, GAME_V1))
        except KeyNotFoundError:
            return True
        return False

    # Neither renews (no cycle ran): the server expires both, as it does a gone node's.
    await eventually(lambda: expired("node-gone"), "the gone node's record to expire")
    await eventually(lambda: expired("node-live"), "the live node's record to expire")
    # The live node's next cycle writes what it holds again (as after a NATS outage longer
    # than the TTL); the gone node's stays gone.
    await live.observe([GAME_V1], runtime.list_images())
    assert not await expired("node-live"), "a live node's record was not written again"
    assert await expired("node-gone")
    # And again every quarter of the TTL, by its own clock.
    revision = (await kv.get(record_key("node-live", GAME_V1))).revision or 0
    clock.advance(0.5)
    await live.observe([GAME_V1], runtime.list_images())
    assert ((await kv.get(record_key("node-live", GAME_V1))).revision or 0) > revision


async def test_a_record_another_pod_of_its_node_wrote_late_is_taken_within_the_reload_period(
    nc: Client, bucket: str, runtime: Runtime, clock: Clock
) -> None:
    # The new pod reads the node's records again when an unwanted image nobody owns turns up;
    # the old pod's record of it lands only after that (NATS was slow at its pull).
    new = await _cleaner(nc, bucket, runtime, clock)
    runtime.add("sha256:v1", GAME_V1)
    assert await new.observe([], runtime.list_images()) == []
    old = await _cleaner(nc, bucket, runtime, clock)
    await old.record_pulled(GAME_V1)
    clock.advance(RELOAD_EVERY - 1)
    assert await new.observe([], runtime.list_images()) == []
    assert new.pulled == frozenset(), "read again before the period was up"
    clock.advance(1)
    assert await new.observe([], runtime.list_images()) == []
    assert new.pulled == {GAME_V1}
    clock.advance(GRACE)
    assert await new.observe([], runtime.list_images()) == [Removal(GAME_V1, "removed")]
