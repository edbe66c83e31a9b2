"""Kernel splicing (proxy/sockmap.py, proxy/spliced.py) against a real server.

test_proxy.py runs every data-path test in both modes; this module covers what only
the spliced mode has to get right: the last bytes of a session that ends while the
kernel still holds data for the other side, clients that must not be spliced, the
byte counts read from the kernel, and the fallbacks when the kernel refuses.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import asyncpg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgroute.proxy import server as server_module
from pgroute.proxy import startup
from pgroute.proxy.router import Backend, Route, Router
from pgroute.proxy.server import ProxyServer
from pgroute.proxy.sockmap import Splicer, SpliceUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def spliced_proxy(local_cluster):
    router = Router(Route(Backend("primary", local_cluster.host, local_cluster.port), 1))
    proxy = ProxyServer(router, "127.0.0.1", 0, shutdown_timeout=0.5, splice="on")
    await proxy.start()
    yield proxy
    await proxy.close()


def user_db(cluster) -> dict:
    params = conninfo_to_dict(cluster.dsn())
    return {"user": params.get("user", "postgres"), "database": params.get("dbname", "postgres")}


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data), "truncated message stream"
    return out


async def read_all(reader: asyncio.StreamReader, timeout: float = 20.0) -> bytes:
    data = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(1 << 20):
            data += chunk
    return bytes(data)


async def wait_backend_gone(cluster, pid: int, failure: str, timeout: float = 10.0) -> None:
    """Wait until the server process ``pid`` has exited (asked over a direct connection)."""
    direct = await asyncpg.connect(host=cluster.host, port=cluster.port, **user_db(cluster))
    try:
        for _ in range(int(timeout / 0.05)):
            if not await direct.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                return
            await asyncio.sleep(0.05)
        pytest.fail(failure)
    finally:
        await direct.close()


async def ready_session(cluster, proxy: ProxyServer, rcvbuf: int | None = None):
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(startup.startup_message(user_db(cluster)))
    while True:
        head = await reader.readexactly(5)
        await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
        if head[:1] == b"Z":
            return reader, writer


async def test_server_goodbye_after_a_backlog_reaches_a_slow_client(local_cluster, spliced_proxy):
    """The server writes 2 MB, then ends the session (FATAL 57P01, FIN) while the
    client has read nothing: the kernel still holds most of it for the client. The
    proxy must close the client's socket only after all of it was written there."""
    reader, writer = await ready_session(local_cluster, spliced_proxy, rcvbuf=4096)
    writer.write(query("SELECT pg_backend_pid()"))
    pid_reply = b""
    while not pid_reply.endswith(b"Z\0\0\0\x05I"):
        pid_reply += await reader.read(4096)
    pid = int(next(body for kind, body in messages(pid_reply) if kind == b"D")[6:])
    # Small buffers on the client's path and room on the server's: the server can
    # finish while most of its output still waits in the kernel's redirect queue.
    [session] = spliced_proxy._spliced.sessions
    session.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    session.backend.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)

    rows, width = 2000, 1000
    writer.write(
        query(
            f"SELECT repeat('x', {width}) FROM generate_series(1, {rows}); "
            "SELECT pg_terminate_backend(pg_backend_pid())"
        )
    )
    # Not reading: wait until the server process is gone, i.e. it wrote everything
    # into the kernel's buffers and exited.
    await wait_backend_gone(local_cluster, pid, "the backend did not finish writing into the kernel's buffers")

    data = await read_all(reader)
    got = messages(data)
    assert sum(1 for kind, body in got if kind == b"D" and len(body) == 2 + 4 + width) == rows
    kind, body = got[-1]
    assert kind == b"E" and b"C57P01\0" in body, got[-1]
    writer.close()
    await asyncio.sleep(0.05)
    assert spliced_proxy.spliced_count == 0
    assert spliced_proxy.router.stats.connections_current == 0


