"""What differs between PostgreSQL versions, on the version this run starts
(PGROUTE_PG_VERSION=15, 16 or 18): the streaming option of the subscriptions pgroute
creates, which pg_stat_subscription row is the apply worker (16+ adds parallel apply
workers), 18's conflict counters, data checksums of the local servers, and the
pgoutput messages the divergence reader decodes (pgroute.pg.versions)."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from pgroute.control import replication as r
from pgroute.control.divergence.read import read_divergent
from pgroute.pg import catalog, versions
from pgroute.pg import connect as pgconn
from pgroute.pg.pgoutput import ChangeKind

pytestmark = [pytest.mark.integration, pytest.mark.matrix]

SUB = "chrispar_sub"
PUB = "chrispar_pub"


@contextlib.asynccontextmanager
async def control(dsn: str):
    conn = await pgconn.connect(dsn, 5.0)
    try:
        yield conn
    finally:
        await conn.close()


async def poll(conn: asyncpg.Connection, sql: str, what: str, *args, attempts: int = 600):
    """The first non-NULL, truthy value of ``sql``, polled every 50 ms."""
    for _ in range(attempts):
        value = await conn.fetchval(sql, *args)
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"never saw {what}")


async def test_subscriptions_state_streaming_and_checksums(pair):
    """Every subscription pgroute creates says streaming = on (18 would default to
    parallel, 15 and 16 to off); the local servers have data checksums on."""
    major = int(pair.mirror.sql("SHOW server_version_num")) // 10000
    async with control(pair.mirror_dsn()) as mconn, control(pair.primary_dsn()) as pconn:
        assert versions.server_major(mconn) == major
        # The pair's own subscription (pgroute.local.create_pair).
        info = await r.subscription_info(mconn, SUB)
        assert info is not None and info["streaming"] == "on"
        # One created by the control plane (rejoin, switchover, setup-replication).
        assert await r.subscribe(mconn, "vdiff_sub", pair.primary_dsn(), PUB, copy_data=False, create_slot=True)
        try:
            raw = await mconn.fetchval("SELECT substream FROM pg_subscription WHERE subname = 'vdiff_sub'")
            # The catalog column's type differs: boolean on 15, "char" from 16.
            assert raw == (True if major == 15 else b"t")
            info = await r.subscription_info(mconn, "vdiff_sub")
            assert info is not None and info["streaming"] == "on"
        finally:
            await r.drop_subscription(mconn, "vdiff_sub", publisher_reachable=True)
        for conn in (mconn, pconn):
            assert await conn.fetchval("SHOW data_checksums") == "on"


async def test_apply_worker_is_the_leader_and_conflicts(pair):
    """With a parallel apply worker present (16+: a pg_stat_subscription row with relid
    NULL, like the leader), the probe and subscription_info still report the leader
    apply worker; 18's missing-row conflicts are counted, 15 and 16 report None."""
    major = int(pair.mirror.sql("SHOW server_version_num")) // 10000
    # Stream every transaction over 64 kB; on 16+ apply it in a parallel worker.
    pair.primary.sql("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'; SELECT pg_reload_conf()")
    async with control(pair.mirror_dsn()) as mconn, control(pair.primary_dsn()) as pconn:
        if versions.has_leader_pid(major):
            worker_sql = "SELECT pid FROM pg_stat_subscription WHERE subname = $1 AND relid IS NULL"
            before = await mconn.fetchval(worker_sql, SUB)
            await mconn.execute(f"ALTER SUBSCRIPTION {SUB} SET (streaming = parallel)")
            # The apply worker restarts to take the new option: stream a large
            # transaction once its successor runs.
            await poll(mconn, worker_sql + " AND pid <> $2", "a new apply worker", SUB, before)
        # (15: streaming = on, as pgroute creates it: the transaction is spooled.)
        await pconn.execute("INSERT INTO pedidos (usuario_id, total) SELECT i, i FROM generate_series(1, 20000) i")
        target = await catalog.current_lsn(pconn)
        await r.wait_caught_up(pconn, SUB, target, 60.0, applied=True)
        assert await mconn.fetchval("SELECT count(*) FROM pedidos") == 20000
        if versions.has_leader_pid(major):
            # A parallel apply worker stays in its leader's pool after the transaction.
            leader = await poll(
                mconn,
                "SELECT leader_pid FROM pg_stat_subscription WHERE subname = $1 AND leader_pid IS NOT NULL",
                "a parallel apply worker",
                SUB,
            )
            rows = await mconn.fetch(
                "SELECT pid, leader_pid FROM pg_stat_subscription WHERE subname = $1 AND relid IS NULL", SUB
            )
            assert len(rows) >= 2, rows  # relid IS NULL alone no longer names one worker
            assert leader in {row["pid"] for row in rows if row["leader_pid"] is None}
        else:
            leader = await mconn.fetchval(
                "SELECT pid FROM pg_stat_subscription WHERE subname = $1 AND relid IS NULL", SUB
            )
        for _ in range(3):  # whichever row a plan scans first
            facts = await catalog.read_node_facts(mconn, SUB, "peer_sub")
            assert facts.worker_running and facts.worker_pid == leader
            assert facts.received_lsn is not None
            info = await r.subscription_info(mconn, SUB)
            assert info is not None and info["worker_pid"] == leader and info["received_lsn"] is not None

        # Rows the follower lacks: an update and a delete that find nothing there.
        await mconn.execute("DELETE FROM pedidos WHERE id IN (1, 2)")
        await pconn.execute("UPDATE pedidos SET total = 0 WHERE id = 1")
        await pconn.execute("DELETE FROM pedidos WHERE id = 2")
        await r.wait_caught_up(pconn, SUB, await catalog.current_lsn(pconn), 60.0, applied=True)
        if versions.has_conflict_counters(major):
            sql = "SELECT confl_update_missing + confl_delete_missing >= 2 FROM pg_stat_subscription_stats"
            await poll(mconn, sql + " WHERE subname = $1", "the missing-row conflicts counted", SUB)
            facts = await catalog.read_node_facts(mconn, SUB, "peer_sub")
            assert facts.missing_rows == 2
            info = await r.subscription_info(mconn, SUB)
            assert info is not None and info["conflicts"] is not None
            assert info["conflicts"]["confl_update_missing"] == 1
            assert info["conflicts"]["confl_delete_missing"] == 1
            assert info["apply_error_count"] == 0  # the server skipped them and went on
        else:
            facts = await catalog.read_node_facts(mconn, SUB, "peer_sub")
            assert facts.missing_rows is None and facts.worker_pid == leader
            info = await r.subscription_info(mconn, SUB)
            assert info is not None and info["conflicts"] is None


