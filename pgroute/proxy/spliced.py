"""Spliced sessions: client/backend socket pairs whose bytes the kernel forwards.

Owns, for every session handed to the kernel (``sockmap.Splicer``): both file
descriptors, the watch for their end (one ``epoll`` of its own, registered for
``EPOLLRDHUP | EPOLLHUP | EPOLLERR`` only, never ``EPOLLIN``: pgroute must not read
bytes the kernel is forwarding), the close, and the byte accounting.

Invariants:

- A ``SplicedSession`` is the Router's session (``epoch``, ``backend_name``,
  ``close(reason)``); ``close`` closes both sockets at once, which discards anything
  the kernel still held for them (fencing).
- When one side sends its FIN, the other side is closed only once the kernel has
  written to it everything the ending side sent (a client's last ``Terminate``, a
  server's last ``ErrorResponse``): bytes received on the ending socket (less one
  for the FIN) equal bytes written to its peer (``tcpi_bytes_acked`` +
  ``SIOCOUTQ``). A peer that does not read is closed anyway after
  ``close_flush_timeout``; a side that was reset ends the session at once.
- Bytes: a session's counts are the bytes each socket received (``tcpi_bytes_received``),
  added to the stats when it ends; ``live_bytes`` reads the open sessions' counts for
  a scrape.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import select
import socket
import struct
import termios
from collections.abc import Callable

from .router import ProxyStats

log = logging.getLogger(__name__)

_WATCH = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_TCP_INFO_LEN = 136  # through tcpi_bytes_received (offset 128, u64)
_TCPI_STATE = 0
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_TCP_ESTABLISHED, _TCP_CLOSE_WAIT = 1, 8
_SO_MEMINFO = 55  # <asm-generic/socket.h>: u32 sk_meminfo[SK_MEMINFO_VARS]
_SK_MEMINFO_RMEM_ALLOC = 0
_SK_MEMINFO_WMEM_QUEUED = 5
_FLUSH_POLL_FIRST = 0.001
_FLUSH_POLL_MAX = 0.05


def _tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """(state, bytes_acked, data bytes received) of a TCP socket; (0, 0, 0) once it is
    gone. ``tcpi_bytes_received`` counts a received FIN's sequence number: it is taken
    off here, so the third value is what the peer sent."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return 0, 0, 0
    if len(raw) < _TCP_INFO_LEN:
        return raw[0] if raw else 0, 0, 0
    state = raw[_TCPI_STATE]
    received = struct.unpack_from("<Q", raw, _TCPI_BYTES_RECEIVED)[0]
    if state == _TCP_CLOSE_WAIT and received:
        received -= 1
    return state, struct.unpack_from("<Q", raw, _TCPI_BYTES_ACKED)[0], received


def bytes_received(sock: socket.socket) -> int:
    """Data bytes a TCP socket has received from its peer so far (0 once it is gone)."""
    return _tcp_info(sock)[2]


