"""A registry behind a pull-through cache, as a cluster with a mirror has it, on loopback.

Seeding (``--mirror``) is about how often the upstream registry serves each blob; the only honest
count is the upstream's own access log. This starts the upstream (Distribution with its access
log on), a second Distribution in proxy mode in front of it (``proxy.remoteurl``), and writes the
containerd ``hosts.toml`` that sends pulls of the upstream's images through the cache: exactly
the install recipe of the docs, for containerd's ``config_path``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from image_syncer.sandbox.containerd import Containerd
from image_syncer.sandbox.registry import Registry

__all__ = ["MirroredRegistry", "hosts_toml"]

# Distribution's access log is Apache's combined format: `"GET <path> HTTP/1.1" <status> ...`.
_BLOB_GET = re.compile(
    r'"GET /v2/(?P<repo>\S+)/blobs/(?P<digest>sha256:[0-9a-f]{64})(?:\?\S*)? HTTP/[0-9.]+" 200 '
)


def hosts_toml(upstream: str, mirror: str) -> str:
    """containerd's ``<config_path>/<upstream host>/hosts.toml``: pull and resolve through
    ``mirror`` first, fall back to ``upstream`` (both are URLs)."""
    return f'server = "{upstream}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'


@dataclass
class MirroredRegistry:
    """The upstream, the pull-through cache, and the ``config_path`` directory for containerd."""

    directory: Path
    upstream: Registry = field(init=False)
    cache: Registry = field(init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.upstream = Registry(self.directory / "upstream", access_log=True)
        self.cache = Registry(
            self.directory / "cache", proxy_remote=self.upstream.url, access_log=True
        )

    @property
    def hosts_dir(self) -> Path:
        """The directory containerd's CRI ``registry.config_path`` names."""
        return self.directory / "certs.d"

    def start(self) -> MirroredRegistry:
        self.upstream.start()
        self.cache.start()
        host = self.hosts_dir / self.upstream.address
        host.mkdir(parents=True, exist_ok=True)
        (host / "hosts.toml").write_text(hosts_toml(self.upstream.url, self.cache.url))
        return self

    def stop(self) -> None:
        self.cache.stop()
        self.upstream.stop()

    def node(self, directory: Path) -> Containerd:
        """A containerd (not started) that pulls the upstream's images through the cache."""
        return Containerd(directory, registry_config_path=self.hosts_dir)

    def upstream_blob_gets(self, repository: str) -> Counter[str]:
        """Blob digest -> how many times the upstream served it (200) for ``repository``."""
        counts: Counter[str] = Counter()
        for match in _BLOB_GET.finditer(self.upstream.log_file.read_text(errors="replace")):
            if match["repo"] == repository:
                counts[match["digest"]] += 1
        return counts

    def __enter__(self) -> MirroredRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
