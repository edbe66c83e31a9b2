"""The proxy data path against a real PostgreSQL server.

Each test runs a ProxyServer on port 0 inside the test's event loop, with a Router
pointing at the ``local_cluster`` fixture. Clients that block (psql, sync psycopg)
run in subprocesses or threads so the proxy keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import subprocess
import time

import asyncpg
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgroute.proxy import protocols, startup
from pgroute.proxy.router import Backend, Route, Router
from pgroute.proxy.server import ProxyServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


# -- helpers -------------------------------------------------------------------------
def backend_of(cluster, name: str = "primary") -> Backend:
    return Backend(name, cluster.host, cluster.port)


@pytest.fixture(params=["splice", "pipe"])
async def make_proxy(request):
    """Start ProxyServers on port 0 in this test's loop; close them afterwards. Every
    test runs twice: sessions spliced by the kernel (``splice="on"``: a kernel that
    refuses fails the test) and piped through pgroute (``splice="off"``)."""
    servers: list[ProxyServer] = []
    mode = "on" if request.param == "splice" else "off"

    async def make(router: Router, **kwargs) -> ProxyServer:
        kwargs.setdefault("shutdown_timeout", 0.5)
        kwargs.setdefault("splice", mode)
        server = ProxyServer(router, "127.0.0.1", 0, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def proxy(local_cluster, make_proxy):
    return await make_proxy(Router(Route(backend_of(local_cluster), 1)))


def conninfo(cluster, proxy: ProxyServer | None = None, **extra) -> str:
    """The cluster's DSN, pointed at the proxy when one is given."""
    if proxy is not None:
        extra.update(host="127.0.0.1", port=proxy.port)
    return make_conninfo(cluster.dsn(), **extra)


async def apg_connect(cluster, proxy: ProxyServer, **kwargs) -> asyncpg.Connection:
    params = conninfo_to_dict(cluster.dsn())
    return await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=params.get("user"),
        database=params.get("dbname", "postgres"),
        password=params.get("password"),
        **kwargs,
    )


async def run(*args: str, env: dict | None = None) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = await proc.communicate()
    assert proc.returncode is not None  # the process has exited
    return proc.returncode, out, err


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    (length,) = struct.unpack("!I", head[1:])
    return head[:1], await reader.readexactly(length - 4)


async def raw_session(cluster, proxy: ProxyServer):
    """A hand-driven protocol session through the proxy (trust auth), ready for query."""
    params = conninfo_to_dict(cluster.dsn())
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        startup.startup_message(
            {"user": str(params.get("user", "postgres")), "database": str(params.get("dbname", "postgres"))}
        )
    )
    while True:
        kind, body = await read_message(reader)
        assert kind != b"E", startup.parse_error_response(kind + struct.pack("!I", len(body) + 4) + body)
        if kind == b"Z":
            return reader, writer


