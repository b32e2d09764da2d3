"""The demo: the whole loop on one machine, with real processes, narrated step by step.

It starts an embedded NATS, a registry and one containerd per simulated node, runs one real
``image-syncer syncer`` process per node, publishes Fleets through the real CLI, and shows images
arriving in each node's runtime: first pulls, an image deleted behind the syncer's back coming
back, a Fleet update, the same update staged first (next-images annotation) and its measured
time next to the unstaged one, a cold node that joins with the startup taint and is untainted
once its images are there, a Fleet delete. Everything it starts is stopped, and its directory
removed, on the way out (Ctrl-C and SIGTERM included). A syncer that exits on its own stops the
demo at once, with its last log lines.

The cold node's Node object lives in the sandbox's fake Kubernetes API server (the one fake in
the demo: no kube-apiserver runs here), which speaks the real protocol to the syncer's own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from image_syncer.fleets import build_fleet
from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.fakekube import FakeKube
from image_syncer.sandbox.images import push_image
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, stop_process
from image_syncer.sandbox.registry import Registry
from wire.contract import AGONES_SDK_SOURCE, NodeImages
from wire.eventlog import (
    LogSettings,
    ensure_node_images_stream,
    publish_event,
    publish_node_images,
)
from wire.natsconn import NatsSettings, connect

__all__ = ["DemoFailed", "run_demo"]

console = Console(highlight=False, soft_wrap=True)

# The syncer lines worth showing a newcomer; the rest stays in each node's log file.
INTERESTING = (
    "fleet synced",
    "image already present",
    "fleet deleted",
    "pull failed",
    "startup taint present, node closed until its images are here",
    "startup taint removed, node open for game servers",
)
STARTUP_TAINT = "image-syncer.octops.io/images-not-ready"


class DemoFailed(RuntimeError):
    """A step did not converge in time; the message says which, and where the logs are."""


# The syncers running now: every wait checks that none of them exited behind the demo's back.
_running: list[Node] = []
# Lines of a syncer's log shown when it exits on its own: its last words say why.
_LAST_LINES = 15


@dataclass
class Node:
    name: str
    containerd: Containerd
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def images(self) -> set[str]:
        return self.containerd.image_refs()


def cli(*args: str, nats_url: str, capture: bool = True) -> str:
    """Run the real ``image-syncer`` CLI, as a user would."""
    # A wide virtual terminal, so tables print unwrapped into the demo's own output.
    env = {**os.environ, "NATS_URL": nats_url, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "image_syncer", *args],
        env=env,
        capture_output=capture,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise DemoFailed(f"image-syncer {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        _check_syncers()
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise DemoFailed(f"timed out after {timeout:.0f}s waiting for: {what}")


def _check_syncers() -> None:
    """A syncer that exited stops the demo at once, with its last log lines: waiting on would
    only end in a timeout, and its log is in a directory the demo removes on the way out."""
    for node in _running:
        process = node.process
        if process is None or process.poll() is None:
            continue
        tail = ""
        if node.log_path is not None and node.log_path.exists():
            lines = node.log_path.read_text(errors="replace").splitlines()[-_LAST_LINES:]
            tail = "\n".join("    " + line for line in lines)
        raise DemoFailed(
            f"the syncer of {node.name} exited with code {process.returncode}; its last log "
            f"lines:\n{tail}"
        )


def start_syncer(
    node: Node, nats_url: str, workdir: Path, sync_period: str, **extra_env: str
) -> None:
    node.log_path = workdir / f"syncer-{node.name}.log"
    env = {
        **extra_env,
        **os.environ,
        "NODE_NAME": node.name,
        "CONN_TARGET": node.containerd.endpoint,
        "NATS_URL": nats_url,
        "SYNC_PERIOD": sync_period,
        "METRICS_ADDR": f"127.0.0.1:{node.metrics_port}",
        "LOG_FORMAT": "logfmt",
        # The demo moves faster than the default 5s status throttle.
        "STATUS_INTERVAL": "1s",
    }
    log = node.log_path.open("ab")
    node.process = subprocess.Popen(
        [sys.executable, "-m", "image_syncer", "syncer"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _running.append(node)
    threading.Thread(target=_echo, args=(node,), daemon=True).start()


def _echo(node: Node) -> None:
    """Show the interesting lines of a node's syncer log as they are written."""
    assert node.log_path is not None
    with node.log_path.open(errors="replace") as log:
        while node.process is not None:
            line = log.readline()
            if not line:
                time.sleep(0.1)
                continue
            if any(f'msg="{m}"' in line for m in INTERESTING):
                console.print(f"  [dim]{node.name}[/dim] {_short(line.strip())}")