async def test_pipelining_client_is_piped_not_spliced(local_cluster, spliced_proxy):
    """A client that sends its first query with its startup packet: those bytes must
    reach the server after the startup packet, which only the pipe can guarantee."""
    reader, writer = await asyncio.open_connection("127.0.0.1", spliced_proxy.port)
    writer.write(startup.startup_message(user_db(local_cluster)) + query("SELECT 6 * 7"))
    data = b""
    async with asyncio.timeout(10):
        while data.count(b"Z\0\0\0\x05I") < 2:
            chunk = await reader.read(65536)
            assert chunk, "closed early"
            data += chunk
    rows = [body for kind, body in messages(data) if kind == b"D"]
    assert rows == [struct.pack("!HI", 1, 2) + b"42"]
    stats = spliced_proxy.router.stats
    assert stats.spliced_total == 0 and stats.connections_total == 1
    assert len(spliced_proxy._clients) == 1  # piped: the protocol pair carries it
    writer.close()


async def test_spliced_bytes_are_counted_while_open_and_after(local_cluster, spliced_proxy):
    stats = spliced_proxy.router.stats
    reader, writer = await ready_session(local_cluster, spliced_proxy)
    assert spliced_proxy.spliced_count == 1 and stats.spliced_total == 1
    c2s_open, s2c_open = stats.bytes_proxied()
    writer.write(query("SELECT repeat('y', 100000)"))
    data = b""
    while not data.endswith(b"Z\0\0\0\x05I"):
        data += await reader.read(65536)
    c2s, s2c = stats.bytes_proxied()
    # Exactly what crossed, read from the kernel while the session is open.
    assert c2s - c2s_open == len(query("SELECT repeat('y', 100000)"))
    assert s2c - s2c_open == len(data)
    writer.write(b"X\0\0\0\x04")  # Terminate
    assert await read_all(reader) == b""
    writer.close()
    for _ in range(100):
        if spliced_proxy.spliced_count == 0:
            break
        await asyncio.sleep(0.02)
    # Moved from the live count to the totals, nothing lost or counted twice.
    assert stats.bytes_proxied() == (c2s + 5, s2c)
    assert (stats.bytes_client_to_server, stats.bytes_server_to_client) == (c2s + 5, s2c)


async def test_fenced_spliced_session_reaches_the_backend_no_more(local_cluster, spliced_proxy):
    router = spliced_proxy.router
    conn = await asyncpg.connect(host="127.0.0.1", port=spliced_proxy.port, **user_db(local_cluster))
    await conn.execute("CREATE TABLE IF NOT EXISTS splice_fence (v int)")
    router.publish(Route(router.route.backend, 2))
    assert router.close_sessions(before_epoch=2, reason="test fence") == 1
    with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError, OSError)):
        await conn.execute("INSERT INTO splice_fence VALUES (1)")
    conn.terminate()
    direct = await asyncpg.connect(host=local_cluster.host, port=local_cluster.port, **user_db(local_cluster))
    try:
        assert await direct.fetchval("SELECT count(*) FROM splice_fence") == 0
        await direct.execute("DROP TABLE splice_fence")
    finally:
        await direct.close()
    assert spliced_proxy.spliced_count == 0


async def test_session_registered_after_an_epoch_change_is_closed(local_cluster, monkeypatch):
    """A session that was connecting while fencing closed its epoch must not survive
    it: the epoch is checked again when the session is registered."""
    router = Router(Route(Backend("primary", local_cluster.host, local_cluster.port), 1))
    proxy = ProxyServer(router, "127.0.0.1", 0, shutdown_timeout=0.5, splice="on")
    await proxy.start()
    real_open = server_module.open_socket

    async def open_during_failover(loop, host, port):
        sock = await real_open(loop, host, port)
        router.publish(Route(router.route.backend, 2))  # the switch happens meanwhile
        router.close_sessions(before_epoch=2)
        return sock

    monkeypatch.setattr(server_module, "open_socket", open_during_failover)
    try:
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError, OSError)):
            await asyncpg.connect(host="127.0.0.1", port=proxy.port, timeout=5, **user_db(local_cluster))
        assert router.stats.spliced_total == 1 and proxy.spliced_count == 0
        assert router.session_count == 0
    finally:
        await proxy.close()


