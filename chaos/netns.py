"""Real network partitions on one machine: a namespace per host, all on one bridge.

The soak needs links it can cut and slow, not proxies that pretend: every NATS server and every
node (its syncer and its containerd) runs in a network namespace of its own, joined by a veth to a
bridge in a hub namespace, where the soak itself, the registries, the fake API server and the
broadcasters live. A partition is a pair of iptables DROP rules inside one namespace (packets to
and from the cut-off peers vanish, exactly like a dead switch port: TCP only notices by timing
out), slowness is
``tc netem`` on a namespace's end of its veth.

Addresses come from 198.18.0.0/15 (the benchmarking range) and exist only inside the namespaces
made here; nothing is added to the host's own network. Names carry the soak's pid, so two soaks
(or a crashed one's leftovers) never collide, and :meth:`Network.remove` deletes every namespace,
which takes their veths, bridge, routes and qdiscs with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Host", "Network", "NetworkError", "enter", "kill_inside", "remove_leftovers"]

SUBNET_PREFIX = "198.18.0"
HUB_ADDRESS = f"{SUBNET_PREFIX}.1"
_CLONE_NEWNET = 0x40000000
_NAME_PREFIX = "isc"


class NetworkError(RuntimeError):
    """A namespace, link or route could not be made: not root, or iproute2 missing."""


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise NetworkError(f"{argv} failed: apt-get install -y iproute2 iptables") from None
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def enter(namespace: str) -> None:
    """Move this process (it must have one thread yet) into ``namespace``'s network."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise NetworkError(f"setns {namespace}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of soaks whose process is gone (killed before its cleanup)."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(_NAME_PREFIX) or "-" not in name:
            continue
        pid = name[len(_NAME_PREFIX) : name.index("-")]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            kill_inside(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def kill_inside(namespace: str) -> None:
    """SIGKILL every process still in ``namespace`` but this one (a namespace with processes
    outlives its name, and so would they)."""
    for pid in ip("netns", "pids", namespace, check=False).stdout.split():
        if pid.isdigit() and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@dataclass
class Host:
    """One namespace on the bridge: its name (for ``ip netns exec``) and its address."""

    namespace: str
    address: str
    cut_from: set[str] = field(default_factory=set)
    shaped: bool = False
    _loss: str = "0"

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def cut(self, addresses: set[str]) -> None:
        """Drop every packet to and from ``addresses``, silently, as a dead link does."""
        for address in sorted(addresses - self.cut_from):
            self._iptables("-A", "OUTPUT", "-d", address, "-j", "DROP")
            self._iptables("-A", "INPUT", "-s", address, "-j", "DROP")
        self.cut_from |= addresses

    def heal(self) -> None:
        for address in sorted(self.cut_from):
            self._iptables("-D", "OUTPUT", "-d", address, "-j", "DROP", check=False)
            self._iptables("-D", "INPUT", "-s", address, "-j", "DROP", check=False)
        self.cut_from = set()

    def shape(self, *, rate_kbit: int, loss_percent: float) -> None:
        """A starved, lossy link: what this host sends is rate-limited (queueing delay, ``tc
        tbf``) and randomly dropped (``iptables -m statistic``); this kernel has no ``netem``.
        """
        self.unshape()
        tbf = ["rate", f"{rate_kbit}kbit", "burst", "16kb", "latency", "500ms"]
        _run(self.command(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", *tbf]))
        self._loss = f"{loss_percent / 100:.4f}"
        self._iptables(*self._loss_rule("-A"))
        self.shaped = True

    def unshape(self) -> None:
        if self.shaped:
            _run(self.command(["tc", "qdisc", "del", "dev", "eth0", "root"]), check=False)
            self._iptables(*self._loss_rule("-D"), check=False)
        self.shaped = False

    def _loss_rule(self, verb: str) -> list[str]:
        return [
            verb,
            "OUTPUT",
            "-o",
            "eth0",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            self._loss,
            "-j",
            "DROP",
        ]

    def _iptables(self, *args: str, check: bool = True) -> None:
        _run(self.command(["iptables", "-w", *args]), check=check)


class Network:
    """The hub (bridge) namespace and the hosts on it; ``remove()`` undoes all of it."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"{_NAME_PREFIX}{os.getpid()}"
        self.hub = Host(f"{self.tag}-hub", HUB_ADDRESS)
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []

    def create(self) -> Network:
        hub = self.hub.namespace
        self._add_namespace(hub)
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        return self

    def add(self, name: str) -> Host:
        """A new namespace ``<tag>-<name>`` with the next address, linked to the bridge."""
        number = len(self.hosts) + 10
        host = Host(f"{self.tag}-{name}", f"{SUBNET_PREFIX}.{number}")
        self._add_namespace(host.namespace)
        hub, veth = self.hub.namespace, f"v{number}"
        ip(
            "-n",
            hub,
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.namespace,
        )
        ip("-n", hub, "link", "set", veth, "master", "br0", "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        self.hosts[name] = host
        return host

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Delete every namespace made (their links, routes and qdiscs go with them)."""
        for name in reversed(self._made):
            with contextlib.suppress(NetworkError):
                kill_inside(name)
                ip("netns", "del", name)
        self._made = []