def _short(line: str) -> str:
    # Drop the timestamp and logger: the demo reader wants the event and its fields.
    parts = [p for p in line.split(" ") if not p.startswith(("ts=", "logger="))]
    return " ".join(parts)


@contextlib.contextmanager
def sandbox(keep: bool) -> Iterator[Path]:
    workdir = Path(tempfile.mkdtemp(prefix="image-syncer-demo-"))
    try:
        yield workdir
    finally:
        if keep:
            console.print(f"[dim]kept {workdir}[/dim]")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def step(text: str) -> None:
    console.print(f"\n[bold cyan]==>[/bold cyan] [bold]{text}[/bold]")


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C: every process the demo started is stopped, its files removed.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(*, nodes: int = 2, sync_period: str = "2s", keep: bool = False) -> None:
    with _sigterm_unwinds(), sandbox(keep) as workdir, contextlib.ExitStack() as stack:
        step("Starting an embedded NATS JetStream server, a registry and one containerd per node")
        nats = stack.enter_context(NatsServer(workdir / "nats"))
        registry = Registry(workdir / "registry")
        registry.start()
        stack.callback(registry.stop)
        node_list = [_start_node(i, workdir, stack) for i in range(nodes)]
        names = ", ".join(n.name for n in node_list)
        console.print(f"  NATS {nats.url}, registry {registry.address}, nodes: {names}")

        step("Pushing game-server images into the local registry")
        images = _push_images(registry.address)
        for name, ref in images.items():
            console.print(f"  {name:<16} {ref}")

        step("Creating the compacted event log: image-syncer stream init")
        console.print(_indent(cli("stream", "init", nats_url=nats.url)))

        step("Starting one syncer per node (image-syncer syncer, its own durable consumer each)")
        for node in node_list:
            start_syncer(node, nats.url, workdir, sync_period)
            stack.callback(_stop_syncer, node)

        _first_pulls(nats.url, images, node_list)
        _deleted_behind_our_back(images["lobby"], node_list[-1], sync_period)
        unstaged = _rollout(nats.url, images, node_list)
        _staged_rollout(nats.url, images, node_list, unstaged)
        node_list.append(_cold_node(nats.url, images, workdir, stack, len(node_list), sync_period))

        step("Deleting a Fleet: image-syncer publish deleted --name lobby")
        publish(nats.url, "deleted", "games/lobby", [images["lobby"]])

        step("The event log (image-syncer events): compacted, one entry per Fleet")
        console.print(_indent(cli("events", nats_url=nats.url)))
        _show_status(nats.url)

        step("Stopping the syncers with SIGTERM")
        for node in node_list:
            console.print(f"  {node.name}: exited {_stop_syncer(node)}")
        console.print(
            "\n[bold green]Demo complete.[/bold green] Everything it started is stopped "
            "and its files removed."
        )


def _start_node(index: int, workdir: Path, stack: contextlib.ExitStack) -> Node:
    containerd = Containerd(workdir / f"node-{index}")
    containerd.start()
    stack.callback(containerd.stop)
    return Node(f"node-{chr(ord('a') + index)}", containerd)


def publish(
    nats_url: str,
    action: str,
    fleet: str,
    images: list[str],
    init: str = "",
    staged: list[str] | None = None,
) -> None:
    namespace, name = fleet.split("/")
    args = ["publish", action, "--name", name, "--namespace", namespace]
    args += [arg for image in images for arg in ("--image", image)]
    args += ["--init-image", init] if init else []
    args += [arg for image in staged or () for arg in ("--next-image", image)]
    cli(*args, nats_url=nats_url)


def _first_pulls(nats_url: str, images: dict[str, str], nodes: list[Node]) -> None:
    step("Publishing Fleets through the CLI: image-syncer publish added ...")
    published = time.monotonic()
    arena = [images["arena-server"], images["arena-sidecar"]]
    publish(nats_url, "added", "default/arena", arena, init=images["arena-init"])
    publish(nats_url, "added", "games/lobby", [images["lobby"]])
    wanted = {*arena, images["arena-init"], images["lobby"]}
    for node in nodes:
        wait_for(f"{node.name} holds the images", functools.partial(_holds, node, wanted))
        took = time.monotonic() - published
        console.print(
            f"  [green]{node.name}: all {len(wanted)} images present[/green] "
            f"({took:.1f}s after the first publish, CLI start-up included)"
        )