async def eventually(predicate, timeout: float = 5.0) -> None:
    """Wait for a condition the proxy reaches asynchronously (e.g. a close it has
    yet to read)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def assert_serving(cluster, proxy: ProxyServer) -> None:
    conn = await apg_connect(cluster, proxy)
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()


# -- drivers -------------------------------------------------------------------------
async def test_psql_asyncpg_and_psycopg_through_the_proxy(local_cluster, proxy):
    rc, out, err = await run("psql", conninfo(local_cluster, proxy), "-Atc", "SELECT current_database(), 6 * 7")
    assert rc == 0, err
    assert out.decode().strip().endswith("|42")

    conn = await apg_connect(local_cluster, proxy)
    assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
    assert await conn.fetchval("SELECT inet_server_port()") == local_cluster.port
    await conn.close()

    async with await psycopg.AsyncConnection.connect(conninfo(local_cluster, proxy)) as aconn:
        cur = await aconn.execute("SELECT %s::text || 'b'", ["a"])
        assert await cur.fetchone() == ("ab",)

    def sync_psycopg():
        with psycopg.connect(conninfo(local_cluster, proxy, sslmode="disable")) as c:
            row = c.execute("SELECT count(*) FROM generate_series(1, 1000)").fetchone()
            assert row is not None
            return row[0]

    assert await asyncio.to_thread(sync_psycopg) == 1000

    stats = proxy.router.stats
    await eventually(lambda: stats.connections_current == 0)
    assert stats.connections_total == 4
    assert stats.spliced_total == (4 if proxy.splicing else 0)
    assert stats.bytes_client_to_server > 0 and stats.bytes_server_to_client > 0


async def check_leg_socket_options(cluster, proxy: ProxyServer) -> None:
    """TCP_NODELAY comes from the event loop and SO_KEEPALIVE on the client leg from
    the listening socket: nothing sets them per connection, so check the sockets."""
    conn = await apg_connect(cluster, proxy)
    try:
        if proxy.splicing:
            # The kernel forwards: no transports, but the same options on both sockets.
            assert proxy._spliced is not None
            [session] = list(proxy._spliced.sessions)
            for sock in (session.client, session.backend):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            assert not proxy._clients  # the handshake's protocol is gone
            assert await conn.fetchval("SELECT 1") == 1
            return
        [client] = list(proxy._clients)
        for leg in (client, client.peer):
            assert leg is not None and leg.transport is not None
            sock = leg.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            assert leg.transport.get_write_buffer_limits() == (protocols.WRITE_BUFFER_LOW, protocols.WRITE_BUFFER_HIGH)
        # The finished handshake task is not kept for the whole session.
        assert client.handshake is None
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_both_legs_are_nodelay_and_keepalive(local_cluster, proxy):
    await check_leg_socket_options(local_cluster, proxy)


@pytest.mark.parametrize("splice", ["on", "off"])
def test_both_legs_are_nodelay_and_keepalive_on_uvloop(local_cluster, splice):
    # The benchmark and `pgroute run` use uvloop; the rest of this module runs on
    # the asyncio loop.
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        server = ProxyServer(
            Router(Route(backend_of(local_cluster), 1)), "127.0.0.1", 0, shutdown_timeout=0.5, splice=splice
        )
        await server.start()
        try:
            await check_leg_socket_options(local_cluster, server)
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def test_large_copy_is_byte_identical(local_cluster, proxy):
    query = "COPY (SELECT i, md5(i::text), now()::date - i FROM generate_series(1, 300000) i) TO STDOUT"
    rc, direct, err = await run("psql", conninfo(local_cluster), "-Atc", query)
    assert rc == 0, err
    before = proxy.router.stats.bytes_proxied()[1]
    rc, proxied, err = await run("psql", conninfo(local_cluster, proxy), "-Atc", query)
    assert rc == 0, err
    assert direct.count(b"\n") == 300000
    assert hashlib.sha256(proxied).hexdigest() == hashlib.sha256(direct).hexdigest()
    # Open spliced sessions count too: the kernel is asked at read time.
    assert proxy.router.stats.bytes_proxied()[1] - before > len(direct)


# -- TLS end to end --------------------------------------------------------------------
async def test_sslmode_require_is_end_to_end(local_cluster, proxy):
    datadir = str(local_cluster.datadir)
    cert, key = os.path.join(datadir, "server.crt"), os.path.join(datadir, "server.key")
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-days",
            "2",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-newkey",
            "rsa:2048",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    st = os.stat(datadir)
    for path in (cert, key):
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, 0o600)
    local_cluster.sql("ALTER SYSTEM SET ssl_cert_file = 'server.crt'")
    local_cluster.sql("ALTER SYSTEM SET ssl_key_file = 'server.key'")
    local_cluster.sql("ALTER SYSTEM SET ssl = on")
    local_cluster.sql("SELECT pg_reload_conf()")

    query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    deadline = time.monotonic() + 10
    while True:  # the reload is asynchronous
        try:
            async with await psycopg.AsyncConnection.connect(conninfo(local_cluster, proxy, sslmode="require")) as conn:
                row = await (await conn.execute(query)).fetchone()
                assert conn.pgconn.ssl_in_use
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    assert row == (True,)

    rc, out, err = await run("psql", conninfo(local_cluster, proxy, sslmode="require"), "-Atc", query)
    assert rc == 0, err
    assert out.strip() == b"t"


# -- cancel ------------------------------------------------------------------------------
async def test_cancel_through_the_proxy_psycopg(local_cluster, proxy):
    # sslmode=disable: the cancel connection then starts with a plaintext
    # CancelRequest, the proxy's own cancel path (with SSL negotiation first it would
    # be an ordinary pipe that the backend answers).
    info = conninfo(local_cluster, proxy, sslmode="disable")
    async with await psycopg.AsyncConnection.connect(info) as conn:
        started = time.monotonic()
        query = asyncio.create_task(conn.execute("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.3)
        # Not conn.cancel(): psycopg's PQcancel holds the GIL while it waits for the
        # server to close, which would freeze this process's proxy.
        await conn.cancel_safe(timeout=5)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await query
        assert time.monotonic() - started < 1.5
        await conn.rollback()
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    # A CancelRequest is not a session: it never counts as a client connection.
    assert proxy.router.stats.connections_total == 1


async def test_cancel_through_the_proxy_psql_sigint(local_cluster, proxy):
    # psql's ^C handler sends a CancelRequest (PQcancel) on a new connection.
    proc = await asyncio.create_subprocess_exec(
        "psql",
        conninfo(local_cluster, proxy),
        "-c",
        "SELECT pg_sleep(10)",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await eventually(lambda: proxy.router.stats.connections_current == 1)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 5)
    assert time.monotonic() - started < 1.0
    assert b"canceling statement due to user request" in err


async def test_cancel_through_the_proxy_asyncpg(local_cluster, proxy):
    conn = await apg_connect(local_cluster, proxy)
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await conn.fetch("SELECT pg_sleep(10)", timeout=0.3)  # timeout => CancelRequest
    assert await conn.fetchval("SELECT 7") == 7
    assert time.monotonic() - started < 1.5
    await conn.close()


# -- misbehaving clients -------------------------------------------------------------------
async def test_bad_clients_do_not_disturb_others(local_cluster, make_proxy):
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router, startup_timeout=0.5)
    healthy = await apg_connect(local_cluster, proxy)

    # Garbage: an HTTP request is an absurd length.
    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    w.write(b"GET / HTTP/1.1\r\nHost: pgroute\r\n\r\n")
    reply = await read_until_closed(r)
    assert startup.parse_error_response(reply)["C"] == "08P01"
    w.close()

    # A 200 MB announced length is refused on the header, before any body.
    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    w.write(struct.pack("!II", 200_000_000, startup.PROTOCOL_3_0))
    reply = await read_until_closed(r)
    assert "invalid length" in startup.parse_error_response(reply)["M"]
    w.close()

    # Truncated: half a packet, then EOF.
    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    w.write(startup.startup_message({"user": "x"})[:9])
    w.write_eof()
    assert await read_until_closed(r) == b""
    w.close()

    # Silent clients: closed after startup_timeout while the healthy one keeps working.
    silent = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    started = time.monotonic()
    assert await healthy.fetchval("SELECT 1") == 1
    await assert_serving(local_cluster, proxy)
    for r, w in silent:
        reply = await read_until_closed(r)
        assert startup.parse_error_response(reply)["C"] == "08P01"
        w.close()
    assert 0.4 < time.monotonic() - started < 3

    assert await healthy.fetchval("SELECT 2") == 2
    await healthy.close()
    stats = router.stats
    assert stats.rejected == {"invalid_startup": 2, "startup_timeout": 3}
    assert proxy.client_count == 0 and stats.connections_current == 0


async def test_over_max_client_connections(local_cluster, make_proxy):
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router, max_client_connections=5)

    # A flood: 12 at once, exactly 5 get in, the rest read 53300.
    results = await asyncio.gather(*(apg_connect(local_cluster, proxy) for _ in range(12)), return_exceptions=True)
    conns = [c for c in results if isinstance(c, asyncpg.Connection)]
    errors = [e for e in results if not isinstance(e, asyncpg.Connection)]
    assert len(conns) == 5
    assert all(isinstance(e, asyncpg.TooManyConnectionsError) for e in errors), errors
    assert all("too many clients" in str(e) for e in errors)

    assert all(isinstance(e, asyncpg.TooManyConnectionsError) and e.sqlstate == "53300" for e in errors)
    # libpq, with and without the SSLRequest first. (psycopg has no sqlstate for
    # errors during connection, not even from a real server: the text is the check.)
    for sslmode in ("prefer", "disable"):
        with pytest.raises(psycopg.OperationalError, match="FATAL:  sorry, too many clients already"):
            await psycopg.AsyncConnection.connect(conninfo(local_cluster, proxy, sslmode=sslmode))
    rc, _, err = await run("psql", conninfo(local_cluster, proxy), "-c", "SELECT 1")
    assert rc != 0 and b"sorry, too many clients already" in err

    assert router.stats.rejected["max_connections"] == 7 + 3
    assert router.stats.connections_current == 5
    # The admitted sessions work, and a freed slot is reusable.
    assert [await c.fetchval("SELECT 1") for c in conns] == [1] * 5
    await conns.pop().close()
    await asyncio.sleep(0.05)
    await assert_serving(local_cluster, proxy)
    for c in conns:
        await c.close()


async def test_silent_sockets_count_against_max_client_connections(local_cluster, make_proxy):
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router, max_client_connections=3, startup_timeout=1.0)
    silent = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    await eventually(lambda: proxy.client_count == 3)
    # The three sockets that never sent a byte hold the three slots.
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await apg_connect(local_cluster, proxy)
    for r, w in silent:  # closed with 08P01 at startup_timeout: the slots come back
        assert startup.parse_error_response(await read_until_closed(r))["C"] == "08P01"
        w.close()
    await assert_serving(local_cluster, proxy)
    assert router.stats.rejected == {"max_connections": 1, "startup_timeout": 3}


async def test_handshake_flood_leaves_legitimate_clients_served(local_cluster, make_proxy):
    """150 sockets that go silent (50 plain, 50 after an SSLRequest, 50 after a
    GSSENCRequest) while legitimate clients connect: they are served, and every flood
    socket is closed once startup_timeout has passed."""
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router, max_client_connections=170, startup_timeout=1.5)
    requests = [b"", startup.ssl_request(), startup.gssenc_request()]
    flood = []
    started = time.monotonic()
    for i in range(150):
        r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
        w.write(requests[i % 3])
        flood.append((r, w))
    served = 0
    while time.monotonic() - started < 1.0:
        await assert_serving(local_cluster, proxy)
        served += 1
    assert served >= 3

    async def closed(r: asyncio.StreamReader) -> bytes:
        return await read_until_closed(r, timeout=6.0)

    replies = await asyncio.gather(*(closed(r) for r, _ in flood))
    elapsed = time.monotonic() - started
    for _, w in flood:
        w.close()
    assert 1.4 < elapsed < 6.0, elapsed
    # Plain: 08P01; after a request: the server's one-byte answer, then the drop.
    assert all(startup.parse_error_response(reply)["C"] == "08P01" for reply in replies[0::3])
    assert all(len(reply) <= 1 for i, reply in enumerate(replies) if i % 3)
    assert router.stats.rejected == {"startup_timeout": 50, "encryption_timeout": 100}
    await eventually(lambda: proxy.client_count == 0 and router.stats.connections_current == 0)
    await assert_serving(local_cluster, proxy)


# -- backpressure -----------------------------------------------------------------------------
async def test_slow_reader_bounds_proxy_buffers(local_cluster, proxy):
    reader, writer = await raw_session(local_cluster, proxy)
    rows, width = 20000, 1000
    query = f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})".encode()
    writer.write(b"Q" + struct.pack("!I", len(query) + 5) + query + b"\0")

    # Read 4 KiB every 10 ms (~400 KB/s) for 2 s while the server produces ~20 MB.
    received = 0
    peak = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        received += len(await reader.read(4096))
        peak = max(peak, proxy.buffered_bytes())
        await asyncio.sleep(0.01)
    if proxy.splicing:
        # The kernel holds the waiting bytes (charged to the spliced sockets) and its
        # TCP windows push back on the server: a few MB here (4.3 MB measured), far
        # from the 20 MB result.
        assert peak > protocols.WRITE_BUFFER_LOW
        assert peak < rows * width / 2, peak
    else:
        # The pipe is under pressure (bytes are waiting) yet bounded by the high-water
        # mark plus one read chunk per leg.
        assert peak > protocols.WRITE_BUFFER_LOW
        assert peak < protocols.WRITE_BUFFER_HIGH + 2 * 256 * 1024, peak
    assert received < rows * width / 2

    # Then drain quickly: nothing was lost across the pause/resume cycles.
    tail = await read_until_closed_or(reader, b"Z\0\0\0\x05I")
    assert b"SELECT 20000\0" in tail
    # Each DataRow is 1 + 4 + 2 + 4 + width bytes; all of them arrived.
    assert received + len(tail) > rows * (11 + width)
    writer.close()


async def read_until_closed_or(reader: asyncio.StreamReader, end: bytes) -> bytes:
    data = bytearray()
    async with asyncio.timeout(30):
        while not data.endswith(end):
            chunk = await reader.read(1 << 20)
            assert chunk, "connection closed early"
            data += chunk
    return bytes(data)


# -- routing ------------------------------------------------------------------------------------
async def test_paused_router_holds_new_connections_until_resume(local_cluster, make_proxy):
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router)
    router.pause("switchover in progress")
    connecting = asyncio.create_task(apg_connect(local_cluster, proxy))
    await asyncio.sleep(0.5)
    assert not connecting.done()
    assert router.stats.waiting == 1
    # A client that gives up while waiting frees its slot and stops waiting.
    _r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    w.write(startup.startup_message({"user": "postgres"}))
    await eventually(lambda: router.stats.waiting == 2)
    assert router.stats.connections_current == 2
    w.close()
    await eventually(lambda: router.stats.waiting == 1)
    assert router.stats.connections_current == 1

    router.resume()
    conn = await asyncio.wait_for(connecting, 5)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    assert router.stats.waiting == 0


async def test_pause_timeout_and_no_backend_refuse_with_57P03(local_cluster, make_proxy):
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router, pause_timeout=0.3)
    router.pause("switchover in progress")
    with pytest.raises(asyncpg.CannotConnectNowError, match="pause timed out"):
        await apg_connect(local_cluster, proxy)

    router.publish(Route(None, 2, reason="primary down and mirror not confirmed"))
    with pytest.raises(psycopg.OperationalError, match="primary down and mirror not confirmed"):
        await psycopg.AsyncConnection.connect(conninfo(local_cluster, proxy))
    with pytest.raises(asyncpg.CannotConnectNowError, match="not accepting connections") as e:
        await apg_connect(local_cluster, proxy)
    assert e.value.sqlstate == "57P03"
    assert router.stats.rejected == {"pause_timeout": 1, "no_backend": 2}
    assert router.stats.connections_current == 0


async def test_unreachable_backend_reports_08006_and_failure(local_cluster, make_proxy):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    router = Router(Route(Backend("mirror", "127.0.0.1", dead_port), 1))
    failures = []
    router.add_failure_listener(lambda name, error: failures.append((name, error)))
    # A failed connect holds the session (a failover may be under way) for up to
    # pause_timeout, retrying; nothing changes here, so it is refused after it.
    proxy = await make_proxy(router, pause_timeout=0.3)
    with pytest.raises(psycopg.OperationalError, match='node "mirror"') as e:
        await psycopg.AsyncConnection.connect(conninfo(local_cluster, proxy, password="s3cret"))
    assert "s3cret" not in str(e.value)
    with pytest.raises(asyncpg.ConnectionFailureError, match='node "mirror"') as e:
        await apg_connect(local_cluster, proxy)
    assert e.value.sqlstate == "08006"
    assert len(failures) >= 4 and {name for name, _ in failures} == {"mirror"}
    assert router.stats.rejected == {"backend_unreachable": 2}
    assert router.stats.waiting == 0


@pytest.fixture
def silent_backend():
    """A port whose connects hang: a listener with a full accept queue drops SYNs."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.05)
    yield Backend("mirror", "127.0.0.1", port)
    for s in fillers:
        s.close()
    full.close()


