"""A real containerd (Debian's 1.6, with its CRI plugin) private to one directory.

Tests, the demo and the benchmarks need a CRI runtime that behaves exactly like a node's; this runs
the real daemon with its root, state and sockets inside a directory of its own, so it never touches
the host's /var/lib/containerd and several can run side by side. ``ctr`` helpers look at and delete
images the way an operator (or a garbage collector) on the node would.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from image_syncer.sandbox.processes import ManagedProcess, MissingComponent

__all__ = ["CRI_NAMESPACE", "Containerd", "short_dir"]

CRI_NAMESPACE = "k8s.io"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
_APT_HINT = "apt-get install -y containerd runc"
# sun_path is 108 bytes; leave room for "/containerd.sock.ttrpc".
_MAX_SOCKET_DIR = 80


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise MissingComponent(f"{name} not found on PATH: {_APT_HINT}")
    return found


def short_dir(directory: Path) -> Path:
    """A directory for unix sockets whose path fits sun_path, derived from ``directory``."""
    if len(str(directory)) <= _MAX_SOCKET_DIR:
        return directory
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ctrd-{digest}"


@dataclass
class Containerd(ManagedProcess):
    """One containerd; ``restart()`` keeps its store and socket, as a node's restart would."""

    state_dir: Path
    snapshotter: str = "overlayfs"
    # containerd's registry ``config_path``: a directory of ``<host>/hosts.toml`` (mirrors).
    registry_config_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    socket_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.socket_dir = short_dir(self.state_dir / "run")

    @property
    def socket(self) -> Path:
        return self.socket_dir / "containerd.sock"

    @property
    def endpoint(self) -> str:
        """The CRI target, in the form CONN_TARGET and --cri-endpoint take."""
        return f"unix://{self.socket}"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "containerd.log"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "config.toml"

    def _config(self) -> str:
        d = self.state_dir
        return f"""\
version = 2
root = "{d / "root"}"
state = "{d / "state"}"

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[debug]
  level = "info"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d / "opt"}"
  [plugins."{CRI_PLUGIN}"]
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    [plugins."{CRI_PLUGIN}".containerd]
      snapshotter = "{self.snapshotter}"
    [plugins."{CRI_PLUGIN}".cni]
      bin_dir = "{d / "cni" / "bin"}"
      conf_dir = "{d / "cni" / "conf"}"
{self._registry_config()}"""

    def _registry_config(self) -> str:
        if self.registry_config_path is None:
            return ""
        return (
            f'    [plugins."{CRI_PLUGIN}".registry]\n'
            f'      config_path = "{self.registry_config_path}"\n'
        )

    def start(self, *, timeout: float = 60) -> Containerd:
        """Start, wait for the CRI plugin; fall back to ``native`` where overlayfs cannot work."""
        self._launch()
        try:
            self._wait_ready(timeout)
        except RuntimeError:
            if self.snapshotter != "overlayfs" or self._plugin_ok(
                "io.containerd.snapshotter.v1", "overlayfs"
            ):
                raise
            # Overlay mounts are refused in some sandboxes (overlay on overlay, no privileges).
            self.stop()
            self.snapshotter = "native"
            self._launch()
            self._wait_ready(timeout)
        return self

    def _launch(self) -> None:
        containerd = _binary("containerd")
        _binary("runc")
        _binary("ctr")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self._config())
        self._spawn([containerd, "--config", str(self.config_file)])

    def _wait_ready(self, timeout: float) -> None:
        self._await_ready(self._cri_settled, timeout=timeout, what=f"containerd at {self.socket}")
        if not self._plugin_ok("io.containerd.grpc.v1", "cri"):
            raise RuntimeError(f"containerd CRI plugin failed: {self._plugins_text()}")

    def _cri_settled(self) -> bool:
        # True once the CRI plugin has a status at all: ok, or an error worth reporting.
        return any(p[:2] == ("io.containerd.grpc.v1", "cri") for p in self._plugins())

    def _plugin_ok(self, kind: str, name: str) -> bool:
        return (kind, name, "ok") in {(p[0], p[1], p[-1]) for p in self._plugins()}

    def _plugins(self) -> list[tuple[str, ...]]:
        lines = self._plugins_text().splitlines()[1:]
        return [tuple(line.split()) for line in lines if line.strip()]

    def _plugins_text(self) -> str:
        if not self.socket.exists():
            return ""
        return self.ctr("plugins", "ls", namespace=None).stdout

    def ctr(
        self, *args: str, namespace: str | None = CRI_NAMESPACE, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <socket> [-n k8s.io] <args>`` and return its output."""
        command = [_binary("ctr"), "--address", str(self.socket)]
        if namespace is not None:
            command += ["-n", namespace]
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[1:] + list(args))} failed: {result.stderr}")
        return result

    def image_refs(self) -> set[str]:
        """Every image name in CRI's namespace (tags, digests, ids), as ``ctr images ls -q``."""
        return {line for line in self.ctr("images", "ls", "-q").stdout.splitlines() if line}

    def image_targets(self) -> dict[str, str]:
        """Each image name in CRI's namespace mapped to the manifest digest it points at."""
        rows = self.ctr("images", "ls").stdout.splitlines()[1:]
        return {row.split()[0]: row.split()[2] for row in rows if row.strip()}

    def remove_image(self, ref: str, *, every_name: bool = True) -> None:
        """Delete an image behind CRI's back, as an operator or a disk cleaner on the node would.

        CRI records one pulled image under several names (tag, repo digest, image id); like
        ``crictl rmi`` this removes them all, so the content is really gone and must be pulled
        again. ``every_name=False`` removes just ``ref``, leaving the image known by its others.
        """
        names = [ref]
        if every_name:
            targets = self.image_targets()
            if ref not in targets:
                raise RuntimeError(f"containerd holds no image named {ref}")
            names = sorted(name for name, target in targets.items() if target == targets[ref])
        self.ctr("images", "rm", "--sync", *names)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.socket_dir != self.state_dir / "run":
            shutil.rmtree(self.socket_dir, ignore_errors=True)
