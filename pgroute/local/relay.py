"""A TCP relay that tests put between two processes to partition them.

Owns `Relay`: listens on a loopback port and forwards each connection to a target.
`freeze()` stops forwarding in both directions while holding every socket open, as
a network that drops packets does (nothing is refused or reset: the peers see
silence and time out); `thaw()` delivers what was held and forwards again. New
connections made while frozen are accepted by the kernel but not forwarded. `cut()`
closes every connection (a reset); the relay keeps listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


class Relay:
    """``async with Relay(host, port) as relay:`` then connect to ``relay.port``.
    ``target`` may be set after the start (a relay in front of a port not known yet:
    connections wait until it is)."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 0, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def frozen(self) -> bool:
        return not self._open.is_set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._open.set()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()
            up_reader, upstream = await asyncio.open_connection(*self.target)
            self._writers.add(upstream)
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                await self._open.wait()  # frozen: hold the bytes, as a dropping network would
                writer.write(data)
                await writer.drain()
        # One side finished: end the other (a half-close would keep HTTP keep-alives hanging).
        writer.transport.abort()
