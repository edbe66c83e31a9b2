"""pgroute.control.replication against real PostgreSQL pairs: promotion with the
primary dead, fencing a subscriber, stamps, the failover slot, lag and catch-up,
synchronous replication, setup and checks."""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import pytest

from pgroute import local
from pgroute.control import fencing
from pgroute.control import replication as r
from pgroute.errors import NodeUnavailable
from pgroute.pg import catalog, naming
from pgroute.pg import connect as pgconn
from pgroute.pg.dsn import parse_dsn
from pgroute.tools import check, setup

# matrix: also run on every PostgreSQL major version by `make test-matrix` (issue 15).
pytestmark = pytest.mark.matrix

SUB = "chrispar_sub"
PUB = "chrispar_pub"
SEED = """
INSERT INTO usuarios (nombre, email) SELECT 'u' || i, 'u' || i || '@x' FROM generate_series(1, 5) i;
INSERT INTO empleados (nombre, usuario_id) SELECT 'e' || i, i FROM generate_series(1, 3) i;
INSERT INTO pedidos (usuario_id, total) SELECT i, i * 10 FROM generate_series(1, 4) i;
SELECT nextval('folio_seq') FROM generate_series(1, 7);
"""


@contextlib.asynccontextmanager
async def control(dsn: str):
    conn = await pgconn.connect(dsn, 5.0)
    try:
        yield conn
    finally:
        await conn.close()


async def client(dsn: str) -> asyncpg.Connection:
    """An application session: no pgroute application_name, server defaults."""
    return await asyncpg.connect(dsn, timeout=5.0, server_settings={"application_name": "app"})


async def eventually(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_subscription_name():
    assert naming.subscription_name("chrispar_sub", "mirror") == "chrispar_sub"
    assert naming.subscription_name("chrispar_sub", "primary") == "chrispar_sub_rev"
    with pytest.raises(ValueError):
        naming.subscription_name("chrispar_sub", "other")


async def test_promote_with_primary_killed(pair):
    pair.primary.sql(SEED, pair.dbname)
    async with control(pair.primary_dsn()) as p:
        sample = await catalog.sample_sequences(p)
        sampled = sample.values
        assert sample.unfed == {naming.qualified("public", "folio_seq")}
        assert sampled[naming.qualified("public", "folio_seq")] == 7
        assert sampled[naming.qualified("public", "usuarios_id_seq")] == 5
        await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 10)
    pair.primary.kill()

    async with control(pair.mirror_dsn()) as m:
        report = await r.promote(m, SUB, 1000, sampled)
        assert report["subscription_dropped"] is True
        assert await r.subscription_info(m, SUB) is None
        assert report["sequences"] == {
            naming.qualified("public", "usuarios_id_seq"): 1005,
            naming.qualified("public", "empleados_id_seq"): 1003,  # identity column
            naming.qualified("public", "pedidos_id_seq"): 1004,
            naming.qualified("public", "folio_seq"): 1007,  # owned by no column: sample + gap
        }
        # Re-running right away changes nothing.
        again = await r.promote(m, SUB, 1000, sampled)
        assert again["subscription_dropped"] is False and again["sequences"] == {}

        app = await client(pair.mirror_dsn())
        try:
            assert await app.fetchval("INSERT INTO usuarios (nombre) VALUES ('n') RETURNING id") == 1006
            assert await app.fetchval("INSERT INTO empleados (nombre) VALUES ('n') RETURNING id") == 1004
            assert await app.fetchval("INSERT INTO pedidos (total) VALUES (1) RETURNING id") == 1005
            assert await app.fetchval("SELECT nextval('folio_seq')") == 1008
        finally:
            await app.close()
        # After writes a re-run may move sequences again, but never backwards and
        # never onto a value already used.
        third = await r.promote(m, SUB, 1000, sampled)
        assert all(v >= 1006 for v in third["sequences"].values())
        assert await m.fetchval("INSERT INTO usuarios (nombre) VALUES ('m') RETURNING id") > 1006


