"""``--remove-unused`` as the syncer runs it: in-use images come from ListContainers every pass.

Records live in a real JetStream KV bucket. The runtime is an in-memory stand-in with
containerd 1.6's behaviour that matters here: RemoveImage succeeds even under a running
container, so only the syncer's own ListContainers check protects it. Grace is zero, so every
pass is already past it and no test waits.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from syncer.folding.references import normalize
from syncer.keeping.unusedimages import UnusedImages
from syncer.pulling.puller import PullResult
from syncer.runtime.cri import CriError, RuntimeContainer, RuntimeImage
from syncer.runtime.criobjects import images_in_use

GAME = "registry.example.com/games/arena:1.0"
GAME_ID = "sha256:" + "a" * 64


class Runtime:
    """Images and containers; removes whatever it is asked to, as containerd 1.6 does."""

    def __init__(self) -> None:
        self.images: dict[str, str] = {}  # normalized ref -> id
        self.containers: list[RuntimeContainer] = []
        self.removed: list[str] = []
        self.list_error: CriError | None = None

    def list_images(self) -> list[RuntimeImage]:
        return [
            RuntimeImage(id=image_id, repo_tags=(ref,), repo_digests=(), size=1)
            for ref, image_id in self.images.items()
        ]

    async def remove_image(self, ref: str) -> None:
        self.images.pop(str(normalize(ref)), None)
        self.removed.append(ref)

    async def images_in_use(self) -> frozenset[str]:
        if self.list_error is not None:
            raise self.list_error
        return images_in_use(self.containers)

    def run(self, state: str = "CONTAINER_RUNNING") -> None:
        # containerd reports the spec image as the kubelet wrote it and image_ref as the id.
        self.containers = [
            RuntimeContainer("c1", "registry.example.com/games/arena:1.0", GAME_ID, state)
        ]


@pytest.fixture
def runtime() -> Runtime:
    runtime = Runtime()
    runtime.images[GAME] = GAME_ID
    return runtime


@pytest.fixture
async def unused(js: JetStreamContext, prefix: str, runtime: Runtime) -> UnusedImages:
    # As the runner builds it: only the client's bound remove_image, no explicit source.
    return _ours(UnusedImages(js, "node-a", runtime.remove_image, grace=0.0, prefix=prefix))


def _ours(unused: UnusedImages) -> UnusedImages:
    unused.on_pull_result(PullResult(normalize(GAME), ok=True, ref=GAME_ID))
    return unused


async def _pass(unused: UnusedImages, runtime: Runtime) -> None:
    await unused.after_list([], runtime.list_images())  # no Fleet wants GAME any more


def _list_containers_errors() -> float:
    return (
        REGISTRY.get_sample_value("image_syncer_syncer_cri_errors_total", {"rpc": "ListContainers"})
        or 0.0
    )


async def test_an_image_a_running_container_uses_is_kept_until_the_container_exits(
    unused: UnusedImages, runtime: Runtime
) -> None:
    runtime.run()

    await _pass(unused, runtime)
    await _pass(unused, runtime)

    assert runtime.removed == []
    runtime.run(state="CONTAINER_EXITED")
    await _pass(unused, runtime)
    assert runtime.removed == [GAME]


async def test_an_explicit_source_of_containers_is_asked(
    js: JetStreamContext, prefix: str, runtime: Runtime
) -> None:
    removed: list[str] = []

    async def remover(ref: str) -> None:
        removed.append(ref)

    unused = _ours(
        UnusedImages(js, "node-a", remover, grace=0.0, prefix=prefix, containers=runtime)
    )
    runtime.run(state="CONTAINER_CREATED")  # created, not started yet: it will need the image

    await _pass(unused, runtime)

    assert removed == []
    runtime.containers = []
    await _pass(unused, runtime)
    assert removed == [GAME]


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL], ids=lambda c: c.name
)
async def test_a_list_containers_failure_skips_removals_that_cycle(
    unused: UnusedImages,
    runtime: Runtime,
    code: grpc.StatusCode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime.list_error = CriError(f"CRI ListContainers: {code.name}: nope", code)
    errors_before = _list_containers_errors()

    with caplog.at_level(logging.INFO, logger="syncer.keeping.unusedimages"):
        await _pass(unused, runtime)
        await _pass(unused, runtime)

        assert runtime.removed == []
        assert _list_containers_errors() == errors_before + 2
        skipped = [r for r in caplog.records if "removal skipped" in r.getMessage()]
        assert len(skipped) == 1  # once per outage, not once per pass

        runtime.list_error = None
        await _pass(unused, runtime)

    assert runtime.removed == [GAME]
    assert any("removal resumes" in r.getMessage() for r in caplog.records)


async def test_without_a_source_of_containers_nothing_is_removed(
    js: JetStreamContext, prefix: str, runtime: Runtime
) -> None:
    removed: list[str] = []

    async def remover(ref: str) -> None:
        removed.append(ref)

    unused = _ours(UnusedImages(js, "node-a", remover, grace=0.0, prefix=prefix))

    await _pass(unused, runtime)
    await _pass(unused, runtime)

    assert removed == []


async def test_a_pull_recorded_before_it_starts_survives_a_crash_before_its_result(
    js: JetStreamContext, prefix: str, runtime: Runtime
) -> None:
    # The chaos soak's finding: the pull succeeded, recording it timed out (NATS cut off), the
    # syncer was SIGKILLed; after the restart no record owned the image and it stayed forever.
    crashed = UnusedImages(js, "node-a", runtime.remove_image, grace=0.0, prefix=prefix)
    await crashed.before_pull(normalize(GAME))
    # ... the runtime pulls GAME, and the process dies before on_pull_result.
    restarted = UnusedImages(js, "node-a", runtime.remove_image, grace=0.0, prefix=prefix)
    await _pass(restarted, runtime)
    assert runtime.removed == [GAME]
    assert GAME not in runtime.images