def _holds(node: Node, images: set[str]) -> bool:
    return images <= node.images()


def _deleted_behind_our_back(image: str, node: Node, sync_period: str) -> None:
    step(f"Deleting {image} on {node.name} behind the syncer's back (ctr images rm)")
    node.containerd.remove_image(image)
    took = wait_for("the deleted image to come back", lambda: image in node.images())
    console.print(
        f"  [green]{node.name}: back after {took:.1f}s[/green] "
        f"(the periodic reconcile, every {sync_period})"
    )


def _rollout(nats_url: str, images: dict[str, str], nodes: list[Node]) -> float:
    """The Fleet moves to a new image at once: every node pulls it while game servers would wait.

    Returns the seconds from the Fleet change until every node held all of its images.
    """
    step("Rolling out a new game-server version unstaged: the Fleet's image changes")
    new = images["arena-server-v2"]
    arena = [new, images["arena-sidecar"]]
    changed = _publish_timed(nats_url, arena, images["arena-init"])
    for node in nodes:
        wait_for(f"{node.name} pulls the new version", functools.partial(_holds, node, {new}))
        took = time.monotonic() - changed
        console.print(
            f"  [green]{node.name}: {new} present[/green] ({took:.1f}s after the Fleet changed)"
        )
    return time.monotonic() - changed


def _staged_rollout(
    nats_url: str, images: dict[str, str], nodes: list[Node], unstaged: float
) -> None:
    """The same kind of rollout staged first, as ``image-syncer rollout`` does it on a cluster."""
    new = images["arena-server-v3"]
    arena = [images["arena-server-v2"], images["arena-sidecar"]]
    step(
        "Staging the next version first: image-syncer publish updated ... --next-image "
        "(the annotation image-syncer.octops.io/next-images, as image-syncer rollout sets it)"
    )
    staged_at = time.monotonic()
    publish(nats_url, "updated", "default/arena", arena, init=images["arena-init"], staged=[new])
    for node in nodes:
        wait_for(f"{node.name} stages the next version", functools.partial(_holds, node, {new}))
        took = time.monotonic() - staged_at
        console.print(
            f"  [green]{node.name}: {new} staged[/green] ({took:.1f}s after publishing, CLI "
            f"start-up included); the Fleet still runs {images['arena-server-v2']}"
        )
    console.print(
        _indent(
            cli("wait", "--fleet", "default/arena", "--next", "--timeout", "30s", nats_url=nats_url)
        )
    )

    step("The Fleet's image changes to the staged version (and the annotation goes)")
    wanted = {new, images["arena-sidecar"], images["arena-init"]}
    changed = _publish_timed(nats_url, [new, images["arena-sidecar"]], images["arena-init"])
    for node in nodes:
        wait_for(f"{node.name} holds the new version", functools.partial(_holds, node, wanted))
    took = time.monotonic() - changed
    console.print(
        _indent(cli("wait", "--fleet", "default/arena", "--timeout", "30s", nats_url=nats_url))
    )
    console.print(
        f"  [bold]From the Fleet change to all images present on every node:[/bold] "
        f"staged {took:.1f}s, unstaged {unstaged:.1f}s (the pull of a 32 MiB build from a "
        "local registry, on every node, while new game servers wait for it)"
    )


def _publish_timed(nats_url: str, arena: list[str], init: str) -> float:
    """Publish the Fleet change in-process; return the moment JetStream acked it.

    Not through the CLI like the other steps: its start-up and exit would blur the moment the
    Fleet changed, by more than a small image takes to pull.
    """
    fleet = build_fleet("arena", arena, init_images=[init])
    return asyncio.run(_publish_acked(nats_url, fleet))


async def _publish_acked(nats_url: str, fleet: dict[str, Any]) -> float:
    nc = await connect(NatsSettings(servers=(nats_url,)), name="demo")
    try:
        await publish_event(nc.jetstream(), LogSettings(), "fleet.events.updated", fleet)
        return time.monotonic()
    finally:
        await nc.close()


