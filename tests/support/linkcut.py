"""A TCP relay on loopback that a test can cut and restore: one client's partition from a server.

The client under test connects to the relay instead of the server; everyone else talks to the
server directly. :meth:`Link.cut` closes every relayed connection and stops listening, so new ones
are refused: to a NATS client its connection drops and every reconnect attempt fails (refused
rather than accepted-then-closed, which makes nats-py leak the half-made connection).
:meth:`Link.restore` listens again on the same port.
No tests here; test modules import :class:`Link`.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["Link"]

_CHUNK = 64 * 1024


class Link:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self.is_cut = False
        self.port = 0

    @classmethod
    def to(cls, url: str) -> Link:
        """A link to ``nats://host:port``."""
        host, _, port = url.rsplit("/", 1)[-1].rpartition(":")
        return cls(host, int(port))

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> Link:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.is_cut = False
        return self

    async def cut(self) -> None:
        """Drop every relayed connection; refuse new ones until :meth:`restore`."""
        self.is_cut = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._open):
            writer.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ends = [writer]
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            ends.append(up_writer)
            self._open.update(ends)
            pipes = [
                asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            self._pipes.update(pipes)
            # One direction ending ends the connection: a half-open relay would hide the cut.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)
        except OSError:
            pass
        finally:
            for end in ends:
                self._open.discard(end)
                end.close()
                with contextlib.suppress(Exception):
                    await end.wait_closed()
            self._handlers.discard(handler)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(_CHUNK):
                sink.write(data)
                await sink.drain()