_DECODE_SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE t (id int PRIMARY KEY, m mood, note text, doubled int GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE u (id int PRIMARY KEY);
CREATE PUBLICATION vd_pub FOR ALL TABLES;
SELECT pg_create_logical_replication_slot('vd_slot', 'pgoutput');
"""

_DECODE_CHANGES = """
INSERT INTO t (id, m, note) VALUES (1, 'ok', 'one'), (2, 'sad', NULL);
BEGIN;
UPDATE t SET m = 'happy', note = 'uno' WHERE id = 1;
DELETE FROM t WHERE id = 2;
SELECT pg_logical_emit_message(true, 'pgroute-test', 'not requested');
COMMIT;
INSERT INTO u VALUES (1);
TRUNCATE t, u;
SELECT pg_replication_origin_create('vd_origin');
SELECT pg_replication_origin_session_setup('vd_origin');
INSERT INTO u VALUES (7);
"""


async def test_pgoutput_decodes_every_message_this_version_sends(cluster_factory):
    """The divergence reader's peek (proto_version 1) on this server version: every
    message decodes, with the relation (generated column left out), the enum's type,
    the truncate of two tables and the origin of a change applied under an origin."""
    node = cluster_factory("vd")
    node.sql("CREATE DATABASE vd")
    node.sql(_DECODE_SCHEMA, "vd")
    node.sql(_DECODE_CHANGES, "vd")
    async with control(node.dsn("vd")) as conn:
        peek = (
            "SELECT data FROM pg_logical_slot_peek_binary_changes('vd_slot', NULL, NULL, "
            "'proto_version', $1, 'publication_names', 'vd_pub')"
        )
        raw = [row["data"] for row in await conn.fetch(peek, str(versions.PGOUTPUT_PROTO_VERSION))]
        tags = {chr(data[0]) for data in raw}
        assert tags == {"B", "R", "Y", "I", "U", "D", "T", "O", "C"}  # no M: messages not requested
        # The higher protocol versions this server speaks (15: up to 3, 16+: 4) send
        # the very same bytes when streaming and two-phase are not asked for.
        newest = 3 if versions.server_major(conn) == 15 else 4
        for proto in range(2, newest + 1):
            assert [row["data"] for row in await conn.fetch(peek, str(proto))] == raw
        with pytest.raises(asyncpg.PostgresError, match="proto"):
            await conn.fetch(peek, str(newest + 1))
        divergent = await read_divergent(conn, "vd_slot", "vd_pub")
    txs = divergent.transactions
    assert [[c.kind for c in tx.changes] for tx in txs] == [
        [ChangeKind.INSERT, ChangeKind.INSERT],
        [ChangeKind.UPDATE, ChangeKind.DELETE],
        [ChangeKind.INSERT],
        [ChangeKind.TRUNCATE],
        [ChangeKind.INSERT],
    ]
    assert [tx.origin for tx in txs] == [None, None, None, None, "vd_origin"]
    assert all(tx.messages == () for tx in txs)
    t = next(rel for rel in divergent.relations.values() if rel.name == "t")
    assert t.column_names == ("id", "m", "note")  # generated columns are not published
    assert [ty.name for ty in divergent.types.values()] == ["mood"]
    assert txs[0].changes[0].new == ("1", "ok", "one")
    assert txs[0].changes[1].new == ("2", "sad", None)
    update, delete = txs[1].changes
    assert update.new == ("1", "happy", "uno") and delete.old == ("2", None, None)
    assert {rel.name for rel in txs[3].changes[0].truncate_relations} == {"t", "u"}
    assert txs[4].changes[0].new == ("7",)
