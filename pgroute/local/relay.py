"""An asyncio TCP relay for partition tests: a listener on loopback that forwards each
connection to one target, and that the test can freeze, thaw or cut. ``target`` may
be set after the start (a relay in front of a port not known yet: connections wait
for it only in the sense that none is made before then).

- ``freeze()``: nothing moves in either direction any more, and nothing is closed:
  bytes, EOFs and new connections are held as a network dropping every packet would
  hold them (TCP retransmits; no RST, no FIN reaches either side). A client notices
  only by its own timeouts.
- ``thaw()``: what was held is delivered, in order, and forwarding resumes (the
  retransmissions of a healed network); held new connections reach the target.
- ``cut()``: every current connection is closed on both sides (a reset network
  path); new connections are still accepted and forwarded (or held while frozen).

Owns its listener and every socket pair it relays; ``close()`` ends them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

CHUNK = 65536


class Relay:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 0, name: str = "") -> None:
        self.target = (target_host, target_port)
        self.name = name or f"{target_host}:{target_port}"
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    address = endpoint

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every relayed connection, both sides, now."""
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        self._flowing.set()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        target_w: asyncio.StreamWriter | None = None
        try:
            # A SYN dropped while frozen: the target is not reached until the thaw.
            await self._flowing.wait()
            target_r, target_w = await asyncio.open_connection(*self.target)
            self._writers.add(target_w)
            if client_w.transport.is_closing():  # cut meanwhile
                return
            await asyncio.gather(self._pump(client_r, target_w), self._pump(target_r, client_w))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (client_w, target_w):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """One direction. A chunk (or the EOF) read while frozen waits for the thaw:
        the kernel's buffers hold the rest, as a stalled path would. An error ends
        both directions (the caller aborts both sockets), as a reset would."""
        try:
            while True:
                data = await src.read(CHUNK)
                await self._flowing.wait()
                if not data:
                    if not dst.transport.is_closing() and dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()
        except RuntimeError as exc:  # writing to a transport closed under us
            raise OSError(f"relay: {exc}") from None
