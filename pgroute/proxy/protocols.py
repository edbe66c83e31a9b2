"""The byte pipe: one asyncio Protocol per leg of a proxied connection.

With kernel splicing (``sockmap.py``, ``spliced.py``) a session uses this pipe only
for its handshake: ``take_socket`` hands the client's socket over once the backend is
connected. Sessions that cannot be spliced (``splice`` off, a kernel that refuses, a
pipelining client, CancelRequests) are piped here for their whole life.

``ClientProtocol`` owns the client's socket. Until it is paired with a backend it
collects the first packet for the server's handshake (``read_packet``); once
``attach`` pairs it with a ``BackendProtocol`` both legs only copy bytes: each chunk
is written to the other transport (through its ``write`` bound once at pairing) and
added to a counter, nothing else (no parsing, no logging, no allocation beyond what
the event loop does).

Why this shape (measured with ``bench/proxy.py`` and per-process CPU accounting, see
``bench/README.md``): the proxy's CPU per forwarded message is ~85% kernel (the
write that wakes the peer, context switches) and only ~1.5% in these methods, so the
data path stays a plain ``data_received`` -> ``write``. ``asyncio.BufferedProtocol``
with a reused buffer cost more (two Python calls per read instead of one: +1 us of
user CPU per transaction) and saved nothing measurable on a 100 MB COPY; deferring
writes to coalesce them would add latency and there is nothing to coalesce in
request/response traffic (one chunk per socket per loop iteration); explicit socket
buffer sizes only disable the kernel's autotuning.

Invariants:

- Flow control crosses legs: when a leg's transport calls ``pause_writing`` (its
  write buffer went over ``WRITE_BUFFER_HIGH``), reading on the *other* leg's
  transport is paused; ``resume_writing`` resumes it. A per-leg flag makes pause and
  resume strictly alternate, so a slow reader bounds what pgroute buffers to about
  the high-water mark plus one read chunk per direction.
- When either leg closes or sends EOF, the other transport is closed after its
  buffered bytes are flushed; a peer that never reads is aborted after
  ``CLOSE_FLUSH_TIMEOUT`` so a dead connection cannot pin memory.
- ``ClientProtocol`` is also the router's session: it carries ``epoch`` and
  ``backend_name`` and ``close(reason)`` aborts both legs at once (fencing: nothing
  more reaches a backend of an old epoch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from . import direct_tls, startup
from .router import ProxyStats
from .spliced import inq

if TYPE_CHECKING:
    from .startup import FirstPacket

log = logging.getLogger(__name__)

# Write buffer limits per transport. 256 KiB keeps a few TCP windows in flight on a
# fast path; 64 KiB low water resumes before the buffer runs dry.
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
# Bytes a client may send after its first packet while its backend is being chosen
# (pipelining drivers); beyond this its reading is paused until the pipe is ready.
HANDSHAKE_PENDING_LIMIT = 64 * 1024
# How long a closing transport may take to flush to a peer that does not read.
CLOSE_FLUSH_TIMEOUT = 10.0


class ClientGone(ConnectionError):
    """The client closed (or sent EOF) before its handshake finished."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("timeout expired waiting for the startup packet"))


def tune_listening_socket(sock: socket.socket) -> None:
    """SO_KEEPALIVE (notice clients that vanished without a FIN) on a listening
    socket. Linux copies it to every accepted socket, so the client leg needs no
    per-connection system call for it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:  # e.g. a Unix socket
        pass


def tune_transport(transport: asyncio.Transport) -> None:
    """SO_KEEPALIVE (notice a backend that vanished without a FIN) and explicit write
    buffer limits on a backend leg.

    TCP_NODELAY (the protocol is request/response: never wait to coalesce) is
    already set on every TCP transport by both event loops pgroute runs on (uvloop,
    and asyncio since Python 3.7); setting it again cost a system call and two
    throwaway socket objects per leg (tests/integration/test_proxy.py checks both
    options on both legs)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:  # e.g. a Unix socket in tests, or the socket is already gone
            pass
    transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)