@pytest.mark.parametrize("failing", ["load", "self_test"])
async def test_splice_on_fails_and_auto_falls_back_when_the_kernel_refuses(local_cluster, monkeypatch, failing):
    """The kernel refuses the program, or takes it but does not forward correctly
    (the start-up self-test): ``on`` does not start, ``auto`` pipes."""
    if failing == "load":

        def refuse(cls, max_sessions):
            raise SpliceUnavailable(1, "the kernel refused the sk_skb program: Operation not permitted")

        monkeypatch.setattr(Splicer, "create", classmethod(refuse))
    else:

        def corrupt(self, timeout=2.0):
            raise SpliceUnavailable(0, "self-test: 0 of 16384 bytes arrived intact (refused)")

        monkeypatch.setattr(Splicer, "self_test", corrupt)
    router = Router(Route(Backend("primary", local_cluster.host, local_cluster.port), 1))
    strict = ProxyServer(router, "127.0.0.1", 0, splice="on")
    with pytest.raises(SpliceUnavailable, match="refused"):
        await strict.start()

    auto = ProxyServer(router, "127.0.0.1", 0, shutdown_timeout=0.5, splice="auto")
    await auto.start()
    try:
        assert not auto.splicing
        conn = await asyncpg.connect(host="127.0.0.1", port=auto.port, **user_db(local_cluster))
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert router.stats.spliced_total == 0
    finally:
        await auto.close()


def test_splicer_self_test_passes_here():
    splicer = Splicer.create(4)
    try:
        splicer.self_test()
    finally:
        splicer.close()


def test_splicer_pairs_and_unpairs_plain_sockets():
    """The kernel object on its own: two loopback connections spliced in the middle."""
    splicer = Splicer.create(4)
    listener = socket.create_server(("127.0.0.1", 0))
    try:

        def connection():
            outer = socket.create_connection(listener.getsockname())
            inner, _ = listener.accept()
            return outer, inner

        left, left_mid = connection()
        right, right_mid = connection()
        splicer.pair(left_mid, right_mid)
        for sock in (left, right):
            sock.settimeout(5)
        left.sendall(b"ping")
        assert right.recv(16) == b"ping"
        right.sendall(b"pong" * 1000)
        got = b""
        while len(got) < 4000:
            got += left.recv(65536)
        assert got == b"pong" * 1000
        # Closing a middle socket takes it out of the map: the pair is gone.
        left_mid.close()
        assert left.recv(16) == b""
        for sock in (left, right, right_mid):
            sock.close()
    finally:
        listener.close()
        splicer.close()


async def test_server_killed_ends_the_spliced_session(cluster_factory):
    """kill -9 of the server: the client sees its connection end at once (no hang on a
    socket pair nobody watches), and the session's accounting is released."""
    cluster = cluster_factory("splicekill")
    router = Router(Route(Backend("primary", cluster.host, cluster.port), 1))
    proxy = ProxyServer(router, "127.0.0.1", 0, shutdown_timeout=0.5, splice="on")
    await proxy.start()
    try:
        reader, writer = await ready_session(cluster, proxy)
        assert proxy.spliced_count == 1
        await asyncio.to_thread(cluster.kill)
        # The connection ends (read_all reaches EOF). When the kill reaches another
        # server process first, the backend may say goodbye first: one FATAL
        # ErrorResponse (57P01 postmaster exit, 57P02 crash of another process).
        tail = await read_all(reader, timeout=10)
        if tail:
            [(kind, body)] = messages(tail)
            assert kind == b"E" and b"SFATAL\0" in body, tail
        for _ in range(100):
            if proxy.spliced_count == 0:
                break
            await asyncio.sleep(0.02)
        assert proxy.spliced_count == 0 and router.stats.connections_current == 0
        assert router.session_count == 0
        writer.close()
    finally:
        await proxy.close()


