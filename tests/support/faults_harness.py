"""What the fault tests share: the whole pipeline, and the one end state every fault must reach.

No tests here (pytest collects nothing from this module); ``test_faults_*.py`` import it. The
pipeline is real: the broadcaster (in-process or ``image-syncer broadcaster``) watching the fake
API server, nats-server, and one syncer per node (in-process or ``image-syncer syncer``) on its
own containerd, pulling from a real registry. After a fault, :func:`wait_all_converged` waits,
with a deadline, for the end state the issue asks for: the log holds exactly the cluster's
Fleets, and every node holds exactly the desired images of the images the test pushed (the
syncers run with ``--remove-unused`` and no grace, so images no Fleet wants any more go away),
as containerd itself (``ctr``) and the node's status entry both say.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from broadcaster.runner import run as run_broadcaster
from broadcaster.settings import Settings
from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.processes import free_port, stop_process
from ops.serving import Health
from support import polling
from support.fakekube import FakeKube
from support.fakekube.harness import fleet, wait_converged, with_image
from support.syncer_harness import settings_with
from syncer.folding.references import normalize
from syncer.runner import run as run_syncer
from syncer.settings import SyncerSettings
from wire.eventlog import LogSettings
from wire.natsconn import NatsSettings
from wire.nodestatus import StatusSettings, get_status, open_status_bucket

DEADLINE = 90.0


async def eventually(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> float:
    """Poll until ``check`` holds; an error of a component restarting under it means "not yet"."""
    return await polling.eventually(check, what, timeout, tolerate=(Exception,))


# --- the broadcaster ---------------------------------------------------------------------------


def broadcaster_settings(kube: FakeKube, nats: NatsSettings, log: LogSettings) -> Settings:
    return Settings(
        nats=nats,
        log=log,
        kubeconfig=str(kube.kubeconfig),
        metrics_addr=f"127.0.0.1:{free_port()}",
        watch_timeout=30.0,
        backoff_initial=0.05,
        backoff_max=0.5,
        publish_timeout=2.0,
        drain_timeout=5.0,
    )


class InProcessBroadcaster:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[int] | None = None

    async def start(self) -> InProcessBroadcaster:
        self.stopping, health = asyncio.Event(), Health()
        health.set("initial-list", False, "not started")
        task = self.task = asyncio.create_task(
            run_broadcaster(self.settings, self.stopping, health=health)
        )
        await eventually(lambda: health.ready()[0] or task.done(), "broadcaster ready")
        assert not task.done(), task.result()
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.stopping.set()
        assert await asyncio.wait_for(self.task, DEADLINE) == 0

    async def crash(self) -> None:
        """Cancel the task: no drain, nothing more published, as close to a crash as in-process gets."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# --- the syncers -------------------------------------------------------------------------------


def syncer_settings(
    node: str, containerd: Containerd, nats: NatsSettings, prefix: str
) -> SyncerSettings:
    return settings_with(
        node_name=node,
        cri_endpoint=containerd.endpoint,
        sync_period=1.0,
        pull_timeout=30.0,
        pull_backoff_min=0.2,
        pull_backoff_max=1.0,
        subject_prefix=prefix,
        metrics_addr="",
        ack_wait=5.0,
        status_interval=0.2,
        remove_unused=True,
        remove_grace=0.0,
        nats=nats,
    )


class InProcessSyncer:
    def __init__(self, settings: SyncerSettings, containerd: Containerd) -> None:
        self.settings, self.containerd = settings, containerd
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[int] | None = None

    @property
    def node(self) -> str:
        return self.settings.node_name

    async def start(self) -> InProcessSyncer:
        self.stopping, health = asyncio.Event(), Health()
        health.set("started", False)
        task = self.task = asyncio.create_task(run_syncer(self.settings, self.stopping, health))

        def ready() -> bool:
            checks = {k: ok for k, (ok, _) in health._ready.items() if k != "started"}
            return task.done() or ("replay" in checks and all(checks.values()))

        await eventually(ready, f"syncer {self.node} ready")
        assert not self.task.done(), self.task.result()
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.stopping.set()
        assert await asyncio.wait_for(self.task, DEADLINE) == 0


