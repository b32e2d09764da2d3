"""A real Docker registry (Debian's docker-registry, distribution 2.8) on a loopback port.

containerd pulls from ``127.0.0.1:<port>`` over plain HTTP without extra configuration, so tests
and the demo get a genuine pull path: manifests, blobs, 404s, and with ``htpasswd`` a registry that
answers 401 to the wrong credentials, exactly as a private registry would.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from image_syncer.sandbox.processes import ManagedProcess, MissingComponent, free_port

__all__ = ["Registry", "basic_auth_header"]


def _binary(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise MissingComponent(f"{name} not found on PATH: apt-get install -y {package}")
    return found


def basic_auth_header(credentials: tuple[str, str]) -> str:
    user, password = credentials
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Registry(ManagedProcess):
    """One registry; ``restart()`` keeps its port and its blobs, as a real restart would."""

    data_dir: Path
    htpasswd: tuple[str, str] | None = field(default=None, repr=False)
    # A pull-through cache of this upstream URL (Distribution's ``proxy.remoteurl``).
    proxy_remote: str | None = None
    # Log every request (Distribution's access log), e.g. to count what an upstream serves.
    access_log: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    @property
    def address(self) -> str:
        """host:port, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """The (user, password) the registry demands, if any."""
        return self.htpasswd

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "registry.log"

    def _config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            f"    disabled: {'false' if self.access_log else 'true'}",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.data_dir / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.address}",
        ]
        if self.proxy_remote is not None:
            lines += ["proxy:", f"  remoteurl: {self.proxy_remote}"]
        if self.htpasswd is not None:
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: image-syncer-tests",
                f"    path: {self._write_htpasswd(*self.htpasswd)}",
            ]
        path = self.data_dir / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _write_htpasswd(self, user: str, password: str) -> Path:
        # The registry accepts bcrypt entries only, which is what -B makes.
        result = subprocess.run(
            [_binary("htpasswd", "apache2-utils"), "-Bbn", user, password],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"htpasswd failed for user {user!r}: {result.stderr.strip()}")
        path = self.data_dir / "htpasswd"
        path.write_text(result.stdout)
        return path

    def start(self) -> Registry:
        binary = _binary("docker-registry", "docker-registry")
        self._spawn([binary, "serve", str(self._config())])
        self._await_ready(self._answers, timeout=30, what=f"docker-registry on {self.address}")
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as response:
                status: int = response.status
                return status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401 and self.htpasswd is not None