async def test_fence_subscriber_and_stamps(pair):
    async with control(pair.primary_dsn()) as p, control(pair.mirror_dsn()) as m:
        other_control = await pgconn.connect(pair.mirror_dsn(), 5.0, application_name="pgroute-monitor")
        victim = await client(pair.mirror_dsn())
        await victim.execute("BEGIN; INSERT INTO usuarios (nombre) VALUES ('local')")
        assert not await fencing.is_fenced(m)

        await fencing.fence(m, spare=pgconn.own_pids(parse_dsn(pair.mirror_dsn())))
        assert await fencing.is_fenced(m)
        assert await fencing.fence_state(m) == (True, True)  # closed to logins, read-only by default
        assert victim.is_closed() or await _is_dead(victim)
        assert await other_control.fetchval("SELECT 1") == 1  # pgroute's own sessions (by pid) survive

        fresh = await client(pair.mirror_dsn())
        try:
            assert await fresh.fetchval("SHOW default_transaction_read_only") == "on"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await fresh.execute("INSERT INTO usuarios (nombre) VALUES ('blocked')")
        finally:
            await fresh.close()

        # The fenced subscriber still applies the primary's changes.
        await p.execute("INSERT INTO usuarios (nombre) VALUES ('replicated')")
        await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 10)
        assert await m.fetchval("SELECT count(*) FROM usuarios WHERE nombre = 'replicated'") == 1

        # Stamps: per node, survive replication untouched, writable when fenced.
        assert await catalog.read_stamp(m) == (None, None)
        await catalog.write_stamp(p, 7, "primary")
        await catalog.write_stamp(m, 6, None)
        await p.execute("INSERT INTO usuarios (nombre) VALUES ('after stamp')")
        await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 10)
        assert await catalog.read_stamp(p) == (7, "primary")
        assert await catalog.read_stamp(m) == (6, None)
        await catalog.write_stamp(p, 8, "mirror")
        assert await catalog.read_stamp(p) == (8, "mirror")

        await fencing.unfence(m)
        assert not await fencing.is_fenced(m)
        fresh = await client(pair.mirror_dsn())
        try:
            assert await fresh.fetchval("SHOW default_transaction_read_only") == "off"
        finally:
            await fresh.close()
        await other_control.close()


async def _is_dead(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    # InternalClientError: asyncpg's report of a connection the server terminated while
    # the driver was between states (seen 1 in ~10 runs); the session is gone all the same.
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
        return True
    return False


async def test_failover_slot_then_reverse_subscription(pair):
    """The failover sequence with the old primary alive: promote the mirror, give it a
    publication and a slot before any write, write, then let the old primary
    subscribe to that slot without a copy: it receives exactly the new writes."""
    pair.primary.sql(SEED, pair.dbname)
    rev = naming.subscription_name(SUB, "primary")
    async with control(pair.primary_dsn()) as p, control(pair.mirror_dsn()) as m:
        await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 10)
        await r.promote(m, SUB, 1000, (await catalog.sample_sequences(p)).values)
        assert await r.ensure_publication(m, PUB) is True
        assert await r.ensure_slot(m, rev) is True
        assert await r.ensure_publication(m, PUB) is False
        assert await r.ensure_slot(m, rev) is False
        info = await r.slot_info(m, rev)
        assert info is not None
        assert info["active"] is False and info["confirmed_flush_lsn"] > 0

        await m.execute("INSERT INTO usuarios (nombre) VALUES ('on mirror')")
        await m.execute("UPDATE usuarios SET nombre = 'changed' WHERE id = 1")

        # The old primary: its mirror's slot is left behind, inactive; drop it.
        assert SUB in await r.list_inactive_slots(p)
        assert await r.drop_slot(p, SUB) is True
        assert await r.drop_slot(p, SUB) is False
        await fencing.fence(p)  # the returning node follows the mirror while fenced
        # Trust authentication ignores the password: it is there to be masked.
        mirror_dsn = pair.mirror.dsn(pair.dbname, password="s3cret")
        created = await r.subscribe(p, rev, mirror_dsn, PUB, copy_data=False, create_slot=False)
        assert created is True
        assert await r.subscribe(p, rev, mirror_dsn, PUB, copy_data=False, create_slot=False) is False
        await r.wait_caught_up(m, rev, await catalog.current_lsn(m), 10)
        assert await p.fetchval("SELECT id FROM usuarios WHERE nombre = 'on mirror'") == 1006
        assert await p.fetchval("SELECT nombre FROM usuarios WHERE id = 1") == "changed"
        assert await p.fetchval("SELECT count(*) FROM usuarios") == 6  # no copy: no duplicates

        info = await r.subscription_info(p, rev)
        assert info is not None
        assert info["enabled"] and info["worker_pid"] and info["slot_name"] == rev
        assert "s3cret" not in info["conninfo"] and "password=***" in info["conninfo"]
        slot = await r.slot_info(m, rev)
        assert slot is not None and slot["active"]

        # Dropping it with the publisher reachable removes the slot there too.
        assert await r.drop_subscription(p, rev, publisher_reachable=True) is True
        assert await r.drop_subscription(p, rev, publisher_reachable=True) is False
        assert await r.slot_info(m, rev) is None

        # Full resync (failback --resync): empty the old primary, copy everything.
        tables = await r.published_tables(m, PUB)
        assert await r.truncate_published_tables(p, PUB, tables=tables) == tables
        assert await p.fetchval("SELECT count(*) FROM usuarios") == 0
        assert await r.subscribe(p, rev, mirror_dsn, PUB, copy_data=True, create_slot=True)
        await eventually(lambda: _all_ready(p, rev), what="initial copy")
        await r.wait_caught_up(m, rev, await catalog.current_lsn(m), 10)
        for table in ("usuarios", "empleados", "pedidos"):
            query = f"SELECT count(*) FROM {table}"
            assert await p.fetchval(query) == await m.fetchval(query) > 0

        # Its slot vanished from the publisher: the drop still succeeds.
        await p.execute(f"ALTER SUBSCRIPTION {rev} DISABLE")
        assert await r.drop_slot(m, rev) is True
        assert await r.drop_subscription(p, rev, publisher_reachable=True) is True
        assert await r.subscription_info(p, rev) is None


