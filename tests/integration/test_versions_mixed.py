"""A mixed pair (one node on PostgreSQL 15, the other on 18) with the streaming option
pgroute gives its subscriptions (pgroute.pg.versions.SUBSCRIPTION_STREAMING). The
versions are fixed here, so this file is not part of the per-version matrix."""

from __future__ import annotations

import pytest

from pgroute.control import replication as r
from pgroute.pg import catalog, versions

from .test_versions import SUB, control, poll

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize(("primary_version", "mirror_version"), [(15, 18), (18, 15)])
async def test_mixed_pair_streams_large_transactions(pair_factory, primary_version, mirror_version):
    """streaming = on across versions: an 18 subscriber of a 15 publisher and the
    reverse (a 15 subscriber asks an 18 publisher for protocol 2-3, never parallel)."""
    pair = pair_factory(primary_version=primary_version, mirror_version=mirror_version)
    pair.primary.sql("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'; SELECT pg_reload_conf()")
    async with control(pair.mirror_dsn()) as mconn, control(pair.primary_dsn()) as pconn:
        assert versions.server_major(mconn) == mirror_version
        info = await r.subscription_info(mconn, SUB)
        assert info is not None and info["streaming"] == "on"
        await pconn.execute("INSERT INTO pedidos (usuario_id, total) SELECT i, i FROM generate_series(1, 20000) i")
        await r.wait_caught_up(pconn, SUB, await catalog.current_lsn(pconn), 60.0, applied=True)
        assert await mconn.fetchval("SELECT count(*) FROM pedidos") == 20000
        # The publisher streamed it (counted on the publisher from 14 on).
        sql = "SELECT stream_txns >= 1 FROM pg_stat_replication_slots WHERE slot_name = $1"
        await poll(pconn, sql, "the transaction streamed", SUB)
        facts = await catalog.read_node_facts(mconn, SUB, "peer_sub")
        assert facts.worker_running and facts.received_lsn is not None
