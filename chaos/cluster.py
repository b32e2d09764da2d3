"""The whole system under test, each part where a fault can reach it.

Three NATS servers (a JetStream cluster, R3 streams), each in its own namespace; nodes, each a
namespace holding a real containerd and a real ``image-syncer syncer`` process; in the hub (the
soak's own namespace): two registries (one public, one demanding credentials), the fake API
server, and an HA pair of ``image-syncer broadcaster`` processes. Every process can be SIGKILLed
and started again with its state, as a node or a pod restart would.

containerd pulls from the registries over the bridge with plain HTTP, through a registry mirror
entry naming the registry's own address (so the credentials CRI hands it still match the host).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from chaos.netns import HUB_ADDRESS, Host, Network
from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.images import push_image
from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port, stop_process
from image_syncer.sandbox.registry import Registry

__all__ = ["Broadcaster", "Cluster", "HubRegistry", "NodeContainerd", "NsNats", "Syncer"]

NATS_PORT, ROUTE_PORT, MONITOR_PORT, METRICS_PORT = 4222, 6222, 8222, 9100
PRIVATE_USER = ("chaos", "chaos-secret")


class HubRegistry(Registry):
    """A registry on the bridge address, so every node's containerd reaches it."""

    @property
    def address(self) -> str:
        return f"{HUB_ADDRESS}:{self.port}"

    def push(self) -> str:
        repository = f"chaos/img-{uuid.uuid4().hex[:10]}"
        push_image(self.address, repository, "v1", auth=self.credentials)
        return f"{self.address}/{repository}:v1"


@dataclass
class NsNats(NatsServer):
    """A nats-server alone in its namespace, on the standard ports of its address."""

    host: Host | None = None

    @property
    def url(self) -> str:
        assert self.host is not None
        return f"nats://{self.host.address}:{NATS_PORT}"

    @property
    def monitor_url(self) -> str:
        assert self.host is not None
        return f"http://{self.host.address}:{MONITOR_PORT}"

    def _config(self) -> Path:
        self.port, self.monitor_port, self.cluster_port = NATS_PORT, MONITOR_PORT, ROUTE_PORT
        path = super()._config()
        text = path.read_text().replace("127.0.0.1:", "0.0.0.0:")
        path.write_text(text)
        return path

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        assert self.host is not None
        super()._spawn(self.host.command(command), env)


@dataclass
class NodeContainerd(Containerd):
    """containerd in a node's namespace, pulling over HTTP from the hub's registries."""

    host: Host | None = None
    registries: list[str] = field(default_factory=list)

    def _config(self) -> str:
        plugin = 'plugins."io.containerd.grpc.v1.cri".registry.mirrors'
        mirrors = "".join(
            f'\n[{plugin}."{address}"]\n  endpoint = ["http://{address}"]\n'
            for address in self.registries
        )
        return super()._config() + mirrors

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        assert self.host is not None
        super()._spawn(self.host.command(command), env)


@dataclass
class Syncer:
    """``image-syncer syncer`` in a node's namespace, configured through its env twins."""

    node: str
    host: Host
    containerd: NodeContainerd
    nats_urls: str
    prefix: str
    auth_file: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host.address}:{METRICS_PORT}/metrics"

    def start(self) -> Syncer:
        env = {
            **os.environ,
            "NODE_NAME": self.node,
            "CONN_TARGET": self.containerd.endpoint,
            "NATS_URL": self.nats_urls,
            "SUBJECT_PREFIX": self.prefix,
            "SYNC_PERIOD": "2s",
            "PULL_BACKOFF_MIN": "200ms",
            "PULL_BACKOFF_MAX": "2s",
            "ACK_WAIT": "5s",
            "STATUS_INTERVAL": "500ms",
            "STATUS_REPLICAS": "3",
            "REMOVE_UNUSED": "true",
            "REMOVE_GRACE": "0s",
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "METRICS_ADDR": f"0.0.0.0:{METRICS_PORT}",
        }
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                self.host.command([sys.executable, "-m", "image_syncer", "syncer"]),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def stop(self, *, kill: bool = False) -> None:
        stop_process(self.process, kill=kill)
        self.process = None