class _Leg(asyncio.Protocol):
    """What both legs share: the transport, the peer leg, cross-leg flow control and
    close propagation."""

    __slots__ = ("transport", "peer", "closed", "_stats", "_peer_reading_paused", "_peer_write")

    def __init__(self, stats: ProxyStats) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg | None = None
        self.closed = False
        self._stats = stats
        # True while this leg has paused reading on its peer's transport.
        self._peer_reading_paused = False
        # The peer transport's bound write, looked up once when the legs are paired
        # instead of three attribute lookups per chunk.
        self._peer_write: Callable[[bytes], None] | None = None

    # -- flow control ------------------------------------------------------------
    def pause_writing(self) -> None:
        # Our transport cannot take more: stop reading the side that feeds it.
        if self._peer_reading_paused:
            return
        self._peer_reading_paused = True
        peer = self.peer
        if peer is not None:
            peer._pause_reading()

    def resume_writing(self) -> None:
        if not self._peer_reading_paused:
            return
        self._peer_reading_paused = False
        peer = self.peer
        if peer is not None:
            peer._resume_reading()

    def _pause_reading(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def _resume_reading(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    # -- closing -----------------------------------------------------------------
    def eof_received(self) -> bool:
        # PostgreSQL never half-closes: EOF means the conversation is over. Returning
        # False lets the transport close itself; connection_lost closes the peer.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None:
            peer.close_after_flush()

    def close_after_flush(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.close()
        if t.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def buffered(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None and not self.closed else 0


class BackendProtocol(_Leg):
    """The backend leg: created already paired with its client."""

    __slots__ = ()

    def __init__(self, client: ClientProtocol, stats: ProxyStats) -> None:
        super().__init__(stats)
        self.peer = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream protocol is always given a full Transport; asyncio's hook signature
        # says BaseTransport because datagram and pipe protocols share it.
        self.transport = transport = cast(asyncio.Transport, transport)
        tune_transport(transport)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            self._peer_write = peer.transport.write
        if peer is not None and peer.closed:
            # The client left while we were connecting.
            transport.close()

    def data_received(self, data: bytes) -> None:
        self._stats.bytes_server_to_client += len(data)
        # Hot path, no None check: connection_made bound the peer's write (the client
        # is paired before this leg connects).
        self._peer_write(data)  # type: ignore[misc]


class ClientProtocol(_Leg):
    """The client leg, the handshake buffer before pairing, and the router session.

    ``on_made(client)`` and ``on_lost(client)`` are the server's hooks (start the
    handshake; release the session's accounting)."""

    __slots__ = (
        "epoch",
        "backend_name",
        "admitted",
        "refusing",
        "deadline",
        "handshake",
        "_on_made",
        "_on_lost",
        "_buf",
        "_waiter",
        "_eof",
        "_self_paused",
        "_piping",
    )

    def __init__(
        self, stats: ProxyStats, on_made: Callable[[ClientProtocol], None], on_lost: Callable[[ClientProtocol], None]
    ) -> None:
        super().__init__(stats)
        self.epoch = -1
        self.backend_name = ""
        self.admitted = False  # holds one of the max_client_connections slots
        self.refusing = False  # over the limit: in the server's refusal pool
        self.deadline = 0.0  # loop time by which the client must have sent its startup packet
        self.handshake: asyncio.Task[None] | None = None
        self._on_made = on_made
        self._on_lost = on_lost
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._self_paused = False  # reading paused by HANDSHAKE_PENDING_LIMIT
        self._piping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # see BackendProtocol
        # SO_KEEPALIVE comes from the listening socket (tune_listening_socket),
        # TCP_NODELAY from the event loop.
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._piping:
            self._stats.bytes_client_to_server += len(data)
            self._peer_write(data)  # type: ignore[misc]  # hot path: attach() bound it
            return
        self._buf += data
        if len(self._buf) > HANDSHAKE_PENDING_LIMIT and not self._self_paused:
            self._self_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]  # set by connection_made
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        super().connection_lost(exc)
        if not self._piping and self.handshake is not None:
            # Nobody is left to answer: stop waiting on the router or the backend.
            self.handshake.cancel()
        self._on_lost(self)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- handshake ------------------------------------------------------------------
    async def read_packet(self, timeout: float | None = None) -> FirstPacket:
        """The next complete startup-phase packet. Raises ``startup.StartupError`` for
        a malformed one, ``ClientGone`` when the client closes first and
        ``TimeoutError`` when it is not complete within ``timeout`` seconds.

        The timeout is a plain timer on each wait rather than ``asyncio.timeout``:
        that context manager's Python-level bookkeeping was about a tenth of the
        proxy's user CPU per connection (py-spy, ``pgbench -C``)."""
        deadline = None
        while True:
            packet = startup.take_packet(self._buf)
            if packet is not None:
                return packet
            if self._eof or self.closed:
                raise ClientGone("client closed during startup")
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = None
            if timeout is not None:
                if deadline is None:
                    deadline = loop.time() + timeout
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._waiter = None
                    raise TimeoutError("timeout expired waiting for the startup packet")
                timer = loop.call_later(remaining, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()

    @property
    def started_tls(self) -> bool:
        """The client opened with a TLS record (direct TLS) that is still incomplete."""
        return not self._piping and direct_tls.starts_tls(self._buf)

    def write(self, data: bytes) -> None:
        """Write one of pgroute's own messages (handshake phase only)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def attach(self, backend: BackendProtocol, first: bytes, epoch: int, backend_name: str) -> None:
        """Pair with a connected backend: forward ``first`` plus whatever the client
        sent after it, then switch to piping. Synchronous, so no client byte can slip
        in between."""
        self.peer = backend
        # The server attaches a backend only after its connection_made.
        self._peer_write = write = backend.transport.write  # type: ignore[union-attr]
        self.epoch = epoch
        self.backend_name = backend_name
        pending = first + bytes(self._buf) if self._buf else first
        self._buf = bytearray()
        self._stats.bytes_client_to_server += len(pending)
        self._piping = True
        if self._self_paused:
            # From here on only the backend's write pressure pauses the client. Resume
            # before writing: if that write fills the backend's buffer, its
            # pause_writing pauses us again, and each pause has a single owner.
            self._self_paused = False
            self._resume_reading()
        if self._peer_reading_paused:
            # Our own buffer filled up before pairing: the backend must wait too.
            backend._pause_reading()
        write(pending)

    @property
    def piping(self) -> bool:
        return self._piping

    # -- kernel splicing (spliced.py) --------------------------------------------------
    def take_socket(self) -> socket.socket | None:
        """A duplicate of the client's TCP socket for the kernel to splice, with this
        transport's reading paused; None when the client cannot be spliced safely.

        Not when it sent anything after its first packet (a pipelining driver, or bytes
        still unread in the kernel): those bytes must precede everything the kernel
        will forward, and only the user-space pipe can put them first. Call
        ``release`` once the socket is spliced, ``keep`` if it is not."""
        t = self.transport
        if t is None or self.closed or self._eof or self._buf or t.is_closing():
            return None
        raw = t.get_extra_info("socket")
        if raw is None or raw.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        t.pause_reading()
        fd = raw.fileno()
        try:
            if inq(fd):  # bytes still unread in the kernel: this client pipelined
                t.resume_reading()
                return None
            return socket.socket(raw.family, socket.SOCK_STREAM, 0, os.dup(fd))
        except OSError:
            t.resume_reading()
            return None

    def keep(self) -> None:
        """Splicing did not happen: the transport reads again (the pipe follows)."""
        self._resume_reading()

    def release(self) -> None:
        """The duplicate from ``take_socket`` is spliced: close this transport without
        touching the connection (the duplicate keeps it open) and without the
        session-ending side effects of a close."""
        self._piping = True  # connection_lost must not cancel the handshake
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- session (router) ------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Drop both legs now (router fencing). In the middle of a stream nothing can be
        said to the client without corrupting it; it sees the connection end."""
        log.debug("closing session (%s, epoch %d): %s", self.backend_name, self.epoch, reason)
        if self.peer is not None:
            self.peer.abort()
        self.abort()

    def buffered(self) -> int:
        own = super().buffered()
        return own + self.peer.buffered() if self.peer is not None else own
