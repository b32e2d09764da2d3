"""A registry that accepts connections and never answers: a pull that hangs for as long as it
is allowed to.

containerd connects, sends its first request and waits; nothing comes back and nothing is
closed, as with a registry stuck behind a load balancer. ``resolving`` is set once a client sent
``HEAD .../manifests/...``, containerd's first request of a pull (the syncer's own manifest read
for the disk budget is a GET), so a test knows the pull is under way without a sleep. No tests
here.
"""

from __future__ import annotations

import asyncio

__all__ = ["SilentRegistry"]


class SilentRegistry:
    def __init__(self) -> None:
        self.port = 0
        self.resolving = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[object]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def image(self, name: str = "hung/app", tag: str = "v1") -> str:
        return f"{self.address}/{name}:{tag}"

    async def __aenter__(self) -> SilentRegistry:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        try:
            if (await reader.readline()).startswith(b"HEAD "):
                self.resolving.set()
            while await reader.read(65536):
                pass  # read what is sent, answer nothing
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self._handlers.discard(handler)