def _outq(sock: socket.socket) -> int:
    """Bytes written to a socket and not yet acknowledged by its peer (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def inq(fd: int) -> int:
    """Bytes received on a socket and not yet read (SIOCINQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class SplicedSession:
    """One client/backend pair in the kernel's hands; the Router's session."""

    __slots__ = ("epoch", "backend_name", "client", "backend", "closing", "closed", "_watcher")

    def __init__(
        self, watcher: SpliceWatcher, client: socket.socket, backend: socket.socket, epoch: int, backend_name: str
    ) -> None:
        self.epoch = epoch
        self.backend_name = backend_name
        self.client = client
        self.backend = backend
        self.closing = False  # one side ended; waiting for the kernel to flush the other
        self.closed = False
        self._watcher = watcher

    def close(self, reason: str) -> None:
        """Drop both sockets now (router fencing)."""
        log.debug("closing spliced session (%s, epoch %d): %s", self.backend_name, self.epoch, reason)
        self._watcher.finish(self)


class SpliceWatcher:
    """Watches the spliced sessions of one ProxyServer for their end."""

    def __init__(
        self, stats: ProxyStats, on_closed: Callable[[SplicedSession], None], close_flush_timeout: float
    ) -> None:
        self._stats = stats
        self._on_closed = on_closed
        self._close_flush_timeout = close_flush_timeout
        self._epoll = select.epoll()
        self._by_fd: dict[int, SplicedSession] = {}
        self.sessions: set[SplicedSession] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._epoll.fileno(), self._ready)

    def add(self, session: SplicedSession) -> None:
        self.sessions.add(session)
        for sock in (session.client, session.backend):
            fd = sock.fileno()
            self._by_fd[fd] = session
            self._epoll.register(fd, _WATCH)

    # -- ends ---------------------------------------------------------------------
    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0):
            session = self._by_fd.get(fd)
            if session is None or session.closing:
                continue
            try:
                ended = session.client if fd == session.client.fileno() else session.backend
                self._begin_close(session, ended)
            except Exception:
                # The events are level-triggered: a session left watched would spin
                # the loop. A bug here costs that one session.
                log.exception("spliced session end failed; closing it")
                self.finish(session)

    def _unwatch(self, session: SplicedSession) -> None:
        for sock in (session.client, session.backend):
            fd = sock.fileno()
            if self._by_fd.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def _begin_close(self, session: SplicedSession, ended: socket.socket) -> None:
        """One side ended: close the session once its last bytes reached the other."""
        session.closing = True
        self._unwatch(session)
        other = session.backend if ended is session.client else session.client
        if not self._finish_if_flushed(session, ended, other):
            assert self._loop is not None
            deadline = self._loop.time() + self._close_flush_timeout
            self._loop.call_later(
                _FLUSH_POLL_FIRST, self._wait_flush, session, ended, other, deadline, _FLUSH_POLL_FIRST
            )

    def _wait_flush(
        self, session: SplicedSession, ended: socket.socket, other: socket.socket, deadline: float, delay: float
    ) -> None:
        if session.closed:  # finished meanwhile (fenced, shut down)
            return
        assert self._loop is not None
        if self._finish_if_flushed(session, ended, other):
            return
        if self._loop.time() >= deadline:
            self.finish(session)
            return
        delay = min(delay * 2, _FLUSH_POLL_MAX)
        self._loop.call_later(delay, self._wait_flush, session, ended, other, deadline, delay)

    def _finish_if_flushed(self, session: SplicedSession, ended: socket.socket, other: socket.socket) -> bool:
        """Finish the session if the kernel has written to ``other`` every byte
        ``ended`` received; the readings taken for that also give the byte counts."""
        ended_info, other_info = _tcp_info(ended), _tcp_info(other)
        if not _flushed(ended_info, other_info, other):
            return False
        client_info, backend_info = (ended_info, other_info) if ended is session.client else (other_info, ended_info)
        self.finish(session, (client_info[2], backend_info[2]))
        return True

    def finish(self, session: SplicedSession, received: tuple[int, int] | None = None) -> None:
        """Account and close both sockets now; idempotent. ``received``: the client's
        and the backend's data bytes received, when the caller just read them."""
        if session.closed:
            return
        session.closing = session.closed = True
        self._unwatch(session)
        if received is None:
            received = (_tcp_info(session.client)[2], _tcp_info(session.backend)[2])
        self._stats.bytes_client_to_server += received[0]
        self._stats.bytes_server_to_client += received[1]
        session.client.close()
        session.backend.close()
        self.sessions.discard(session)
        self._on_closed(session)

    # -- accounting ---------------------------------------------------------------
    def live_bytes(self) -> tuple[int, int]:
        """(client to server, server to client) bytes of the sessions still open."""
        c2s = s2c = 0
        for s in self.sessions:
            c2s += _tcp_info(s.client)[2]
            s2c += _tcp_info(s.backend)[2]
        return c2s, s2c

    def kernel_buffered(self) -> int:
        """Bytes of memory the kernel holds for the open sessions: what their sockets
        received and have not yet forwarded (receive side, including skbs waiting to
        be redirected) plus what is queued to send."""
        total = 0
        for s in self.sessions:
            for sock in (s.client, s.backend):
                try:
                    info = struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 36))
                except OSError:
                    continue
                total += info[_SK_MEMINFO_RMEM_ALLOC] + info[_SK_MEMINFO_WMEM_QUEUED]
        return total

    def close(self) -> None:
        """Finish what is left and stop watching."""
        for session in list(self.sessions):
            self.finish(session)
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._epoll.fileno())
            except (OSError, ValueError, RuntimeError):
                pass
        self._epoll.close()


def _flushed(ended_info: tuple[int, int, int], other_info: tuple[int, int, int], other: socket.socket) -> bool:
    """Has the kernel written to ``other`` every byte the ended side received?"""
    ended_state, _, received = ended_info
    if ended_state != _TCP_CLOSE_WAIT:
        # Reset (or an error) rather than a FIN: the conversation was aborted, its
        # last bytes answer nobody.
        return True
    state, acked, _ = other_info
    if state not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
        return True  # the other side is gone too: nothing more can be delivered
    return acked + _outq(other) >= received
