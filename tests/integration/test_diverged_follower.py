"""A follower that silently diverged: a row deleted directly on it, then updated through
pgroute on the active node. PostgreSQL 18 skips that UPDATE (no error, replication goes
on) and counts it in pg_stat_subscription_stats.confl_update_missing: pgroute reports
the follower (status, health, one event). PostgreSQL 15 neither errors nor counts: the
same steps change nothing in pgroute, which cannot tell (README, Limits).

Not matrix tests: each pins the server version it is about."""

from __future__ import annotations

import asyncpg
import pytest

from .harness import api_async, make_config, proxy_dsn, running_pgroute, wait_following, wait_for, wait_state
from .harness import status as _status

pytestmark = pytest.mark.asyncio

KIND = "replication_diverged"


async def _diverge(pair, running) -> None:
    """Insert a row through pgroute, delete it directly on the follower, update it
    through pgroute, then wait until the follower has applied past that update."""
    conn = await asyncpg.connect(proxy_dsn(running))
    mconn = await asyncpg.connect(pair.mirror_dsn())
    try:
        on_mirror = "SELECT count(*) FROM usuarios WHERE id = $1"
        rid = await conn.fetchval("INSERT INTO usuarios (nombre) VALUES ('to diverge') RETURNING id")
        await wait_for(lambda: _fetch(mconn, on_mirror, rid), 30, what="row replicated")
        # As a superuser, past the fence if there is one.
        await mconn.execute("SET default_transaction_read_only = off")
        await mconn.execute("DELETE FROM usuarios WHERE id = $1", rid)
        await conn.execute("UPDATE usuarios SET nombre = 'updated through pgroute' WHERE id = $1", rid)
        marker = await conn.fetchval("INSERT INTO usuarios (nombre) VALUES ('after the update') RETURNING id")
        await wait_for(lambda: _fetch(mconn, on_mirror, marker), 30, what="update applied")
    finally:
        await conn.close()
        await mconn.close()


async def _fetch(conn: asyncpg.Connection, sql: str, *args) -> object:
    return await conn.fetchval(sql, *args)


def _updated_on_mirror(pair) -> str:
    return pair.mirror.sql("SELECT count(*) FROM usuarios WHERE nombre = 'updated through pgroute'", pair.dbname)


async def _more_mirror_probes(running, n: int) -> None:
    """Until the mirror has been probed ``n`` more times (progress, not time)."""
    for _ in range(n):
        seen = _status(running)["nodes"]["mirror"]["last_probe"]
        await wait_state(running, lambda s, seen=seen: s["nodes"]["mirror"]["last_probe"] != seen, 15, "a probe")


def _diverged_events(st: dict) -> list[dict]:
    return [e for e in st["events"] if e["kind"] == KIND]


async def test_18_update_of_a_row_the_follower_lacks_is_reported_once(pair_factory, tmp_path):
    pair = pair_factory(primary_version=18, mirror_version=18)
    async with running_pgroute(make_config(pair, tmp_path)) as running:
        await wait_following(running)
        assert _status(running)["nodes"]["mirror"]["missing_rows"] == 0
        await _diverge(pair, running)
        st = await wait_state(running, lambda s: s["nodes"]["mirror"]["problem"], 30, "divergence reported")
        st = _status(running)
        mirror = st["nodes"]["mirror"]
        assert mirror["missing_rows"] == 1
        assert mirror["problem"].startswith(
            "skipped 1 update(s)/delete(s) of rows it does not have: the follower has diverged; "
            "resync it (`pgroute rejoin --resync`)"
        ), mirror["problem"]
        assert st["replication"] == "ok"  # it still applies: the problem line is the news
        code, health = await api_async(running, "/api/health")
        assert code == 200 and health["status"] == "degraded"
        await _more_mirror_probes(running, 3)
        events = _diverged_events(_status(running))
        assert len(events) == 1, events  # once per rise, not per probe
        assert events[0]["details"]["node"] == "mirror"
        assert "the follower has diverged" in events[0]["reason"]

        # A manual switch to it is refused; the repair the problem names clears it.
        code, body = await api_async(running, "/api/switchover", "POST", {})
        assert code == 409 and "mirror has diverged" in body["error"], body
        code, body = await api_async(running, "/api/rejoin", "POST", {"resync": True})
        assert code == 200 and body["result"] == "ok", body
        # The new subscription's count starts at 0: below the last one, a new baseline.
        await wait_state(running, lambda s: s["nodes"]["mirror"]["problem"] is None, 30, "divergence cleared")
        st = _status(running)
        assert st["nodes"]["mirror"]["missing_rows"] == 0 and len(_diverged_events(st)) == 1
        assert _updated_on_mirror(pair) == "1"  # the full copy brought the row back, updated
        code, health = await api_async(running, "/api/health")
        assert code == 200 and health["status"] == "healthy"


async def test_15_cannot_tell_and_nothing_changes(pair_factory, tmp_path):
    pair = pair_factory(primary_version=15, mirror_version=15)
    async with running_pgroute(make_config(pair, tmp_path)) as running:
        await wait_following(running)
        await _diverge(pair, running)
        await _more_mirror_probes(running, 3)
        st = _status(running)
        mirror = st["nodes"]["mirror"]
        assert mirror["missing_rows"] is None and mirror["problem"] is None
        assert _diverged_events(st) == []
        assert st["replication"] == "ok"
        code, health = await api_async(running, "/api/health")
        assert code == 200 and health["status"] == "healthy"
        # The follower did diverge: the row is missing there, unseen.
        assert _updated_on_mirror(pair) == "0"
