"""The proxy's listening server: admission, routing and backend connection per client.

Each accepted socket takes one of ``max_client_connections`` slots at once; a
handshake task reads its first packet (within ``startup_timeout``), asks the Router
for the active node (waiting up to ``pause_timeout`` while paused), connects to it
(within ``connect_timeout``; a failed connect holds the session for the failover it
signals, see ``_connect_session``), forwards the first packet and pairs the two legs. With
kernel splicing (``splice`` auto/on, ``sockmap.py``) the pair is the two sockets in
the kernel's sockhash and ``spliced.py`` watches for its end; otherwise (``splice``
off, a kernel that refuses, a client that pipelined past its first packet, a
CancelRequest) the protocols in ``protocols.py`` copy the bytes. Either way this
module then only does the bookkeeping when a session ends.

Invariants:

- Every refusal is an ErrorResponse with the SQLSTATE PostgreSQL would use (53300
  too many clients, 57P03 not accepting connections, 08006 backend unreachable,
  08P01 bad startup packet), preceded by an ``N`` when the client asked for
  SSL/GSS encryption, so the driver reads and shows it; every refusal is counted in
  ``router.stats.rejected`` by reason. A direct TLS client (``direct_tls.py``) cannot
  read an ErrorResponse: its refusals are a plaintext TLS alert, then the close.
- pgroute never terminates TLS: an SSLRequest is forwarded and the client and the
  backend negotiate end to end through the raw pipe; a direct TLS ClientHello is
  routed like a StartupMessage (same admission, pause, routing and epoch) and
  forwarded the same way. pgroute sees neither's user nor database.
- A session is registered with the Router, with the epoch and backend of the route it
  was connected under, from the moment its pipe exists until either leg closes; one
  that finds a newer epoch published when it registers is closed at once (fencing
  may have run while it was connecting).
- A spliced session's first packet is written by pgroute before the client can send
  anything else, so nothing the kernel forwards can overtake it; a client that has
  already sent more is piped instead.
- A misbehaving client (garbage, a huge announced length, silence, a truncated packet,
  an SSLRequest or GSSENCRequest followed by silence) costs one slot and at most two
  sockets for at most ``startup_timeout``; nothing it does reaches other sessions.
  The file descriptors of every slot are reserved at start (``limits.py``).
- A socket accepted beyond the limit joins a small refusal pool, read within the same
  deadline to answer 53300 (or to forward a CancelRequest: those are short-lived and
  most needed when the server is overloaded, and go to the active node without
  waiting on a pause); beyond the pool it is closed unread. Either way it is counted.
- Every refusal goes through ``_reject``: the metric by reason, a rate-limited log line.
- A new session whose backend connect fails is refused only once ``pause_timeout``
  has passed with no node it could reach, or the Router says no node is routable.

At a little over 600 lines: the handshake reads as one sequence, kept in one place.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import socket
import time
from typing import Literal, cast, overload

from . import direct_tls, limits, startup
from .backend_socket import open_socket
from .guards import RateLimitedLog, watch_encryption
from .protocols import CLOSE_FLUSH_TIMEOUT, BackendProtocol, ClientGone, ClientProtocol, tune_listening_socket
from .router import Backend, Route, Router
from .sockmap import TRUSTED_KERNEL, Splicer, SpliceUnavailable, trusted_kernel
from .spliced import SplicedSession, SpliceWatcher, inq
from .startup import FirstPacket, PacketKind, StartupError

log = logging.getLogger(__name__)

# Rejection reasons (labels of router.stats.rejected).
REJECT_MAX_CONNECTIONS = "max_connections"
REJECT_NO_BACKEND = "no_backend"
REJECT_PAUSE_TIMEOUT = "pause_timeout"
REJECT_BACKEND_UNREACHABLE = "backend_unreachable"
REJECT_STARTUP_TIMEOUT = "startup_timeout"
REJECT_INVALID_STARTUP = "invalid_startup"
REJECT_SHUTDOWN = "shutdown"
REJECT_ENCRYPTION_TIMEOUT = "encryption_timeout"

# A new session whose backend connect fails retries the same node this often (doubling
# up to the maximum) while it waits for the control path to publish another route.
_RETRY_FIRST = 0.1
_RETRY_MAX = 1.0

# A connect failure is logged at most this often per backend: when a node dies, every
# new client fails the same way and the control path already hears each one.
_FAILURE_LOG_INTERVAL = 5.0


def _cancel_on_timeout(task: asyncio.Task, expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def _log_session(first: FirstPacket, route: Route) -> None:
    if log.isEnabledFor(logging.DEBUG) and route.backend is not None:
        # Encrypted (an SSL/GSS request, direct TLS): the proxy never sees who.
        who = f"{first.user}@{first.database}" if first.kind is PacketKind.STARTUP else first.kind.value
        log.debug("session %s -> %s (epoch %d)", who, route.backend.name, route.epoch)


class ProxyServer:
    def __init__(
        self,
        router: Router,
        host: str,
        port: int,
        *,
        max_client_connections: int = 1000,
        connect_timeout: float = 5.0,
        pause_timeout: float = 30.0,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 10.0,
        splice: str = "auto",
    ) -> None:
        if splice not in ("auto", "on", "off"):
            raise ValueError(f"splice must be auto, on or off, not {splice!r}")
        self.router = router
        self.host = host
        self._requested_port = port
        self.max_client_connections = max_client_connections
        self.connect_timeout = connect_timeout
        self.pause_timeout = pause_timeout
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self._server: asyncio.Server | None = None
        self._clients: set[ClientProtocol] = set()
        self._admitted = 0  # sockets holding a slot (handshaking, piped or spliced)
        self._refusing = 0  # sockets beyond the limit, in their refusal
        self._refusal_pool = limits.refusal_pool(max_client_connections)
        self._fd_reservation = 0
        self._refusal_log = RateLimitedLog(log, "refused a client connection")
        self._closing = False
        self._failure_logged: dict[str, float] = {}
        self._all_closed: asyncio.Event | None = None
        self.splice_mode = splice
        self._splicer: Splicer | None = None
        self._spliced: SpliceWatcher | None = None

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        stats = self.router.stats
        # Before anything is opened: a limit that cannot be honoured is a failed start.
        self._fd_reservation = limits.reserve(self.max_client_connections)
        try:
            self._start_splicing(loop)
        except BaseException:
            self._release_descriptors()
            raise
        try:
            self._server = await loop.create_server(
                lambda: ClientProtocol(stats, self._client_made, self._client_lost),
                self.host,
                self._requested_port,
                reuse_address=True,
                backlog=max(128, min(self.max_client_connections, 4096)),
                start_serving=False,
            )
        except BaseException:
            self._stop_splicing()  # e.g. the port is taken: release the BPF objects
            self._release_descriptors()
            raise
        # Before the first accept: accepted sockets inherit the listener's options.
        for sock in self._server.sockets:
            tune_listening_socket(sock)
        await self._server.start_serving()
        log.info("proxy listening on %s:%d", self.host, self.port)

    def _start_splicing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the kernel splice (``splice`` auto/on); ``on`` fails without it."""
        if self.splice_mode == "off":
            log.info("kernel splicing off: sessions use the user-space pipe")
            return
        if self.splice_mode == "auto" and not trusted_kernel():
            log.info(
                "kernel splicing not used on Linux %s (auto needs %d.%d or newer; "
                'splice = "on" forces it): sessions use the user-space pipe',
                platform.release(),
                *TRUSTED_KERNEL,
            )
            return
        try:
            splicer = Splicer.create(self.max_client_connections)
            try:
                splicer.self_test()
            except SpliceUnavailable:
                splicer.close()
                raise
            self._splicer = splicer
        except SpliceUnavailable as e:
            if self.splice_mode == "on":
                raise
            log.info("kernel splicing unavailable (%s): sessions use the user-space pipe", e.strerror)
            return
        self._spliced = SpliceWatcher(self.router.stats, self._spliced_closed, CLOSE_FLUSH_TIMEOUT)
        self._spliced.start(loop)
        self.router.stats.live_bytes = self._spliced.live_bytes
        log.info("kernel splicing on: sessions are forwarded by a BPF sockhash")

    @property
    def splicing(self) -> bool:
        """True when new sessions are handed to the kernel."""
        return self._spliced is not None

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was requested)."""
        if self._server is None or not self._server.sockets:
            return self._requested_port
        return self._server.sockets[0].getsockname()[1]

    @property
    def client_count(self) -> int:
        """Open client sockets, including those still in their handshake."""
        return len(self._clients) + self.spliced_count

    @property
    def spliced_count(self) -> int:
        """Open sessions whose bytes the kernel forwards."""
        return len(self._spliced.sessions) if self._spliced is not None else 0

    def buffered_bytes(self) -> int:
        """Bytes waiting in pgroute's write buffers, both legs of every connection, and
        the kernel's memory for the spliced sessions."""
        piped = sum(c.buffered() for c in self._clients)
        return piped + (self._spliced.kernel_buffered() if self._spliced is not None else 0)

    async def close(self) -> None:
        """Stop accepting, let open sessions finish for up to ``shutdown_timeout``, then
        drop the rest."""
        if self._server is None or self._closing:
            return
        self._closing = True
        self._server.close()
        if self.client_count:
            log.info(
                "proxy closing: waiting up to %.1fs for %d connection(s)", self.shutdown_timeout, self.client_count
            )
            assert self._all_closed is not None
            try:
                async with asyncio.timeout(self.shutdown_timeout):  # not wait_for: gh-86296
                    await self._all_closed.wait()
            except TimeoutError:
                log.info("proxy closing: dropping %d connection(s)", self.client_count)
                for client in list(self._clients):
                    client.close("pgroute shutting down")
                if self._spliced is not None:
                    for session in list(self._spliced.sessions):
                        session.close("pgroute shutting down")
                # Let the aborts run their connection_lost callbacks.
                await asyncio.sleep(0)
        await self._server.wait_closed()
        self._stop_splicing()
        self._release_descriptors()
        log.info("proxy closed")

    def _release_descriptors(self) -> None:
        limits.release(self._fd_reservation)
        self._fd_reservation = 0

    def _stop_splicing(self) -> None:
        if self._spliced is not None:
            self._spliced.close()
            self._spliced = None
            self.router.stats.live_bytes = None
        if self._splicer is not None:
            self._splicer.close()  # only now: closing the map unsplices every socket in it
            self._splicer = None

    # -- per-connection bookkeeping (called by ClientProtocol) ---------------------------
    def _client_made(self, client: ClientProtocol) -> None:
        """Every accepted socket takes a slot from its first moment: a socket that
        never sends a byte costs a descriptor like any other."""
        loop = asyncio.get_running_loop()
        client.deadline = loop.time() + self.startup_timeout
        self._clients.add(client)
        assert self._all_closed is not None
        self._all_closed.clear()
        if self._admitted < self.max_client_connections:
            client.admitted = True
            self._admitted += 1
            self.router.stats.connections_current += 1  # open sockets, as the limit sees them
            client.handshake = loop.create_task(self._handshake(client))
        elif self._refusing < self._refusal_pool:
            # Read its first packet (within the same deadline) to answer 53300 where
            # the driver reads it, or to forward a CancelRequest.
            client.refusing = True
            self._refusing += 1
            client.handshake = loop.create_task(self._handshake(client, over_limit=True))
        else:
            self._reject(REJECT_MAX_CONNECTIONS, "limit reached and refusal pool full: closed unread")
            client.abort()

    def _client_lost(self, client: ClientProtocol) -> None:
        self._clients.discard(client)
        if client.admitted:
            client.admitted = False
            self._admitted -= 1
            self.router.stats.connections_current -= 1
            self.router.unregister(client)
        if client.refusing:
            client.refusing = False
            self._refusing -= 1
        self._maybe_all_closed()

    def _spliced_closed(self, session: SplicedSession) -> None:
        self._admitted -= 1
        self.router.stats.connections_current -= 1
        self.router.unregister(session)
        self._maybe_all_closed()

    def _maybe_all_closed(self) -> None:
        if not self._clients and not self.spliced_count and self._all_closed is not None:
            self._all_closed.set()

    # -- handshake -------------------------------------------------------------------------
    async def _handshake(self, client: ClientProtocol, over_limit: bool = False) -> None:
        try:
            await self._handshake_steps(client, over_limit)
        except ClientGone:
            client.abort()
        except asyncio.CancelledError:
            # connection_lost cancelled us; the client is gone already.
            client.abort()
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("proxy handshake failed")
            client.abort()
        finally:
            # A finished task held for the whole session is memory per connection.
            client.handshake = None

    async def _handshake_steps(self, client: ClientProtocol, over_limit: bool) -> None:
        stats = self.router.stats
        loop = asyncio.get_running_loop()
        try:
            first = await client.read_packet(max(0.0, client.deadline - loop.time()))
        except StartupError as e:
            self._reject(REJECT_INVALID_STARTUP, e.message)
            self._send_error_and_close(client, e.sqlstate, e.message)
            return
        except TimeoutError:
            self._reject(REJECT_STARTUP_TIMEOUT, f"no startup packet within {self.startup_timeout:g}s")
            if client.started_tls:  # an incomplete ClientHello
                self._send_tls_alert_and_close(client)
            else:
                self._send_error_and_close(client, "08P01", "timeout expired waiting for the startup packet")
            return
        # What is left of startup_timeout is the client's for the rest of its part of
        # the handshake (after an SSL/GSS request: starting the negotiation); time spent
        # waiting on pgroute (a pause, a failover) is not charged to it.
        budget = client.deadline - loop.time()

        if first.kind is PacketKind.CANCEL_REQUEST:
            await self._forward_cancel(client, first)
            return
        if over_limit:
            await self._refuse(
                client, first, "53300", "sorry, too many clients already", REJECT_MAX_CONNECTIONS, timeout=budget
            )
            return
        if self._closing:
            await self._refuse(
                client, first, "57P01", "terminating connection: pgroute is shutting down", REJECT_SHUTDOWN
            )
            return
        stats.connections_total += 1  # sessions: a CancelRequest is not one

        route = self.router.route
        if not route.routable:
            route = await self.router.wait_routable(self.pause_timeout)
            if not route.routable:
                await self._refuse_unroutable(client, first, route)
                return

        transport: asyncio.Transport
        if self._spliced is not None:
            connected = await self._connect_session(client, first, route, raw=True)
            if connected is None:
                return
            route, sock = connected
            if client.closed:
                sock.close()
                return
            if await self._splice(client, first, route, sock, budget):
                return
            # Not spliced (a pipelining client): the same backend connection, piped.
            transport, _ = await loop.create_connection(lambda: BackendProtocol(client, stats), sock=sock)
        else:
            piped = await self._connect_session(client, first, route)
            if piped is None:
                return
            route, transport = piped
        if client.closed:
            transport.close()
            return
        backend = route.backend
        assert backend is not None
        # Both connects above build the transport with a BackendProtocol factory.
        client.attach(cast(BackendProtocol, transport.get_protocol()), first.raw, route.epoch, backend.name)
        if self.router.register(client) and first.encrypted:
            watch_encryption(client, len(first.raw), budget, self._encryption_stalled)
        _log_session(first, route)

    async def _splice(
        self, client: ClientProtocol, first: FirstPacket, route: Route, backend_sock: socket.socket, budget: float
    ) -> bool:
        """Hand the session to the kernel; False (nothing changed) when the client
        cannot be spliced safely or the kernel refuses the pair."""
        assert self._splicer is not None and self._spliced is not None and route.backend is not None
        client_sock = client.take_socket()
        if client_sock is None:
            return False
        try:
            self._splicer.pair(client_sock, backend_sock)
        except OSError as e:
            log.warning("kernel splicing refused a session (%s): piping it", e)
            client_sock.close()
            client.keep()
            return False
        # The spliced session holds the admission from here on.
        client.admitted = False
        self._clients.discard(client)
        client.release()
        session = SplicedSession(self._spliced, client_sock, backend_sock, route.epoch, route.backend.name)
        self._spliced.add(session)
        self.router.stats.spliced_total += 1
        try:
            # The first packet goes before anything the kernel forwards: the client
            # sends nothing more until the server answers it. A fresh socket's send
            # buffer takes it whole; sock_sendall only for the odd partial write.
            sent = backend_sock.send(first.raw)
            if sent < len(first.raw):
                await asyncio.get_running_loop().sock_sendall(backend_sock, first.raw[sent:])
        except OSError as e:
            log.debug("backend closed before the startup packet: %s", e)
            session.close("backend closed before the startup packet")
            return True
        if inq(client_sock.fileno()):
            # Bytes that arrived between take_socket and pair, from a client that did
            # not wait for the server: the kernel forwards them only when more arrive.
            # Drop the session rather than let it hang.
            log.warning("client sent data before the server answered its startup packet; closing the session")
            session.close("client did not wait for the server")
            return True
        if self.router.register(session) and first.encrypted:
            watch_encryption(session, len(first.raw), budget, self._encryption_stalled)
        _log_session(first, route)
        return True

    @overload
    async def _connect_session(
        self, client: ClientProtocol, first: FirstPacket, route: Route, raw: Literal[False] = False
    ) -> tuple[Route, asyncio.Transport] | None: ...

    @overload
    async def _connect_session(
        self, client: ClientProtocol, first: FirstPacket, route: Route, raw: Literal[True]
    ) -> tuple[Route, socket.socket] | None: ...

    async def _connect_session(
        self, client: ClientProtocol, first: FirstPacket, route: Route, raw: bool = False
    ) -> tuple[Route, asyncio.Transport | socket.socket] | None:
        """The route a new session ended up on and its backend connection, or None
        after refusing the client.

        A failed connect does not refuse the client at once: between a crash and its
        detection the node is dead while still routed. The failure is reported (the
        controller probes the node now), and the session is held for up to
        ``pause_timeout``: it retries the node (a passing failure) and follows the
        route the control path publishes (a failover's new epoch). It is refused only
        when that wait ends with no routable node, or with the node still failing."""
        loop = asyncio.get_running_loop()
        stats = self.router.stats
        deadline: float | None = None
        delay = _RETRY_FIRST
        try:
            while True:
                backend = route.backend
                assert backend is not None
                try:
                    return route, await self._open(client, backend, raw)
                except (OSError, TimeoutError) as e:
                    error = str(e) or f"timeout after {self.connect_timeout:g}s"
                self._note_backend_failure(backend.name, backend.host, backend.port, error)
                now = loop.time()
                if deadline is None:
                    deadline = now + self.pause_timeout
                    stats.waiting += 1
                if first.kind is PacketKind.CANCEL_REQUEST or now >= deadline:
                    self._reject(REJECT_BACKEND_UNREACHABLE, f"{backend.name}: {error}")
                    if first.kind is PacketKind.CANCEL_REQUEST:
                        client.abort()
                    else:
                        await self._refuse(
                            client,
                            first,
                            "08006",
                            f'pgroute could not connect to node "{backend.name}" '
                            f"({backend.host}:{backend.port}): {error}",
                            None,
                        )
                    return None
                new = await self.router.wait_changed(route, min(delay, deadline - now))
                delay = min(delay * 2, _RETRY_MAX)
                if new != route:
                    if not new.routable:
                        new = await self.router.wait_routable(max(0.0, deadline - loop.time()))
                        if not new.routable:
                            await self._refuse_unroutable(client, first, new)
                            return None
                    route, delay = new, _RETRY_FIRST
        finally:
            if deadline is not None:
                stats.waiting -= 1

    async def _open(self, client: ClientProtocol, backend: Backend, raw: bool) -> asyncio.Transport | socket.socket:
        """A transport to ``backend`` (with ``raw``, a connected non-blocking socket
        instead) within ``connect_timeout``; OSError or TimeoutError otherwise."""
        loop = asyncio.get_running_loop()
        stats = self.router.stats
        # The connect timeout is asyncio.timeout's mechanism without its Python-level
        # bookkeeping (about a tenth of the proxy's user CPU per connection): a timer
        # cancels this task, and that one cancellation becomes a TimeoutError.
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        expired: list[bool] = []
        timer = loop.call_later(self.connect_timeout, _cancel_on_timeout, task, expired)
        try:
            if raw:
                return await open_socket(loop, backend.host, backend.port)
            transport, _ = await loop.create_connection(
                lambda: BackendProtocol(client, stats), backend.host, backend.port
            )
            return transport
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise TimeoutError() from None
            raise  # connection_lost cancelled the handshake: the client is gone
        finally:
            timer.cancel()

    def _note_backend_failure(self, name: str, host: str, port: int, error: str) -> None:
        self.router.report_backend_failure(name, error)
        now = time.monotonic()
        if now - self._failure_logged.get(name, -_FAILURE_LOG_INTERVAL) >= _FAILURE_LOG_INTERVAL:
            self._failure_logged[name] = now
            log.warning("cannot connect to %s (%s:%d): %s", name, host, port, error)

    async def _forward_cancel(self, client: ClientProtocol, first: FirstPacket) -> None:
        # The query to cancel runs on the active node; a pause does not move it, so
        # do not wait. The pipe stays unregistered: the backend reads the request and
        # closes, which closes the client after it (as a direct cancel would).
        route = self.router.route
        if route.backend is None:
            client.abort()
            return
        connected = await self._connect_session(client, first, route)
        if connected is None:
            return
        _, transport = connected
        if client.closed:
            transport.close()
            return
        client.attach(cast(BackendProtocol, transport.get_protocol()), first.raw, route.epoch, route.backend.name)

    async def _refuse_unroutable(self, client: ClientProtocol, first: FirstPacket, route: Route) -> None:
        if route.paused:  # still paused after pause_timeout
            detail = f"pause timed out after {self.pause_timeout:g}s"
            if route.reason:
                detail += f" ({route.reason})"
            reason = REJECT_PAUSE_TIMEOUT
        else:
            detail = route.reason or "no node is routable"
            reason = REJECT_NO_BACKEND
        await self._refuse(
            client, first, "57P03", f"the database system is not accepting connections: {detail}", reason
        )

    async def _refuse(
        self,
        client: ClientProtocol,
        first: FirstPacket,
        sqlstate: str,
        message: str,
        reason: str | None,
        timeout: float | None = None,
    ) -> None:
        """Send an ErrorResponse the client will actually read, then close.

        A client that asked for SSL/GSS encryption is waiting for one byte: answer
        ``N`` (no encryption here) and read the StartupMessage it then sends in
        plaintext, the way a server refusing encryption would; only then is an error
        where libpq, asyncpg and psycopg look for it. Reading that packet also means
        no unread client bytes are pending when we close, so the kernel sends a FIN,
        not a RST that could discard the error before the client reads it. The client
        has ``timeout`` seconds for that (default ``startup_timeout``).

        A direct TLS client is past the point where it could read an ErrorResponse: it
        gets a TLS alert (``direct_tls.py``); the reason is in the log and the metric.
        Its whole first record was read, so that close is a FIN too."""
        if reason is not None:
            self._reject(reason, message)
        if first.kind is PacketKind.DIRECT_TLS:
            self._send_tls_alert_and_close(client)
            return
        if first.wants_encryption:
            try:
                async with asyncio.timeout(self.startup_timeout if timeout is None else max(0.0, timeout)):
                    # libpq may try GSS first and then SSL: refuse each in turn.
                    for _ in range(2):
                        client.write(startup.ENCRYPTION_REFUSED)
                        packet = await client.read_packet()
                        if not packet.wants_encryption:
                            break
            except (StartupError, ClientGone, TimeoutError):
                client.abort()
                return
        self._send_error_and_close(client, sqlstate, message)

    # -- refusals -------------------------------------------------------------------------
    def _reject(self, reason: str, detail: str) -> None:
        """Count a refusal by reason (the metric) and log it, rate-limited."""
        self.router.stats.reject(reason)
        self._refusal_log.note(reason, detail)

    def _encryption_stalled(self, session: ClientProtocol | SplicedSession) -> None:
        detail = f"SSL/GSS/TLS negotiation not under way within proxy.startup_timeout ({self.startup_timeout:g}s)"
        self._reject(REJECT_ENCRYPTION_TIMEOUT, detail)
        session.close(detail)

    def _send_error_and_close(self, client: ClientProtocol, sqlstate: str, message: str) -> None:
        client.write(startup.error_response(sqlstate, message))
        client.close_after_flush()

    def _send_tls_alert_and_close(self, client: ClientProtocol) -> None:
        client.write(direct_tls.ALERT_INTERNAL_ERROR)
        client.close_after_flush()