async def test_client_reset_ends_the_spliced_session(local_cluster, spliced_proxy):
    """A client that vanishes with a RST (SO_LINGER 0): the server's backend is released
    (its connection closed) and so is the session."""
    sock = socket.socket()
    sock.connect(("127.0.0.1", spliced_proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(startup.startup_message(user_db(local_cluster)))
    data = b""
    while not data.endswith(b"Z\0\0\0\x05I"):
        data += await reader.read(4096)
    writer.write(query("SELECT pg_backend_pid()"))
    reply = b""
    while not reply.endswith(b"Z\0\0\0\x05I"):
        reply += await reader.read(4096)
    pid = int(next(body for kind, body in messages(reply) if kind == b"D")[6:])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # close with SO_LINGER 0: a RST, no FIN
    await wait_backend_gone(local_cluster, pid, "the server's backend outlived the client")
    assert spliced_proxy.spliced_count == 0
    assert spliced_proxy.router.stats.connections_current == 0


async def test_many_sessions_with_aborts_keep_every_byte_and_leak_nothing(local_cluster, spliced_proxy):
    """20 clients for about 3 s: results of random sizes checked byte for byte, a
    quarter of the sessions killed mid-result (RST with data in flight). Every
    completed result is intact; afterwards no session, admission or server backend
    is left behind."""
    import hashlib
    import random

    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    checked = aborted = 0

    async def client(seed: int) -> None:
        nonlocal checked, aborted
        r = random.Random(seed)
        while loop.time() < deadline:
            conn = await asyncpg.connect(host="127.0.0.1", port=spliced_proxy.port, **user_db(local_cluster))
            try:
                for _ in range(r.randint(1, 5)):
                    rows, width = r.choice([(1, 10), (50, 100), (2000, 64), (200, 5000)])
                    sql = f"SELECT i, repeat(md5(i::text), {width // 32 + 1}) FROM generate_series(1, {rows}) i"
                    if r.random() < 0.25 and rows * width > 100_000:
                        task = asyncio.ensure_future(conn.fetch(sql))
                        await asyncio.sleep(r.random() * 0.01)
                        conn.terminate()  # the proxy sees the client vanish mid-result
                        try:
                            await task
                        except Exception:
                            pass
                        aborted += 1
                        break
                    got = await conn.fetch(sql)
                    want = [
                        (i, hashlib.md5(str(i).encode()).hexdigest() * (width // 32 + 1)) for i in range(1, rows + 1)
                    ]
                    assert [tuple(row) for row in got] == want
                    checked += 1
            finally:
                if not conn.is_closed():
                    await conn.close()

    await asyncio.gather(*(client(rng.randrange(1 << 30)) for _ in range(20)))
    assert checked > 50 and aborted > 0, (checked, aborted)
    stats = spliced_proxy.router.stats
    for _ in range(250):
        if spliced_proxy.client_count == 0 and stats.connections_current == 0:
            break
        await asyncio.sleep(0.02)
    assert spliced_proxy.client_count == 0 and stats.connections_current == 0
    assert spliced_proxy.router.session_count == 0
    assert stats.spliced_total == stats.connections_total  # none fell back to the pipe
    direct = await asyncpg.connect(host=local_cluster.host, port=local_cluster.port, **user_db(local_cluster))
    try:
        for _ in range(100):
            left = await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()"
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0, f"{left} server backend(s) outlived their clients"
    finally:
        await direct.close()


async def test_a_taken_port_releases_the_kernel_objects(local_cluster):
    """start() failing after the splice was loaded (the port is in use) leaves no BPF
    map, program or epoll behind: the fd count is back where it was."""
    blocker = socket.create_server(("127.0.0.1", 0))
    router = Router(Route(Backend("primary", local_cluster.host, local_cluster.port), 1))
    import os

    before = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(3):
            proxy = ProxyServer(router, "127.0.0.1", blocker.getsockname()[1], splice="on")
            with pytest.raises(OSError):
                await proxy.start()
            assert not proxy.splicing
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        blocker.close()
