"""The runtime socket as the DaemonSet sees it: through a read-only mount of its directory.

When containerd restarts it unlinks its socket and binds a new one. A mount of the socket
*file* (the old `type: Socket` hostPath) keeps pointing at the dead inode until the pod is
restarted; a mount of the *directory* shows the new socket at once. Both mounts are made here
for real (bind mounts, as the kubelet makes hostPath volumes), the directory one read-only as
deploy/syncer mounts it, and a running syncer dialling through it recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from support.fakekube import FakeKube
from support.faults_harness import (
    Churn,
    Images,
    InProcessBroadcaster,
    InProcessSyncer,
    broadcaster_settings,
    eventually,
    node_name,
    syncer_settings,
    wait_all_converged,
)
from support.syncer_harness import override

from image_syncer.sandbox.containerd import Containerd, short_dir
from syncer.runtime.cri import CriClient
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings

pytestmark = [pytest.mark.nats, pytest.mark.cri]


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, (
        f"mount {' '.join(args)} failed ({result.stderr.strip()}): this test needs root, "
        "as CI and the README's quick start run"
    )


@contextlib.contextmanager
def bind_mount(source: Path, target: Path, *, read_only: bool) -> Iterator[Path]:
    _mount("--bind", str(source), str(target))
    try:
        if read_only:
            _mount("-o", "remount,bind,ro", str(target))
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def mounts(own_containerd: Containerd, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(socket seen through a read-only directory mount, socket seen through a file mount)."""
    directory = short_dir(tmp_path / "dir-mount")
    directory.mkdir(parents=True, exist_ok=True)
    file_target = short_dir(tmp_path / "file-mount") / "cri.sock"
    file_target.parent.mkdir(parents=True, exist_ok=True)
    file_target.touch()
    with (
        bind_mount(own_containerd.socket_dir, directory, read_only=True),
        bind_mount(own_containerd.socket, file_target, read_only=False),
    ):
        yield directory / own_containerd.socket.name, file_target


@pytest.fixture
async def broadcaster(
    kube: FakeKube, nats_settings: NatsSettings, log_settings: LogSettings
) -> AsyncIterator[InProcessBroadcaster]:
    running = await InProcessBroadcaster(
        broadcaster_settings(kube, nats_settings, log_settings)
    ).start()
    yield running
    await running.stop()


async def _answers(endpoint: str) -> bool:
    client = CriClient(endpoint, call_timeout=2)
    try:
        await client.check()
        return True
    except Exception:
        return False
    finally:
        await client.close()


async def test_a_file_mount_keeps_the_dead_socket_a_directory_mount_sees_the_new_one(
    own_containerd: Containerd, mounts: tuple[Path, Path]
) -> None:
    through_dir, through_file = mounts
    assert await _answers(f"unix://{through_dir}")
    assert await _answers(f"unix://{through_file}")
    with pytest.raises(OSError):  # read-only: the pod cannot replace or remove the socket
        os.unlink(through_dir)

    await asyncio.to_thread(own_containerd.restart)

    assert await _answers(f"unix://{through_dir}")
    # The file mount still shows the unlinked inode: nothing listens there any more.
    assert not await _answers(f"unix://{through_file}")


async def test_a_syncer_dialling_through_the_directory_mount_survives_runtime_restarts(
    kube: FakeKube,
    broadcaster: InProcessBroadcaster,
    own_containerd: Containerd,
    mounts: tuple[Path, Path],
    nats_settings: NatsSettings,
    js: JetStreamContext,
    prefix: str,
    push: Callable[..., str],
) -> None:
    through_dir, _ = mounts
    images = Images(push, 4)
    churn = Churn(kube, images, seed=16)
    settings = syncer_settings(node_name(), own_containerd, nats_settings, prefix)
    settings = override(settings, cri_endpoint=f"unix://{through_dir}")
    syncer = await InProcessSyncer(settings, own_containerd).start()
    nodes = [(syncer.node, own_containerd)]
    try:
        churn.steps(3)
        await wait_all_converged(js, prefix, kube, nodes, images)
        for kill in (False, True):
            own_containerd.stop(kill=kill)
            churn.steps(3)  # events arrive while the runtime is down
            await asyncio.to_thread(own_containerd.restart)
            await wait_all_converged(js, prefix, kube, nodes, images)
        await eventually(
            lambda: _answers(settings.runtime.endpoint), "the syncer's endpoint answers"
        )
    finally:
        await syncer.stop()