@dataclass
class Broadcaster:
    """One replica of the HA broadcaster pair, in the hub."""

    identity: str
    kubeconfig: Path
    nats_urls: str
    prefix: str
    log_file: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> Broadcaster:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "NATS_URL": self.nats_urls,
            "SUBJECT_PREFIX": self.prefix,
            "STREAM_REPLICAS": "3",
            "BROADCASTER_HA": "true",
            "BROADCASTER_IDENTITY": self.identity,
            "MAX_BACKOFF": "1s",
            "FLEET_EVENTS": "false",
            "METRICS_ADDR": f"127.0.0.1:{self.port}",
        }
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "image_syncer", "broadcaster"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def stop(self, *, kill: bool = False) -> None:
        stop_process(self.process, kill=kill)
        self.process = None


@dataclass
class Node:
    name: str
    host: Host
    containerd: NodeContainerd
    syncer: Syncer


class Cluster:
    """Builds, starts and stops every process of the soak on a :class:`Network`."""

    def __init__(
        self, network: Network, directory: Path, *, nodes: int, prefix: str, kubeconfig: Path
    ) -> None:
        self.network, self.directory, self.prefix = network, directory, prefix
        self.registry = HubRegistry(directory / "registry")
        self.private = HubRegistry(directory / "private", htpasswd=PRIVATE_USER)
        nats_hosts = [network.add(f"nats{i}") for i in range(3)]
        self.nats = [
            NsNats(
                directory / f"nats{i}",
                server_name=f"n{i}",
                cluster_name="chaos",
                host=host,
                routes=[
                    f"nats-route://{other.address}:{ROUTE_PORT}"
                    for other in nats_hosts
                    if other is not host
                ],
            )
            for i, host in enumerate(nats_hosts)
        ]
        self.nats_urls = ",".join(server.url for server in self.nats)
        self.auth_file = directory / "pull-secret.json"
        self.nodes: list[Node] = []
        for i in range(nodes):
            name = f"node-{i}"
            host = network.add(name)
            containerd = NodeContainerd(
                directory / name / "containerd",
                host=host,
                registries=[self.registry.address, self.private.address],
            )
            syncer = Syncer(
                name,
                host,
                containerd,
                self.nats_urls,
                prefix,
                self.auth_file,
                directory / name / "syncer.log",
            )
            self.nodes.append(Node(name, host, containerd, syncer))
        self.broadcasters = [
            Broadcaster(
                f"broadcaster-{i}",
                kubeconfig,
                self.nats_urls,
                prefix,
                directory / f"broadcaster-{i}.log",
            )
            for i in range(2)
        ]

    def nats_host(self, server: NsNats) -> Host:
        assert server.host is not None
        return server.host

    def start(self) -> None:
        self.registry.start()
        self.private.start()
        self._write_pull_secret()
        for server in self.nats:
            server.start(wait=False)
        for server in self.nats:
            server.wait_ready(timeout=120)
        for node in self.nodes:
            node.containerd.state_dir.mkdir(parents=True, exist_ok=True)
            node.containerd.start(timeout=120)
        for broadcaster in self.broadcasters:
            broadcaster.start()
        for node in self.nodes:
            node.syncer.start()

    def _write_pull_secret(self) -> None:
        user, password = PRIVATE_USER
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        config = {"auths": {self.private.address: {"auth": token}}}
        self.auth_file.write_text(json.dumps(config))
        self.auth_file.chmod(0o600)

    def crashed(self) -> list[str]:
        """Processes that exited while they should be running (none restarted them)."""
        dead = []
        for server in self.nats:
            if server.process is not None and server.process.poll() is not None:
                dead.append(f"nats {server.server_name} exited {server.process.returncode}")
        for node in self.nodes:
            for what, process in (
                ("containerd", node.containerd.process),
                ("syncer", node.syncer.process),
            ):
                if process is not None and process.poll() is not None:
                    dead.append(f"{what} on {node.name} exited {process.returncode}")
        for broadcaster in self.broadcasters:
            process = broadcaster.process
            if process is not None and process.poll() is not None:
                dead.append(f"{broadcaster.identity} exited {process.returncode}")
        return dead

    def stop(self) -> None:
        """Everything down, syncers first; safe after a partial start."""
        for node in self.nodes:
            node.syncer.stop(kill=True)
        for broadcaster in self.broadcasters:
            broadcaster.stop(kill=True)
        for node in self.nodes:
            node.containerd.stop(kill=True)
        for server in self.nats:
            server.stop(kill=True)
        self.registry.stop(kill=True)
        self.private.stop(kill=True)