def _show_status(nats_url: str) -> None:
    step("What a CD pipeline runs before scaling: image-syncer wait --fleet default/arena")
    try:
        console.print(
            _indent(cli("wait", "--fleet", "default/arena", "--timeout", "30s", nats_url=nats_url))
        )
        step("Per-node status (image-syncer status)")
        console.print(_indent(cli("status", nats_url=nats_url)))
    except DemoFailed as e:
        console.print(f"  [yellow]{e}[/yellow]")


def _cold_node(
    nats_url: str,
    images: dict[str, str],
    workdir: Path,
    stack: contextlib.ExitStack,
    index: int,
    sync_period: str,
) -> Node:
    step("The Agones SDK sidecar image goes on the bus (the broadcaster reads it from Agones)")
    sdk = images["agones-sdk"]
    asyncio.run(_publish_sidecar(nats_url, sdk))
    console.print(f"  agones.nodeimages.agones-sdk: {sdk}")

    step(f"A cold node joins, registered with the startup taint {STARTUP_TAINT}:NoSchedule")
    kube = stack.enter_context(FakeKube(workdir / "kube"))
    node = _start_node(index, workdir, stack)
    kube.create(
        "nodes",
        {
            "metadata": {"name": node.name, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"taints": [{"key": STARTUP_TAINT, "effect": "NoSchedule"}]},
        },
    )
    console.print(f"  fake API server {kube.url} (the demo's one fake): {_taints(kube, node.name)}")
    wanted = {
        images["arena-server-v3"],
        images["arena-sidecar"],
        images["arena-init"],
        images["lobby"],
        sdk,
        images["log-shipper"],
    }
    start_syncer(
        node,
        nats_url,
        workdir,
        sync_period,
        STARTUP_TAINT=STARTUP_TAINT,
        KUBE_API_URL=kube.url,
        NODE_REFRESH="2s",
        EXTRA_IMAGES=images["log-shipper"],
    )
    stack.callback(_stop_syncer, node)
    # Timed from the syncer's start: process start-up, NATS, replay, pulls and the Node patch.
    took = wait_for(
        f"{node.name} to be untainted", lambda: STARTUP_TAINT not in _taints(kube, node.name)
    )
    complete = wanted <= node.images()
    console.print(
        f"  [green]{node.name}: untainted {took:.1f}s after its syncer started[/green] "
        f"(syncer start-up included), with {'all' if complete else 'NOT all'} {len(wanted)} "
        "images present (Fleets, SDK sidecar, --extra-image)"
    )
    if not complete:
        raise DemoFailed(f"{node.name} was untainted with images missing")
    console.print(f"  node taints now: {_taints(kube, node.name)}")
    return node


def _taints(kube: FakeKube, name: str) -> str:
    node = kube.get("nodes", "", name) or {}
    taints = (node.get("spec") or {}).get("taints") or []
    return ", ".join(f"{t['key']}:{t['effect']}" for t in taints) or "no taints"


async def _publish_sidecar(nats_url: str, image: str) -> None:
    nc = await connect(NatsSettings(servers=(nats_url,)), name="demo")
    try:
        js = nc.jetstream()
        await ensure_node_images_stream(js, LogSettings())
        origin = "agones-system/agones-controller"
        await publish_node_images(js, LogSettings(), NodeImages(AGONES_SDK_SOURCE, [image], origin))
    finally:
        await nc.close()


def _stop_syncer(node: Node) -> int | None:
    if node in _running:
        _running.remove(node)
    process, node.process = node.process, None
    if process is None:
        return None
    stop_process(process)
    return process.returncode


# Later versions of the game server: one repository, new tags.
_VERSIONS = {
    "arena-server-v2": ("demo/arena-server", "1.1"),
    "arena-server-v3": ("demo/arena-server", "1.2"),
}


def _push_images(address: str) -> dict[str, str]:
    sizes = {
        "arena-server": 4 << 20,
        "arena-sidecar": 1 << 20,
        "arena-init": 256 << 10,
        "lobby": 2 << 20,
        # Game builds are the big ones (several GB in production): big enough here that the
        # rollout's pull shows in the measured times.
        "arena-server-v2": 32 << 20,
        "arena-server-v3": 32 << 20,
        "agones-sdk": 1 << 20,
        "log-shipper": 512 << 10,
    }
    refs = {}
    for name, size in sizes.items():
        repository, tag = _VERSIONS.get(name, (f"demo/{name}", "1.0"))
        push_image(address, repository, tag, layer_bytes=size)
        refs[name] = f"{address}/{repository}:{tag}"
    return refs


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())