@dataclass
class SyncerProcess:
    """A real ``python -m image_syncer syncer``, configured through its env twins."""

    node: str
    containerd: Containerd
    nats_url: str
    prefix: str
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = field(default_factory=free_port)
    # More env twins, or other values for the ones above.
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> SyncerProcess:
        env = {
            **os.environ,
            "NODE_NAME": self.node,
            "CONN_TARGET": self.containerd.endpoint,
            "NATS_URL": self.nats_url,
            "SUBJECT_PREFIX": self.prefix,
            "SYNC_PERIOD": "1s",
            "PULL_BACKOFF_MIN": "200ms",
            "PULL_BACKOFF_MAX": "1s",
            "ACK_WAIT": "5s",
            "STATUS_INTERVAL": "200ms",
            "REMOVE_UNUSED": "true",
            "REMOVE_GRACE": "0s",
            "METRICS_ADDR": f"127.0.0.1:{self.port}",
            **self.extra_env,
        }
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "image_syncer", "syncer"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        stop_process(self.process, kill=True)

    def stop(self) -> int:
        stop_process(self.process)
        assert self.process is not None
        return self.process.returncode

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


# --- what the cluster wants, and waiting for it ---------------------------------------------


class Images:
    """Images pushed by one test (unique repositories), to give Fleets and to look for on nodes."""

    def __init__(self, push: Callable[..., str], count: int, **push_args: Any) -> None:
        self.pool = [push(**push_args) for _ in range(count)]

    def on(self, containerd: Containerd) -> set[str]:
        return self.pool_set & containerd.image_refs()

    @property
    def pool_set(self) -> set[str]:
        return set(self.pool)


def game_fleet(name: str, *images: str) -> dict[str, Any]:
    obj = fleet(name, images[0])
    spec = obj["spec"]["template"]["spec"]["template"]["spec"]
    spec["containers"] = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return obj


def fleet_images(obj: dict[str, Any]) -> list[str]:
    spec = obj["spec"]["template"]["spec"]["template"]["spec"]
    return [c["image"] for c in spec.get("containers") or []]


def cluster_desired(kube: FakeKube) -> dict[str, set[str]]:
    """``namespace/name`` -> normalized images, for every Fleet the API server holds now."""
    return {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": {
            str(normalize(i)) for i in fleet_images(o)
        }
        for o in kube.objects()
    }


class Churn:
    """Creates, updates and deletes Fleets over a pool of images, reproducibly."""

    def __init__(self, kube: FakeKube, images: Images, *, fleets: int = 6, seed: int = 1) -> None:
        self.kube, self.images, self.fleets = kube, images, fleets
        self.random = random.Random(seed)
        self.changes = 0

    def step(self) -> None:
        name = f"game-{self.random.randrange(self.fleets)}"
        image = self.random.choice(self.images.pool)
        current = self.kube.get("fleets", "default", name)
        if current is None:
            self.kube.create("fleets", game_fleet(name, image))
        elif self.random.random() < 0.3:
            self.kube.delete("fleets", "default", name)
        else:
            self.kube.update("fleets", with_image(current, image))
        self.changes += 1

    def steps(self, count: int) -> None:
        for _ in range(count):
            self.step()


async def node_converged(
    js: JetStreamContext,
    prefix: str,
    node: str,
    containerd: Containerd,
    kube: FakeKube,
    images: Images,
) -> bool:
    """True when the node's status and its containerd both say exactly what the cluster wants."""
    desired = cluster_desired(kube)
    wanted = set().union(*desired.values()) if desired else set()
    kv = await open_status_bucket(js, StatusSettings(prefix=prefix))
    status = await get_status(kv, node) if kv is not None else None
    if status is None:
        return False
    summary = status.summary
    on_node = await asyncio.to_thread(images.on, containerd)
    return set(summary.fleets) == set(desired) and not summary.gaps and on_node == wanted


async def wait_all_converged(
    js: JetStreamContext,
    prefix: str,
    kube: FakeKube,
    nodes: list[tuple[str, Containerd]],
    images: Images,
    timeout: float = DEADLINE,
) -> None:
    """The log matches the cluster, then every node holds exactly the desired images."""
    await wait_converged(js, prefix, kube.objects(), timeout=timeout)
    for node, containerd in nodes:

        async def converged(node: str = node, containerd: Containerd = containerd) -> bool:
            return await node_converged(js, prefix, node, containerd, kube, images)

        try:
            await eventually(converged, f"node {node} to hold exactly the desired images", timeout)
        except AssertionError as e:
            kv = await open_status_bucket(js, StatusSettings(prefix=prefix))
            status = await get_status(kv, node) if kv is not None else None
            raise AssertionError(
                f"{e}\ncluster wants {cluster_desired(kube)}\n"
                f"node reports {status.state if status else None}\n"
                f"containerd holds {images.on(containerd)}"
            ) from None


def node_name() -> str:
    return f"node-{uuid.uuid4().hex[:6]}"
