"""Three real nats-servers on loopback, routed to each other, JetStream on each: the cluster the
fault tests take apart (a server killed, a replica made to answer from behind)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from image_syncer.sandbox.nats_server import NatsServer
from image_syncer.sandbox.processes import free_port

__all__ = ["NatsCluster"]


class NatsCluster:
    """``n0``, ``n1``, ``n2``; ``cluster_config`` goes into each one's cluster block (e.g.
    ``no_advertise: true``, so clients stay on the server they were given) and ``extra_config(i)``
    into server ``i``'s configuration (e.g. its ``server_tags``)."""

    def __init__(
        self,
        directory: Path,
        *,
        cluster_config: str = "",
        extra_config: Callable[[int], str] = lambda i: "",
    ) -> None:
        ports = [free_port() for _ in range(3)]
        routes = [f"nats-route://127.0.0.1:{p}" for p in ports]
        self.servers = [
            NatsServer(
                directory / f"n{i}",
                cluster_port=ports[i],
                routes=[r for j, r in enumerate(routes) if j != i],
                server_name=f"n{i}",
                cluster_config=cluster_config,
                extra_config=extra_config(i),
            )
            for i in range(3)
        ]

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.servers)

    def by_name(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.server_name == name)

    def start(self) -> None:
        """All three at once (each waits for the others' routes), then until each is ready."""
        for server in self.servers:
            server.start(wait=False)
        for server in self.servers:
            server.wait_ready(timeout=60)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(kill=True)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