async def _all_ready(conn, name) -> bool:
    info = await r.subscription_info(conn, name)
    return bool(info and info["all_ready"] and info["tables"])


async def test_lag_wait_caught_up_and_synchronous(pair):
    async with control(pair.primary_dsn()) as p, control(pair.mirror_dsn()) as m:
        assert await r.lag_bytes(p, SUB) == 0
        assert await r.lag_bytes(p, "no_such_sub") is None

        # Convergence right after a write: the subscription's synchronous_commit
        # decides whether the flush position comes back at once or after the
        # subscriber's WAL writer (wal_writer_delay, 200 ms) flushed its commit.
        async def converge(**kw) -> float:
            await p.execute("INSERT INTO pedidos (total) VALUES (1)")
            started = time.perf_counter()
            await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 10, **kw)
            return time.perf_counter() - started

        assert min([await converge(applied=True) for _ in range(3)]) < 0.1
        await m.execute(f"ALTER SUBSCRIPTION {SUB} SET (synchronous_commit = on)")
        await converge()
        assert min([await converge() for _ in range(3)]) < 0.1

        # Lag grows while the subscription is disabled.
        await m.execute(f"ALTER SUBSCRIPTION {SUB} DISABLE")
        await eventually(lambda: _not_connected(p), what="walsender gone")
        await p.execute("INSERT INTO pedidos (total) SELECT 1 FROM generate_series(1, 100)")
        first = await r.lag_bytes(p, SUB)
        await p.execute("INSERT INTO pedidos (total) SELECT 1 FROM generate_series(1, 100)")
        second = await r.lag_bytes(p, SUB)
        assert first is not None and second is not None
        assert 0 < first < second
        with pytest.raises(asyncio.TimeoutError):
            await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 0.2)
        await m.execute(f"ALTER SUBSCRIPTION {SUB} ENABLE")
        await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 15)
        count = "SELECT count(*) FROM pedidos"
        assert await p.fetchval(count) == await m.fetchval(count)

        # Synchronous replication to the subscription.
        assert await r.sync_state(p, SUB) == "async"
        await r.set_synchronous(p, SUB)
        await eventually(lambda: _state_is(p, "sync"), what="sync_state sync")
        await p.execute("INSERT INTO pedidos (total) VALUES (2)")
        await r.set_synchronous(p, None)
        await eventually(lambda: _state_is(p, "async"), what="sync_state async")


