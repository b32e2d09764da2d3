"""The CRI client against a real containerd pulling from a real docker-registry on loopback."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from support.polling import eventually

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.images import PushFailed, build_image, push_image
from image_syncer.sandbox.processes import MissingComponent
from image_syncer.sandbox.registry import Registry
from syncer.cri_api import api_pb2
from syncer.runtime.cri import (
    CriClient,
    CriError,
    RegistryAuth,
    RuntimeContainer,
    RuntimeUnavailable,
    socket_path,
)
from syncer.runtime.criobjects import images_in_use

pytestmark = pytest.mark.cri


@pytest.fixture
async def cri(containerd: Containerd) -> AsyncIterator[CriClient]:
    client = CriClient(containerd.endpoint, call_timeout=30)
    yield client
    await client.close()


def _repository(ref: str) -> str:
    return ref.rsplit(":", 1)[0]


async def test_pull_is_visible_to_cri_and_to_ctr(
    cri: CriClient, containerd: Containerd, push: Callable[..., str]
) -> None:
    ref = push()

    image_ref = await cri.pull_image(ref, timeout=60)

    assert image_ref.startswith("sha256:")
    listed = {image.id: image for image in await cri.list_images()}
    assert ref in listed[image_ref].repo_tags
    status = await cri.image_status(ref)
    assert status is not None
    assert status.id == image_ref
    assert status.size > 0
    assert ref in containerd.image_refs()


async def test_pull_by_digest_matches_repo_digests(
    cri: CriClient, registry: Registry, containerd: Containerd
) -> None:
    repository = f"test/by-digest-{time.monotonic_ns()}"
    digest = push_image(registry.address, repository, "v1")
    by_digest = f"{registry.address}/{repository}@{digest}"

    await cri.pull_image(by_digest, timeout=60)

    status = await cri.image_status(by_digest)
    assert status is not None
    assert by_digest in status.repo_digests
    assert by_digest in containerd.image_refs()


async def test_image_status_of_an_absent_image_is_none(
    cri: CriClient, push: Callable[..., str]
) -> None:
    ref = push()  # exists in the registry, never pulled

    assert await cri.image_status(ref) is None


async def test_remove_image(
    cri: CriClient, containerd: Containerd, push: Callable[..., str]
) -> None:
    ref = push()
    await cri.pull_image(ref, timeout=60)

    await cri.remove_image(ref)

    assert await cri.image_status(ref) is None
    assert ref not in containerd.image_refs()
    await cri.remove_image(ref)  # idempotent, as CRI requires


async def test_image_removed_with_ctr_is_gone_for_cri(
    cri: CriClient, containerd: Containerd, push: Callable[..., str]
) -> None:
    ref = push()
    image_id = await cri.pull_image(ref, timeout=60)

    containerd.remove_image(ref)

    assert await cri.image_status(ref) is None
    assert image_id not in {image.id for image in await cri.list_images()}
    assert image_id not in containerd.image_refs()


async def test_removing_only_the_tag_leaves_the_image_known_by_digest(
    cri: CriClient, containerd: Containerd, push: Callable[..., str]
) -> None:
    ref = push()
    image_id = await cri.pull_image(ref, timeout=60)

    containerd.remove_image(ref, every_name=False)

    assert await cri.image_status(ref) is None
    listed = {image.id: image for image in await cri.list_images()}
    assert ref not in listed[image_id].repo_tags
    assert listed[image_id].repo_digests


async def test_unknown_image_raises_a_cri_error_naming_it(
    cri: CriClient, registry: Registry
) -> None:
    ref = f"{registry.address}/test/never-pushed:v1"

    with pytest.raises(CriError) as raised:
        await cri.pull_image(ref, timeout=60)

    assert not isinstance(raised.value, RuntimeUnavailable)
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert "PullImage" in str(raised.value)
    assert ref in str(raised.value)


async def test_image_fs_info_reports_the_image_filesystem(
    cri: CriClient, containerd: Containerd
) -> None:
    filesystems = await cri.image_fs_info()

    assert filesystems
    assert filesystems[0].mountpoint.startswith(str(containerd.state_dir))


async def test_version_names_the_runtime(cri: CriClient) -> None:
    version = await cri.version()

    assert version.name == "containerd"
    assert version.version
    assert version.api_version.startswith("v1")


async def test_right_credentials_pull_from_a_private_registry(
    cri: CriClient, auth_registry: Registry, push: Callable[..., str]
) -> None:
    assert auth_registry.credentials is not None
    user, password = auth_registry.credentials
    ref = push(into=auth_registry)

    await cri.pull_image(ref, RegistryAuth(username=user, password=password), timeout=60)

    assert await cri.image_status(ref) is not None


@pytest.mark.parametrize("wrong", [None, "not-the-password"], ids=["no-auth", "wrong-password"])
async def test_refused_credentials_fail_clearly_without_the_password(
    cri: CriClient, auth_registry: Registry, push: Callable[..., str], wrong: str | None
) -> None:
    assert auth_registry.credentials is not None
    user, password = auth_registry.credentials
    ref = push(into=auth_registry)
    auth = None if wrong is None else RegistryAuth(username=user, password=wrong)

    with pytest.raises(CriError) as raised:
        await cri.pull_image(ref, auth, timeout=60)

    text = str(raised.value)
    assert "401 Unauthorized" in text
    assert ref in text
    assert password not in text
    assert wrong is None or wrong not in text
    assert raised.value.__cause__ is None


def test_registry_auth_repr_hides_secrets() -> None:
    auth = RegistryAuth(
        username="u",
        password="hunter2",
        auth="dTpodW50ZXIy",
        identity_token="idtok",
        registry_token="regtok",
    )

    shown = repr(auth) + str(auth)

    for secret in ("hunter2", "dTpodW50ZXIy", "idtok", "regtok"):
        assert secret not in shown
    assert "u" in shown


async def test_absent_socket_is_reported_as_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.sock"
    client = CriClient(f"unix://{missing}", call_timeout=5)
    try:
        with pytest.raises(RuntimeUnavailable, match=f"CRI socket {missing} does not exist"):
            await client.check()
        with pytest.raises(RuntimeUnavailable, match="does not exist"):
            await client.list_images()
    finally:
        await client.close()


async def test_bare_socket_path_is_accepted(containerd: Containerd) -> None:
    client = CriClient(str(containerd.socket))
    try:
        await client.check()
    finally:
        await client.close()


def test_socket_path_forms() -> None:
    assert socket_path("unix:///run/containerd/containerd.sock") == Path(
        "/run/containerd/containerd.sock"
    )
    assert socket_path("unix:/run/crio/crio.sock") == Path("/run/crio/crio.sock")
    assert socket_path("/run/x.sock") == Path("/run/x.sock")
    assert socket_path("127.0.0.1:9000") is None


async def _until(check, *, timeout: float = 30):  # type: ignore[no-untyped-def]
    """``check()``'s answer once the runtime answers at all (it may be restarting)."""
    answer = None

    async def answered() -> bool:
        nonlocal answer
        answer = await check()
        return True

    await eventually(answered, "the runtime to answer", timeout, tolerate=(RuntimeUnavailable,))
    return answer