async def test_connect_timeout_reports_08006(local_cluster, make_proxy, silent_backend):
    router = Router(Route(silent_backend, 1))
    failures = []
    router.add_failure_listener(lambda name, error: failures.append((name, error)))
    proxy = await make_proxy(router, connect_timeout=0.3, pause_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(asyncpg.ConnectionFailureError, match=r"timeout after 0\.3s") as e:
        await apg_connect(local_cluster, proxy)
    # One connect timeout, a retry after 0.1 s (still within pause_timeout), another.
    assert 0.65 < time.monotonic() - started < 3
    assert e.value.sqlstate == "08006"
    assert failures == [("mirror", "timeout after 0.3s")] * 2
    assert router.stats.rejected == {"backend_unreachable": 1}
    await eventually(lambda: proxy.client_count == 0 and router.stats.connections_current == 0)


async def test_client_leaving_during_connect_is_not_a_timeout(local_cluster, make_proxy, silent_backend):
    # The handshake task is cancelled by connection_lost while the connect hangs: that
    # cancellation must end the handshake, not be taken for the connect timeout.
    router = Router(Route(silent_backend, 1))
    proxy = await make_proxy(router, connect_timeout=1.0)
    _r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    w.write(startup.startup_message({"user": "postgres"}))
    await eventually(lambda: router.stats.connections_current == 1)
    w.close()
    await eventually(lambda: proxy.client_count == 0 and router.stats.connections_current == 0)
    await asyncio.sleep(1.2)  # past the connect timeout: nothing fires any more
    assert router.stats.rejected == {}


async def test_close_sessions_fences_old_epoch(local_cluster, make_proxy):
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router)
    old = await apg_connect(local_cluster, proxy)
    router.publish(Route(backend_of(local_cluster), 2))
    new = await apg_connect(local_cluster, proxy)
    assert router.session_count == 2

    assert router.close_sessions(before_epoch=2, reason="failover to mirror") == 1
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError)):
        await old.fetchval("SELECT 1")
    assert await new.fetchval("SELECT 2") == 2
    await asyncio.sleep(0.05)
    assert router.session_count == 1 and router.stats.connections_current == 1
    await new.close()
    old.terminate()


async def test_graceful_close(local_cluster, make_proxy):
    router = Router(Route(backend_of(local_cluster), 1))
    proxy = await make_proxy(router, shutdown_timeout=0.3)
    conn = await apg_connect(local_cluster, proxy)
    port = proxy.port
    started = time.monotonic()
    await proxy.close()
    assert 0.25 < time.monotonic() - started < 2
    assert conn.is_closed() or not await _still_works(conn)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    assert router.session_count == 0


async def _still_works(conn) -> bool:
    try:
        await conn.fetchval("SELECT 1")
        return True
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
        return False


async def test_psql_shows_57P03_reason(local_cluster, make_proxy):
    router = Router(Route(None, 1, reason="no node is routable: both nodes down"))
    proxy = await make_proxy(router)
    rc, _, err = await run("psql", conninfo(local_cluster, proxy), "-c", "SELECT 1")
    assert rc != 0
    assert b"not accepting connections: no node is routable: both nodes down" in err