async def _not_connected(p) -> bool:
    return await r.sync_state(p, SUB) is None


async def _state_is(p, state: str) -> bool:
    return await r.sync_state(p, SUB) == state


async def test_setup_replication_and_check_pair(cluster_factory):
    src = cluster_factory("src")
    dst = cluster_factory("dst")
    src.sql("CREATE DATABASE chrispar")
    src.sql(local.DEFAULT_SCHEMA + SEED, "chrispar")
    primary, mirror = src.dsn("chrispar"), dst.dsn("chrispar")

    steps = await setup.setup_replication(primary, mirror, PUB, SUB, timeout=60)
    assert "mirror: database chrispar created" in steps
    assert any("publication chrispar_pub created" in s for s in steps)
    assert any("schema copied" in s for s in steps)
    assert any("subscription chrispar_sub created" in s for s in steps)
    assert dst.sql("SELECT count(*) FROM usuarios", "chrispar") == "5"
    src.sql("INSERT INTO usuarios (nombre) VALUES ('new')", "chrispar")
    async with control(primary) as p:
        await r.wait_caught_up(p, SUB, await catalog.current_lsn(p), 10)
    assert dst.sql("SELECT count(*) FROM usuarios", "chrispar") == "6"

    again = await setup.setup_replication(primary, mirror, PUB, SUB, timeout=60)
    assert any("already exists" in s for s in again) and not any("created" in s for s in again)

    items = await check.check_pair(primary, mirror, PUB, SUB, 5.0)
    assert all(i.ok for i in items), [i for i in items if not i.ok]

    def failing(items):
        return {i.name: i for i in items if not i.ok}

    dst.sql(f"ALTER SUBSCRIPTION {SUB} DISABLE", "chrispar")
    bad = failing(await check.check_pair(primary, mirror, PUB, SUB, 5.0))
    assert "disabled" in bad["subscription"].detail and "ENABLE" in bad["subscription"].fix
    # Disabled for long enough, its slot shows as inactive and holding WAL.
    await _wait_inactive(primary)
    bad = failing(await check.check_pair(primary, mirror, PUB, SUB, 5.0))
    assert SUB in bad["primary inactive slots"].detail
    assert "do not drop" in bad["primary inactive slots"].fix  # the mirror's own slot
    dst.sql(f"ALTER SUBSCRIPTION {SUB} ENABLE", "chrispar")

    src.sql(f"DROP PUBLICATION {PUB}", "chrispar")
    bad = failing(await check.check_pair(primary, mirror, PUB, SUB, 5.0))
    assert "does not exist" in bad["publication"].detail

    dst.stop()
    bad = failing(await check.check_pair(primary, mirror, PUB, SUB, 2.0))
    assert set(bad) >= {"mirror reachable", "publication"}
    assert bad["mirror reachable"].fix

    # Connection failures name the node with its password masked.
    secret = dst.dsn("chrispar", password="s3cret")
    with pytest.raises(NodeUnavailable) as excinfo:
        await pgconn.connect(secret, 2.0)
    assert "s3cret" not in str(excinfo.value) and "***" in str(excinfo.value)

    # A would-be primary without wal_level = logical: setup says what to do.
    dst.set_settings(wal_level="replica")
    dst.start()
    with pytest.raises(setup.ReplicationSetupError, match=r"wal_level = logical.*restart"):
        await setup.setup_replication(dst.dsn("chrispar"), primary, PUB, "other_sub")
    bad = failing(await check.check_pair(dst.dsn("chrispar"), primary, PUB, "other_sub", 5.0))
    assert "ALTER SYSTEM SET wal_level = logical" in bad["primary wal_level"].fix


async def _wait_inactive(primary: str) -> None:
    async with control(primary) as p:
        await eventually(lambda: _slot_inactive(p), what="slot inactive")


async def _slot_inactive(p) -> bool:
    return SUB in await r.list_inactive_slots(p)