async def test_client_recovers_after_containerd_restart(
    own_containerd: Containerd, push: Callable[..., str]
) -> None:
    ref = push()
    client = CriClient(own_containerd.endpoint, call_timeout=10)
    try:
        await client.pull_image(ref, timeout=60)
        own_containerd.stop()

        with pytest.raises(RuntimeUnavailable):
            await client.list_images()

        own_containerd.restart()
        images = await _until(client.list_images)
        assert any(ref in image.repo_tags for image in images)
    finally:
        await client.close()


@pytest.fixture
def silent_registry() -> Iterator[str]:
    """A TCP listener that accepts and never answers: a registry hung mid-request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        stop = threading.Event()
        held: list[socket.socket] = []

        def accept() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    held.append(listener.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        yield f"127.0.0.1:{listener.getsockname()[1]}"
        stop.set()
        thread.join()
        for conn in held:
            conn.close()


async def test_pull_deadline_is_honoured(cri: CriClient, silent_registry: str) -> None:
    ref = f"{silent_registry}/test/hangs:v1"

    with pytest.raises(CriError) as raised:
        await cri.pull_image(ref, timeout=1)

    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not isinstance(raised.value, RuntimeUnavailable)
    assert ref in str(raised.value)
    await cri.check()  # the runtime itself is fine


async def test_client_recovers_after_containerd_is_killed(own_containerd: Containerd) -> None:
    client = CriClient(own_containerd.endpoint, call_timeout=10)
    try:
        await client.check()
        own_containerd.restart(kill=True)

        await _until(client.check)
    finally:
        await client.close()


def _all_threads_stopped(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
    return all(state in ("T", "t") for state in states)


async def test_a_hung_runtime_is_unavailable_not_an_image_error(
    own_containerd: Containerd,
) -> None:
    client = CriClient(own_containerd.endpoint, call_timeout=1)
    assert own_containerd.process is not None
    pid = own_containerd.process.pid
    try:
        await client.check()
        os.kill(pid, signal.SIGSTOP)
        try:
            # A stop is delivered asynchronously: call only once every thread is stopped.
            await eventually(lambda: _all_threads_stopped(pid), "containerd stopped", interval=0.01)
            with pytest.raises(RuntimeUnavailable, match="did not answer within 1s"):
                await client.list_images()
            with pytest.raises(RuntimeUnavailable, match="ListContainers: runtime at"):
                await client.list_containers()
        finally:
            os.kill(pid, signal.SIGCONT)
        await _until(client.check)
    finally:
        await client.close()


async def test_registry_down_is_an_image_error_and_a_restart_serves_it_again(
    cri: CriClient, own_registry: Registry, push: Callable[..., str]
) -> None:
    ref = push(into=own_registry)
    own_registry.stop()

    with pytest.raises(CriError) as raised:
        await cri.pull_image(ref, timeout=60)
    assert not isinstance(raised.value, RuntimeUnavailable)
    assert "connection refused" in str(raised.value)

    own_registry.start()  # same port, same storage
    await cri.pull_image(ref, timeout=60)
    assert await cri.image_status(ref) is not None


async def test_list_containers_answers_on_the_real_runtime(
    cri: CriClient, push: Callable[..., str]
) -> None:
    # The fixture runs no CRI containers (no pod sandboxes), so the answer is empty but real:
    # containerd implements RuntimeService on the same socket as ImageService.
    await cri.pull_image(push(), timeout=60)  # images alone are not containers

    assert await cri.list_containers() == []
    assert await cri.images_in_use() == frozenset()


def test_a_container_maps_from_cri_with_every_name_of_its_image() -> None:
    proto = api_pb2.Container(
        id="c1",
        image=api_pb2.ImageSpec(image="registry.example.com/games/arena:1.0"),
        image_ref="sha256:" + "a" * 64,
        state=api_pb2.CONTAINER_RUNNING,
    )

    container = RuntimeContainer.from_proto(proto)

    assert container == RuntimeContainer(
        id="c1",
        image="registry.example.com/games/arena:1.0",
        image_ref="sha256:" + "a" * 64,
        state="CONTAINER_RUNNING",
    )
    assert container.image_names() == {"registry.example.com/games/arena:1.0", "sha256:" + "a" * 64}
    assert RuntimeContainer.from_proto(
        api_pb2.Container(id="c2", state=api_pb2.ContainerState.ValueType(99))
    ).state == ("CONTAINER_UNKNOWN")


def test_images_in_use_are_those_of_containers_that_have_not_exited() -> None:
    def container(name: str, state: str) -> RuntimeContainer:
        return RuntimeContainer(
            id=name, image=f"img-{name}", image_ref=f"sha256:{name}", state=state
        )

    containers = [
        container("created", "CONTAINER_CREATED"),
        container("running", "CONTAINER_RUNNING"),
        container("unknown", "CONTAINER_UNKNOWN"),
        container("exited", "CONTAINER_EXITED"),
    ]

    assert images_in_use(containers) == {
        "img-created",
        "sha256:created",
        "img-running",
        "sha256:running",
        "img-unknown",
        "sha256:unknown",
    }


async def test_close_is_idempotent_and_the_client_reopens(containerd: Containerd) -> None:
    client = CriClient(containerd.endpoint)
    await client.check()
    await client.close()
    await client.close()

    await client.check()
    await client.close()


# The launchers themselves: what the fixtures above rely on.


@pytest.mark.parametrize("launcher", ["containerd", "registry"])
def test_a_missing_binary_fails_with_an_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    component = Containerd(tmp_path / "c") if launcher == "containerd" else Registry(tmp_path / "r")

    with pytest.raises(MissingComponent, match="apt-get install -y"):
        component.start()


async def test_native_snapshotter_pulls_too(tmp_path: Path, push: Callable[..., str]) -> None:
    ref = push()
    with Containerd(tmp_path / "native", snapshotter="native") as runtime:
        client = CriClient(runtime.endpoint)
        try:
            await client.pull_image(ref, timeout=60)
            assert ref in runtime.image_refs()
        finally:
            await client.close()


def test_pushing_to_a_private_registry_needs_its_credentials(auth_registry: Registry) -> None:
    with pytest.raises(PushFailed, match="401"):
        push_image(auth_registry.address, "test/anonymous", "v1")


def test_images_are_unique_unless_asked_otherwise() -> None:
    assert build_image().digest != build_image().digest
    assert build_image(unique=False).digest == build_image(unique=False).digest
    sized = build_image(layer_bytes=100_000)
    assert 100_000 < len(sized.layer) < 110_000  # random payload: gzip cannot shrink it


async def test_a_long_state_dir_still_gets_a_socket_path_that_fits(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with Containerd(deep) as runtime:
        assert len(str(runtime.socket) + ".ttrpc") < 108
        assert runtime.config_file.parent == deep
        client = CriClient(runtime.endpoint)
        try:
            await client.check()
        finally:
            await client.close()
    assert not runtime.socket_dir.exists()
